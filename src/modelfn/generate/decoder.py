"""A served decoder: onnxruntime-genai's model, tokenizer and generator, no torch.

:func:`load` verifies every bundle file against the manifest (as every model's files
are), then opens the folder with onnxruntime-genai. :meth:`Decoder.stream` decodes one
prompt token by token and yields text as it becomes whole UTF-8 (onnxruntime-genai's
tokenizer stream), holding back what could be the start of a stop string; closing the
iterator (a client that went away) stops the decoding at the next token.

A decoder is also a :class:`~modelfn.runtime.model.LoadedModel` for the routes every
model has: ``/infer`` with a ``text_input`` BYTES tensor (one prompt per row, Triton's
name) returns ``text_output`` and ``finish_reason``; asynchronous jobs and S3 batch
files run the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelfn.config import cpu_count
from modelfn.errors import InvalidInput, LimitExceeded, ModelUnavailable
from modelfn.generate.params import Sampling, sampling
from modelfn.runtime.manifest import Manifest
from modelfn.runtime.model import LoadedModel
from modelfn.runtime.protocol import InferRequest, to_strings
from modelfn.store import Store
from modelfn.store import keys as k

#: the API's tensors of a decoder (Triton's names for its generate-capable backends)
TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
#: a request's sampling per row, beside its prompts (sliced with them)
SAMPLING = "__sampling__"


@dataclass
class Delta:
    """A piece of the completion; the last one has ``finish`` set."""

    text: str
    tokens: int  # completion tokens so far
    finish: str | None = None  # "stop" | "length"


@dataclass
class Stats:
    """What this process's decoder did (read by tests and logs)."""

    requests: int = 0
    tokens: int = 0
    cancelled: int = 0
    last_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin a stop string."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep


class TextStream:
    """Token ids to text as they come, the way transformers decodes the whole sequence:
    a piece is given out once the text it ends is whole (an unfinished UTF-8 character
    decodes to U+FFFD, held back until the next token completes it, or given out at the
    end, as transformers' ``decode`` gives it). Decoding starts from the prompt's last
    tokens so that a word's leading space survives (SentencePiece strips it at the
    start of a sequence)."""

    CONTEXT = 6

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt[-self.CONTEXT:])
        self.prefix, self.read = 0, len(self.ids)

    def _text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class Decoder(LoadedModel):
    """One decoder bundle, loaded (see the module's doc)."""

    def __init__(self, manifest: Manifest, folder: Path, max_batch: int, threads: int = 0,
                 providers: str = "cpu") -> None:
        import onnxruntime_genai as og

        self.name, self.version, self.manifest = manifest.name, manifest.version, manifest
        self.session = None  # type: ignore[assignment]  # onnxruntime-genai owns it
        self.batched = True
        self.max_batch = min(max_batch, manifest.max_batch or max_batch)
        self.folder = folder
        gen = manifest.generation
        self.generation = dict(gen)
        self.context = int(gen["context_length"])
        self.eos = {int(t) for t in gen.get("eos_token_ids", [])}
        self.vocab = int(gen.get("vocab_size", 0))
        self.limits = dict(gen.get("limits", {}))
        self.stats = Stats()
        try:
            config = og.Config(str(folder))
            options: dict[str, Any] = {"intra_op_num_threads": threads or cpu_count(),
                                       "inter_op_num_threads": 1, "log_severity_level": 3}
            if providers != "cpu" and decoder_gpu(providers):
                options["provider_options"] = [{"cuda": {}}]  # onnxruntime-genai-cuda
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
            from tokenizers import Tokenizer

            #: decodes as transformers does (onnxruntime-genai's stream drops bytes that
            #: are not valid UTF-8, where transformers writes U+FFFD)
            self.text_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # onnxruntime-genai raises RuntimeError with its text
            raise ModelUnavailable(f"{manifest.name} version {manifest.version}: "
                                   f"onnxruntime-genai cannot load the model: "
                                   f"{str(exc).splitlines()[0][:200]}") from exc
        self._og = og

    # --- prompts ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt the folder's chat template makes of ``messages``."""
        if not self.generation.get("chat_template"):
            raise InvalidInput(f"model {self.name!r} has no chat template (its folder's "
                               "tokenizer_config.json names none): use /v1/completions "
                               "with a prompt")
        try:
            return str(self.tokenizer.apply_chat_template(json.dumps(messages),
                                                          add_generation_prompt=True))
        except Exception as exc:  # the template's own error (e.g. a role it refuses)
            raise InvalidInput(f"the chat template cannot render these messages: "
                               f"{str(exc).splitlines()[0][:200]}") from None

    def check(self, ids: list[int], opts: Sampling) -> None:
        """Refuse a prompt over the limits before any decoding."""
        limit = min(int(self.limits.get("max_prompt_tokens", self.context - 1)),
                    self.context - 1)
        if not ids:
            raise InvalidInput("the prompt is empty (it encodes to no tokens)")
        if len(ids) > limit:
            raise LimitExceeded(f"the prompt is {len(ids)} tokens; this model takes at most "
                                f"{limit} (context length {self.context})")
        seconds = float(self.limits.get("max_seconds", 0) or 0)
        rate = float(self.generation.get("decode_tokens_per_second", 0) or 0)
        if seconds and rate and opts.max_tokens / rate > seconds:
            raise InvalidInput(
                f"max_tokens {opts.max_tokens} would take about {opts.max_tokens / rate:.0f} s "
                f"at this model's {rate:.0f} tokens/s; a request may take at most "
                f"{seconds:g} s: ask for at most {int(rate * seconds)} tokens")

    # --- decoding -----------------------------------------------------------------------

    def tokens(self, ids: list[int], opts: Sampling, stop_at_eos: bool = True,
               ended: dict[str, str] | None = None) -> Iterator[int]:
        """The token ids decoded after ``ids`` (end of sequence not included; with
        ``stop_at_eos`` False, decoding goes on past it: speed measurements), at most
        ``opts.max_tokens`` or up to the context, or the time limit. Closing the
        iterator stops the decoding. ``ended["finish"]`` is set to ``stop`` (end of
        sequence) or ``length`` once it ends by itself."""
        self.check(ids, opts)
        og = self._og
        params = og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": min(len(ids) + opts.max_tokens, self.context),
                                  "repetition_penalty": 1.0, "num_beams": 1}
        if opts.greedy:
            search["do_sample"] = False
        else:
            search.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p,
                          top_k=opts.top_k or self.vocab or 50)
            if opts.seed is not None:
                search["random_seed"] = int(opts.seed % (2 ** 31))
        if not stop_at_eos:
            search["min_length"] = search["max_length"]
        params.set_search_options(**search)
        seconds = float(self.limits.get("max_seconds", 0) or 0)
        deadline = time.monotonic() + seconds if seconds else None
        generator = og.Generator(self.model, params)
        made, finish = 0, "length"
        with self.stats.lock:
            self.stats.requests += 1
        try:
            generator.append_tokens(np.asarray(ids, dtype=np.int32))
            while not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if stop_at_eos and token in self.eos:
                    finish = "stop"
                    break
                made += 1
                yield token
                if made >= opts.max_tokens or (deadline and time.monotonic() > deadline):
                    break
            if ended is not None:
                ended["finish"] = finish
        except GeneratorExit:
            with self.stats.lock:
                self.stats.cancelled += 1
            raise
        finally:
            with self.stats.lock:
                self.stats.tokens += made
                self.stats.last_tokens = made
            del generator

    def stream(self, ids: list[int], opts: Sampling) -> Iterator[Delta]:
        """Decode after ``ids``; yields text as it is made (whole UTF-8 characters,
        nothing that could be the start of a stop string), then a last :class:`Delta`
        with ``finish``: ``stop`` (end of sequence or a stop string) or ``length``
        (max_tokens, the context or the time limit). Closing the iterator stops it."""
        words = TextStream(self.text_tokenizer, ids)
        pending, made, finish = "", 0, "stop"
        ended: dict[str, str] = {}
        tokens = self.tokens(ids, opts, ended=ended)
        try:
            for token in tokens:
                made += 1
                pending += words.push(token)
                cut = min((i for i in (pending.find(s) for s in opts.stop) if i >= 0),
                          default=-1)
                if cut >= 0:
                    pending = pending[:cut]
                    break
                keep = _holdback(pending, opts.stop)
                if len(pending) > keep:
                    text, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                    yield Delta(text, made)
            else:
                finish = ended.get("finish", "length")
                pending += words.flush()
                cut = min((i for i in (pending.find(s) for s in opts.stop) if i >= 0),
                          default=-1)
                if cut >= 0:
                    pending, finish = pending[:cut], "stop"
            yield Delta(pending, made, finish)
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()

    def complete(self, ids: list[int], opts: Sampling) -> tuple[str, str, int]:
        """(text, finish reason, completion tokens): the whole completion at once."""
        parts, last = [], Delta("", 0, "length")
        for last in self.stream(ids, opts):
            parts.append(last.text)
        return "".join(parts), str(last.finish), last.tokens

    # --- the routes every model has (infer, jobs, batch) ---------------------------------

    def validate(self, request: InferRequest, max_batch: int | None = None
                 ) -> tuple[dict[str, np.ndarray], int]:
        given = {t.name: t for t in request.inputs}
        tensor = given.pop(TEXT_INPUT, None)
        if tensor is None:
            raise InvalidInput(f"missing input {TEXT_INPUT!r} (one prompt per row)")
        if given:
            raise InvalidInput(f"unknown input(s) {sorted(given)}; this model takes "
                               f"[{TEXT_INPUT!r}] (and the sampling in 'parameters')")
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {TEXT_INPUT!r}: datatype must be BYTES, got "
                               f"{tensor.datatype}")
        prompts = to_strings(tensor)
        limit = max_batch or self.max_batch
        if not 1 <= len(prompts) <= limit:
            raise InvalidInput(f"input {TEXT_INPUT!r}: {len(prompts)} prompts; this model "
                               f"takes 1..{limit} per request")
        opts = sampling(dict(request.parameters or {}), self.generation)
        for prompt in prompts:
            self.check(self.encode(str(prompt)), opts)
        per_row = np.empty(len(prompts), dtype=object)
        per_row[:] = [opts] * len(prompts)
        return {TEXT_INPUT: prompts, SAMPLING: per_row}, len(prompts)

    def check_outputs(self, wanted: list[str] | None) -> list[str]:
        names = [TEXT_OUTPUT, FINISH_REASON] if wanted is None else wanted
        unknown = [n for n in names if n not in (TEXT_OUTPUT, FINISH_REASON)]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; this model returns "
                               f"{[TEXT_OUTPUT, FINISH_REASON]}")
        return names

    def run(self, arrays: dict[str, np.ndarray],
            wanted: list[str] | None = None) -> dict[str, np.ndarray]:
        names = self.check_outputs(wanted)
        prompts = arrays[TEXT_INPUT]
        default = sampling({}, self.generation)
        per_row = arrays.get(SAMPLING)
        texts, reasons = [], []
        for i, prompt in enumerate(prompts):
            opts = per_row[i] if per_row is not None else default
            text, finish, _ = self.complete(self.encode(str(prompt)), opts)
            texts.append(text)
            reasons.append(finish)
        out = {TEXT_OUTPUT: np.array(texts, dtype=object),
               FINISH_REASON: np.array(reasons, dtype=object)}
        return {n: out[n] for n in names}


def _folder(store: Store, manifest: Manifest, where: str) -> Path:
    """The bundle's files in one verified folder: the store's own where it is a local
    folder (a layer, the local store), else a copy under the temporary directory."""
    name, version = manifest.name, manifest.version
    paths = {rel: store.local_path(k.bundle_file(name, version, rel)) for rel in manifest.files}
    parents = {p.parent for p in paths.values() if p is not None}
    if all(p is not None for p in paths.values()) and len(parents) == 1:
        for rel, path in paths.items():
            assert path is not None
            manifest.verify_path(rel, path, where)
        return parents.pop()
    folder = Path(tempfile.mkdtemp(prefix=f"modelfn-{name}-{version}-"))
    try:
        for rel in manifest.files:
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with target.open("wb") as fh:
                    for chunk in store.iter_chunks(k.bundle_file(name, version, rel)):
                        fh.write(chunk)
            except FileNotFoundError as exc:
                raise ModelUnavailable(f"{where}: {rel} is listed in the manifest but "
                                       "missing from the bundle") from exc
            manifest.verify_path(rel, target, where)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def load(store: Store, manifest: Manifest, max_batch: int, threads: int = 0,
         providers: str = "cpu") -> Decoder:
    where = f"{manifest.name} version {manifest.version}"
    return Decoder(manifest, _folder(store, manifest, where), max_batch, threads, providers)


def decoder_gpu(choice: str) -> bool:
    """Whether a decoder runs on CUDA for MODELFN_PROVIDERS ``choice`` (auto or cuda):
    onnxruntime-genai built for CUDA (onnxruntime-genai-cuda) and a GPU visible."""
    import onnxruntime_genai as og

    from modelfn.runtime.model import gpu_present

    built = bool(getattr(og, "is_cuda_available", lambda: False)())
    if choice == "cuda" and not (built and gpu_present()):
        raise ModelUnavailable("MODELFN_PROVIDERS=cuda, but " + (
            "no GPU is visible (/dev/nvidia*)" if built else
            "this onnxruntime-genai is not built for CUDA (onnxruntime-genai-cuda)"))
    return built and gpu_present()


def from_folder(manifest: Manifest, folder: str | os.PathLike[str], max_batch: int = 8,
                threads: int = 0) -> Decoder:
    """A decoder from a folder of the bundle's files (the build's gates)."""
    return Decoder(manifest, Path(folder), max_batch, threads)
