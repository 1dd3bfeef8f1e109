"""llama.cpp on a transformers Llama folder, run by bench.generation in llama-cpp-python's
own environment (bench/.cache/venv-llama-cpp): the folder's weights written as a GGUF
(F32, with the tokenizer's vocabulary and merges), quantized by llama.cpp itself to Q8_0
and Q4_0, then each decoded greedily from the same prompt token ids modelfn decodes.

    python llama_cpp_child.py FOLDER WORK '[prompt ids]' TOKENS   -> WORK/llama-cpp.json
    python llama_cpp_child.py --cold GGUF '[prompt ids]' START    -> seconds to a token

llama.cpp logs to stdout; the last line printed is the answer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def first_token(path: str, prompt: list[int], start: float) -> float:
    """A cold process: import llama.cpp, load the GGUF, decode one token."""
    llm = load(path)
    llm.eval(prompt)
    greedy(llm)
    return time.time() - start


def load(path: str) -> Any:
    import llama_cpp

    return llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=2,
                           n_threads_batch=2, verbose=False)


def greedy(llm: Any) -> int:
    import numpy as np

    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def decode(llm: Any, prompt: list[int], tokens: int) -> dict[str, Any]:
    """Best of 3: time to first token (the prompt and one token) and decode tokens/s after
    it, end of sequence ignored; the greedy token ids of the last run."""
    best_first, best_rate, ids = float("inf"), 0.0, []
    for _ in range(3):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        ids = [greedy(llm)]
        first = time.perf_counter()
        while len(ids) < tokens:
            llm.eval([ids[-1]])
            ids.append(greedy(llm))
        end = time.perf_counter()
        best_first = min(best_first, first - started)
        best_rate = max(best_rate, (tokens - 1) / max(end - first, 1e-9))
    return {"ttft_ms": round(best_first * 1000, 2),
            "decode_tokens_per_second": round(best_rate, 1), "ids": ids}


def permute(weights: Any, heads: int) -> Any:
    """transformers' rotary layout (halves) back to llama.cpp's (pairs), as its converter."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(folder: Path, out: Path) -> None:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    hidden = config["hidden_size"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    rows = tensors["model.embed_tokens.weight"].shape[0]
    vocab = tokenizer["model"]["vocab"]
    special = {t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    names = {i: t for t, i in vocab.items()}
    names.update({t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])})
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_vocab_size(rows)
    writer.add_token_list([names.get(i, f"[PAD{i}]") for i in range(rows)])
    writer.add_token_types([
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in names
        else gguf.TokenType.UNUSED for i in range(rows)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config.get("bos_token_id") or 0)
    writer.add_eos_token_id(config.get("eos_token_id") or 0)
    writer.add_add_bos_token(False)

    names_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    for name, value in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        data = value.astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = permute(data, heads)
        elif name.endswith("k_proj.weight"):
            data = permute(data, kv_heads)
        target = names_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise SystemExit(f"no GGUF name for {name}")
        writer.add_tensor(target, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(source: Path, out: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {source} to {out.name}")


def weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes a token reads: all tensors but the embedding table, file bytes)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    per_token = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
    return per_token, path.stat().st_size


def main() -> None:
    import llama_cpp

    if sys.argv[1] == "--cold":
        print(first_token(sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])))
        return
    folder, work = Path(sys.argv[1]), Path(sys.argv[2])
    prompt, tokens = json.loads(sys.argv[3]), int(sys.argv[4])
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "model-f32.gguf"
    write_gguf(folder, f32)
    files = {"fp32": ("F32", f32)}
    for precision, (label, ftype) in {
            "int8": ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
            "int4": ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)}.items():
        files[precision] = (label, work / f"model-{label.lower()}.gguf")
        quantize(f32, files[precision][1], ftype)
    out = {}
    for precision, (label, path) in files.items():
        llm = load(str(path))
        per_token, size = weight_bytes(path)
        out[precision] = {"type": label, **decode(llm, prompt, tokens),
                          "weight_bytes_per_token": per_token, "bytes": size,
                          "path": str(path), "version": llama_cpp.__version__}
        del llm
        print(f"  llama.cpp {label}: {out[precision]['decode_tokens_per_second']} tokens/s",
              file=sys.stderr, flush=True)
    (work / "llama-cpp.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
