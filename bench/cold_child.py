"""One cold start, in the process that runs this file (started fresh by bench/cold_start.py).

Nothing but the standard library is imported before the clock starts; each phase
is timed as it happens and one JSON line goes to stdout:
``{"t0": epoch at first line, "phases": {name: seconds}, "answered": epoch, ...}``.
The parent adds the interpreter's own start (spawn → t0).

    python cold_child.py modelfn TASK_ROOT LAYER EVENT.json [text]   (models: $MODELFN_STORE)
    python cold_child.py floor   LAYER MODEL.onnx [TOKENIZER.json]
    python cold_child.py torch-digits CHECKPOINT.pt EVENT.json MODEL.py:CALLABLE
    python cold_child.py torch-minilm MODEL_DIR EVENT.json
"""

import time

T0 = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

phases: dict[str, float] = {}
_last = [time.perf_counter()]


def mark(name: str) -> None:
    now = time.perf_counter()
    phases[name] = now - _last[0]
    _last[0] = now


class Context:
    """The attributes a Lambda context has that the handler and Powertools read."""

    function_name = "modelfn-bench"
    function_version = "$LATEST"
    memory_limit_in_mb = 1769
    invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:modelfn-bench"
    aws_request_id = "00000000-0000-0000-0000-000000000001"
    log_group_name = "/aws/lambda/modelfn-bench"
    log_stream_name = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries
    that over from the parent at fork, so a child of a large benchmark process would
    report the parent's size."""
    with open("/proc/self/status") as fh:  # noqa: PTH123
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def modelfn(task_root: str, layer: str, event_path: str, text: str = "") -> dict:
    # the Lambda runtime's search path: function code, then the layer
    sys.path[:0] = [task_root, *layer.split(os.pathsep)]
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    if text:
        import tokenizers  # noqa: F401
    mark("import numpy, onnxruntime" + (", tokenizers" if text else ""))
    import aws_lambda_powertools  # noqa: F401  (Logger, Metrics)

    import modelfn.runtime.http  # noqa: F401
    mark("import Powertools, modelfn.runtime")
    import app  # module init: settings, repository, MODELFN_PRELOAD models (verify + session)
    mark("handler module init (model load)")
    with open(event_path) as fh:  # noqa: PTH123 - no pathlib import in the timed phases
        event = json.load(fh)
    response = app.lambda_handler(event, Context())
    mark("first invocation")
    if response["statusCode"] != 200:
        raise SystemExit(f"first invocation answered {response['statusCode']}: "
                         f"{response['body'][:300]}")
    return {"modules": sorted(m for m in ("boto3", "botocore", "torch", "tokenizers")
                              if m in sys.modules)}


def floor(layer: str, model_path: str, tokenizer_path: str = "") -> dict:
    sys.path[:0] = [layer]
    import numpy as np
    import onnxruntime as ort
    if tokenizer_path:
        from tokenizers import Tokenizer
    mark("import numpy, onnxruntime" + (", tokenizers" if tokenizer_path else ""))
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    if tokenizer_path:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    mark("session (+ tokenizer)")
    if tokenizer_path:
        enc = tokenizer.encode("How do I reset my password?")
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.array([enc.attention_mask], dtype=np.int64)
        states = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    else:
        name = session.get_inputs()[0].name
        session.run(None, {name: np.zeros((1, 1, 8, 8), dtype=np.float32)})
    mark("first run")
    return {"modules": sorted(m for m in ("boto3", "torch") if m in sys.modules)}


def _body(event_path: str) -> dict:
    with open(event_path) as fh:  # noqa: PTH123
        return json.loads(json.load(fh)["body"])


def torch_digits(checkpoint: str, event_path: str, module: str) -> dict:
    """What the common samples do: import torch, rebuild the module (``module``: the
    example's ``file.py:callable``), load its weights, run it eagerly in the handler."""
    import importlib.util

    import torch

    path, _, attr = module.rpartition(":")
    spec = importlib.util.spec_from_file_location("digits_model", path)
    assert spec is not None and spec.loader is not None
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    mark("import torch")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = getattr(code, attr)(n_classes=ckpt["n_classes"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    mark("load weights")
    body = _body(event_path)
    pixels = body["inputs"][0]
    with torch.inference_mode():
        x = torch.tensor(pixels["data"], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        probs = torch.softmax(model(x), dim=-1)
    json.dumps({"label": [ckpt["labels"][i] for i in probs.argmax(-1).tolist()],
                "probabilities": probs.tolist()})
    mark("first invocation")
    return {}


def torch_minilm(model_dir: str, event_path: str) -> dict:
    """The usual sentence-transformers handler."""
    from sentence_transformers import SentenceTransformer
    mark("import torch, sentence-transformers")
    model = SentenceTransformer(model_dir, device="cpu")
    mark("load model")
    texts = _body(event_path)["inputs"][0]["data"]
    vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    json.dumps({"embedding": vectors.tolist()})
    mark("first invocation")
    return {}


MODES = {"modelfn": modelfn, "floor": floor, "torch-digits": torch_digits,
         "torch-minilm": torch_minilm}

if __name__ == "__main__":
    extra = MODES[sys.argv[1]](*sys.argv[2:])
    answered = time.time()
    print(json.dumps({"t0": T0, "answered": answered, "phases": phases,
                      "max_rss_mb": peak_rss_mb(),
                      "python": sys.version.split()[0], **extra}))
