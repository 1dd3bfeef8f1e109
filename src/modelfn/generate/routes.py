"""The generation routes: the Open Inference Protocol's generate extension and the
OpenAI-compatible API, on the same :class:`~modelfn.runtime.http.Api` as every route.

- ``POST /v2/models/{name}[/versions/{v}]/generate``: ``{"text_input", "parameters"}``
  → ``{"model_name", "model_version", "text_output", "finish_reason", "usage"}``;
  ``/generate_stream``: the same as server-sent events, one per piece of text, the last
  with ``"done": true`` and the finish reason;
- ``POST /v1/completions`` and ``/v1/chat/completions`` (``model`` is a model's name,
  or ``name:version``), ``stream: true`` as ``chat.completion.chunk`` /
  ``text_completion`` events, a final chunk with ``finish_reason``, a usage chunk with
  ``stream_options.include_usage``, then ``data: [DONE]``; ``GET /v1/models``.

Every check (the body, the sampling, the prompt's length) happens before the first byte
is sent, so a refused request is a plain 4xx. An error after streaming began ends the
stream with an error event; a client that goes away closes the stream, which stops the
decoding at the next token.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from modelfn.errors import InvalidInput, MalformedRequest, ModelfnError, ModelNotFound
from modelfn.generate import TASK
from modelfn.generate.decoder import Decoder, Delta
from modelfn.generate.params import Sampling, sampling
from modelfn.runtime.protocol import body_bytes, check_media_type, parse_json

if TYPE_CHECKING:
    from aws_lambda_powertools import Logger

    from modelfn.config import Settings
    from modelfn.runtime.http import Api, Request, Response
    from modelfn.runtime.repository import Repository

SSE = "text/event-stream; charset=utf-8"
#: request fields the OpenAI API has and modelfn does not do: refused where they ask for
#: something (n > 1, tools, ...), rather than silently ignored
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False,
               "tools": None, "tool_choice": None, "functions": None, "suffix": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None}


def event(data: Any) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"),
                                                         ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _body(req: Request, settings: Settings) -> dict[str, Any]:
    raw = body_bytes(req.body, req.is_base64_encoded, settings.max_body_bytes)
    check_media_type(req.headers.get("content-type"))
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise MalformedRequest("the request body must be a JSON object")
    return doc


def _decoder(repo: Repository, name: str, version: str | None) -> Decoder:
    model = repo.get(name, version)
    if not isinstance(model, Decoder):
        raise InvalidInput(f"model {name!r} is a {model.manifest.task} model; generation "
                           f"routes serve {TASK} models (use /v2/models/{name}/infer)")
    return model


def _unsupported(body: dict[str, Any]) -> None:
    for key, default in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and value != default and not (key == "logprobs" and value is False):
            raise InvalidInput(f"{key!r} = {json.dumps(value)[:60]} is not supported by "
                               "modelfn (it serves one greedy or sampled completion per "
                               "request)")


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise InvalidInput(f"{key!r} must be a string" + ("" if key in body else
                                                          ", and is missing"))
    return value


def _model_ref(body: dict[str, Any]) -> tuple[str, str | None]:
    name, _, version = _string(body, "model").partition(":")
    return name, version or None


def _prompt(decoder: Decoder, body: dict[str, Any]) -> list[int]:
    """/v1/completions' ``prompt``: a string, a list of one string, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return decoder.encode(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < decoder.vocab for t in prompt):
            raise InvalidInput(f"'prompt' token ids must lie in [0, {decoder.vocab - 1}]")
        return [int(t) for t in prompt]
    raise InvalidInput("'prompt' must be a string, a list of one string, or a list of "
                       "token ids (one prompt per request)")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidInput(f"messages[{i}] must be an object with a 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise InvalidInput(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content must be a string or text parts")
        out.append({"role": m["role"], "content": content})
    return out


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class Stream:
    """The events of one streamed generation: ``frame(delta)`` makes each event,
    ``tail(last)`` what follows the last piece, ``error(exc)`` the event that ends a
    stream that failed; ``log`` is told how it ended."""

    def __init__(self, deltas: Iterator[Delta], frame: Callable[[Delta], list[bytes]],
                 error: Callable[[str], list[bytes]],
                 done: Callable[[Delta | None, float], None]) -> None:
        self.deltas, self.frame, self.error, self.done = deltas, frame, error, done

    def __iter__(self) -> Iterator[bytes]:
        started, last = time.perf_counter(), None
        try:
            for last in self.deltas:
                yield from self.frame(last)
        except ModelfnError as exc:
            yield from self.error(exc.message)
        except Exception as exc:  # noqa: BLE001 - after the first byte, an event says it
            yield from self.error(f"generation failed: {type(exc).__name__}")
        finally:
            close = getattr(self.deltas, "close", None)
            if close is not None:
                close()  # a client that went away: the decoding stops here
            self.done(last, time.perf_counter() - started)


def _streamed(chunks: Iterator[bytes]) -> Response:
    from modelfn.runtime.http import Response

    return Response(200, None, {"Content-Type": SSE, "Cache-Control": "no-cache",
                                "X-Accel-Buffering": "no"}, stream=chunks)


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) of an OpenAI request."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInput("'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidInput("'stream_options' must be an object")
    return stream, options.get("include_usage") is True


class OpenAIChunks:
    """The events of a streamed OpenAI completion (``chat``: chat.completion.chunk)."""

    def __init__(self, head: dict[str, Any], chat: bool, prompt_tokens: int,
                 usage: bool) -> None:
        self.head, self.chat, self.prompt_tokens, self.usage = head, chat, prompt_tokens, usage
        self.first = True

    def choice(self, text: str, finish: str | None) -> dict[str, Any]:
        c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if not self.chat:
            c["text"] = text
            return c
        delta: dict[str, Any] = {"content": text} if text or finish is None else {}
        if self.first:
            delta, self.first = {"role": "assistant", **delta}, False
        c["delta"] = delta
        return c

    def chunk(self, text: str, finish: str | None) -> bytes:
        extra = {"usage": None} if self.usage else {}
        return event({**self.head, "choices": [self.choice(text, finish)], **extra})

    def frame(self, d: Delta) -> list[bytes]:
        if d.finish is None:
            return [self.chunk(d.text, None)]
        out = [self.chunk(d.text, None)] if d.text else []
        out.append(self.chunk("", d.finish))
        if self.usage:
            out.append(event({**self.head, "choices": [],
                              "usage": _usage(self.prompt_tokens, d.tokens)}))
        return [*out, event("[DONE]")]

    @staticmethod
    def error(message: str) -> list[bytes]:
        return [event({"error": {"message": message, "type": "server_error", "param": None,
                                 "code": None}})]


class Routes:
    """The generation routes of one API (see the module's doc)."""

    def __init__(self, repo: Repository, settings: Settings, logger: Logger) -> None:
        self.repo, self.settings, self.logger = repo, settings, logger

    def finished(self, name: str, version: str, route: str, prompt: int
                 ) -> Callable[[Delta | None, float], None]:
        def done(last: Delta | None, seconds: float) -> None:
            self.logger.info("generation", extra={
                "model": name, "version": version, "route": route, "prompt_tokens": prompt,
                "completion_tokens": last.tokens if last else 0,
                "finish_reason": (last.finish if last else None) or "cancelled",
                "seconds": round(seconds, 3)})
        return done

    # --- the Open Inference Protocol's generate extension --------------------------------

    def generate(self, req: Request, name: str, version: str | None, stream: bool
                 ) -> Response:
        from modelfn.runtime.http import json_response

        body = _body(req, self.settings)
        decoder = _decoder(self.repo, name, version)
        text = _string(body, "text_input")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        opts = sampling(params, decoder.generation)
        ids = decoder.encode(text)
        decoder.check(ids, opts)
        head = {"model_name": name, "model_version": decoder.version}
        if "id" in body:
            head["id"] = str(body["id"])
        done = self.finished(name, decoder.version, "generate_stream" if stream else "generate",
                             len(ids))
        if not (stream or params.get("stream") is True):
            text_out, finish, made = decoder.complete(ids, opts)
            done(Delta("", made, finish), 0)
            return json_response(200, {**head, "text_output": text_out, "finish_reason": finish,
                                       "usage": _usage(len(ids), made)})

        def frame(d: Delta) -> list[bytes]:
            if d.finish is None:
                return [event({**head, "text_output": d.text, "done": False})]
            return [event({**head, "text_output": d.text, "done": True,
                           "finish_reason": d.finish, "usage": _usage(len(ids), d.tokens)})]

        def error(message: str) -> list[bytes]:
            return [event({**head, "error": message, "done": True})]

        return _streamed(iter(Stream(decoder.stream(ids, opts), frame, error, done)))

    # --- OpenAI-compatible ----------------------------------------------------------------

    def openai(self, req: Request, chat: bool) -> Response:
        from modelfn.runtime.http import json_response

        body = _body(req, self.settings)
        name, version = _model_ref(body)
        decoder = _decoder(self.repo, name, version)
        _unsupported(body)
        opts: Sampling = sampling(body, decoder.generation)
        ids = decoder.encode(decoder.chat_prompt(_messages(body))) if chat \
            else _prompt(decoder, body)
        decoder.check(ids, opts)
        stream, usage = _stream_options(body)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                "object": kind, "created": int(time.time()), "model": name,
                "system_fingerprint": f"modelfn-{name}-{decoder.version}"}
        done = self.finished(name, decoder.version, kind, len(ids))
        if stream:
            chunks = OpenAIChunks({**head, "object": "chat.completion.chunk" if chat else kind},
                                  chat, len(ids), usage)
            return _streamed(iter(Stream(decoder.stream(ids, opts), chunks.frame,
                                         chunks.error, done)))
        text, finish, made = decoder.complete(ids, opts)
        done(Delta("", made, finish), 0)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return json_response(200, {**head, "choices": [choice], "usage": _usage(len(ids), made)})

    def models(self) -> list[str]:
        return [m["name"] for m in self.repo.index() if _is_decoder(self.repo, m["name"])]


def register(app: Api, repo: Repository, settings: Settings, logger: Logger) -> None:
    from modelfn.runtime.http import json_response

    routes = Routes(repo, settings, logger)

    @app.route("POST", "/v2/models/<name>/generate",
               "/v2/models/<name>/versions/<version>/generate")
    def generate(req: Request, name: str, version: str | None = None) -> Response:
        return routes.generate(req, name, version, stream=False)

    @app.route("POST", "/v2/models/<name>/generate_stream",
               "/v2/models/<name>/versions/<version>/generate_stream")
    def generate_stream(req: Request, name: str, version: str | None = None) -> Response:
        return routes.generate(req, name, version, stream=True)

    @app.route("POST", "/v1/completions")
    def completions(req: Request) -> Response:
        return routes.openai(req, chat=False)

    @app.route("POST", "/v1/chat/completions")
    def chat_completions(req: Request) -> Response:
        return routes.openai(req, chat=True)

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "modelfn"}

    @app.route("GET", "/v1/models")
    def list_models(req: Request) -> Response:
        return json_response(200, {"object": "list", "data": [card(n) for n in routes.models()]})

    @app.route("GET", "/v1/models/<name>")
    def get_model(req: Request, name: str) -> Response:
        if not _is_decoder(repo, name):
            raise ModelNotFound(f"no text-generation model {name!r}")
        return json_response(200, card(name))


def _is_decoder(repo: Repository, name: str) -> bool:
    try:
        return repo.manifest(name).task == TASK
    except ModelfnError:
        return False
