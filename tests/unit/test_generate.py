"""Generative decoders of two families (Llama, Qwen2), random-init folders with their own
tokenizers written here: built through onnxruntime-genai's model builder, gated, and
served over the generate extension and the OpenAI-compatible routes, through the openai
SDK, streamed, within every limit, and through Lambda's streaming response mode."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from modelfn.errors import ConfigError, ExportParityError, UsageError
from modelfn.export.build import build
from modelfn.generate.lambda_stream import DELIMITER, PRELUDE_TYPE
from modelfn.generate.lambda_stream import serve as lambda_serve
from modelfn.generate.routes import Stream
from modelfn.local.apigw import http_event, make_server
from modelfn.project import load_project
from modelfn.store import open_store
from tests import own_models
from tests.conftest import write_project
from tests.unit.test_api_handler import fresh_api

PROMPTS = ["def main(args):\n    ", "import os\nimport sys\n", "class Parser:\n    def ",
           "    return self."]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two decoder folders, built into one store: llama at every precision the gates
    try (auto: which ships depends on the measured speed) and again at fp32 (llama-fp32),
    qwen2 at fp32; and a llama folder without a chat template."""
    root = tmp_path_factory.mktemp("gen")
    own_models.tiny_decoder(root, "llama", seed=1)
    own_models.tiny_decoder(root, "qwen2", seed=2)
    plain = own_models.tiny_decoder(root / "plain", "llama", chat=False, seed=3)
    (root / "prompts.txt").write_text("\n\n".join(PROMPTS))
    config = write_project(root, {
        "llama": {"source": "transformers", "task": "text-generation", "path": "tiny-llama",
                  "prompts": "prompts.txt", "max_tokens": 100, "max_prompt_tokens": 64},
        "llama-fp32": {"source": "transformers", "task": "text-generation",
                       "path": "tiny-llama"},
        "qwen": {"source": "transformers", "task": "text-generation", "path": "tiny-qwen2"},
        "plain": {"source": "transformers", "task": "text-generation",
                  "path": str(plain), "max_seconds": 0.001},
    })
    store = open_store(str(root / "store"))
    project = load_project(config)
    logs: dict[str, list[str]] = {}
    for name, precision in (("llama", "auto"), ("llama-fp32", "fp32"), ("qwen", "fp32"),
                            ("plain", "fp32")):
        logs[name] = []
        build(name, store, project=project, precision=precision, log=logs[name].append)
    (root / "build.json").write_text(json.dumps(logs))
    return root


@pytest.fixture(scope="module")
def api(root: Path) -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        return fresh_api(root / "store", mp)


@pytest.fixture(scope="module")
def base_url(api: ModuleType) -> Iterator[str]:
    server = make_server(api.stream_handler, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def transformers_text(folder: Path, prompt: str, tokens: int) -> str:
    """transformers' greedy continuation of ``prompt``, decoded by the folder's own
    tokenizer: the reference the served text must equal."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=tokens, eos_token_id=0, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    if 0 in new:
        new = new[:new.index(0)]
    prompt_ids = ids[0].tolist()
    return str(tok.decode(prompt_ids + new))[len(tok.decode(prompt_ids)):]


def post(base_url: str, path: str, body: Any) -> tuple[int, Any]:
    import requests

    r = requests.post(base_url + path, json=body, timeout=60)
    return r.status_code, r.json()


# --- build and gates --------------------------------------------------------------------------

def test_each_family_builds_and_ships_the_gated_precision(root: Path, api: ModuleType) -> None:
    logs = json.loads((root / "build.json").read_text())
    for name in ("llama", "qwen"):
        text = "\n".join(logs[name])
        assert "greedy gate passed" in text, text
        manifest = api.repo.manifest(name)
        assert manifest.task == "text-generation"
        assert manifest.platform == "onnxruntime_genai"
        assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= set(manifest.files)
        gate = manifest.export["greedy_gate"]
        assert gate["identical"] == gate["prompts"] > 0
        assert manifest.evaluation["perplexity"] > 1
        assert manifest.evaluation["decode_tokens_per_second"] > 0
    # auto tried both weight-only precisions, each with its figures and a verdict
    llama = api.repo.manifest("llama").optimization
    tried = {c["precision"]: c for c in llama["candidates"]}
    assert set(tried) == {"int4", "int8"}
    for c in tried.values():
        assert c["passed"] == (not c["reasons"])
        assert 0 <= c["greedy_agreement"] <= 1 and c["perplexity"] > 1
    assert llama["shipped"] in {"fp32", *(p for p, c in tried.items() if c["passed"])}
    assert api.repo.manifest("qwen").optimization["candidates"] == []


# fp32 bundles: a quantized one (what auto may ship) need not give transformers' tokens
@pytest.mark.parametrize("name,family", [("llama-fp32", "llama"), ("qwen", "qwen2")])
def test_served_greedy_text_is_transformers_greedy_text(root: Path, client: Any, name: str,
                                                        family: str) -> None:
    for prompt in PROMPTS[:3]:
        got = client.completions.create(model=name, prompt=prompt, max_tokens=24,
                                        temperature=0)
        want = transformers_text(root / f"tiny-{family}", prompt, 24)
        assert got.choices[0].text == want
        assert got.usage.completion_tokens <= 24


def test_a_quantized_candidate_that_misses_its_gate_is_refused_when_asked_for(
        root: Path) -> None:
    config = write_project(root, {"strict": {
        "source": "transformers", "task": "text-generation", "path": "tiny-llama",
        "min_greedy_agreement": 1.0, "min_speedup": 100}})
    with pytest.raises(ExportParityError, match="int4.*fails its gates|fails its gates"):
        build("strict", open_store(str(root / "store-strict")), project=load_project(config),
              precision="int4", log=lambda _: None)
    assert not (root / "store-strict" / "models" / "strict").exists()


def test_project_keys_of_generation_belong_to_text_generation(tmp_path: Path) -> None:
    config = write_project(tmp_path, {"enc": {"source": "transformers", "path": ".",
                                              "task": "feature-extraction",
                                              "max_perplexity_increase": 0.1}})
    with pytest.raises(ConfigError, match="max_perplexity_increase.*text-generation"):
        load_project(config)


def test_int4_is_refused_for_a_model_that_is_not_a_decoder(tmp_path: Path) -> None:
    own_models.iris_mlp(tmp_path)
    config = own_models.project(tmp_path)
    name = next(iter(load_project(config).models))
    with pytest.raises(UsageError, match="int4 is weight-only quantization"):
        build(name, open_store(str(tmp_path / "s")), project=load_project(config),
              precision="int4", log=lambda _: None)


# --- OpenAI-compatible, through the openai SDK ------------------------------------------------

def test_chat_stream_through_the_openai_sdk(client: Any) -> None:
    messages = [{"role": "user", "content": "write a parser"}]
    whole = client.chat.completions.create(model="llama", messages=messages, max_tokens=30)
    chunks = list(client.chat.completions.create(
        model="llama", messages=messages, max_tokens=30, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens > 5  # the template's tokens too
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    assert len(chunks) > 3  # streamed in pieces, not one


def test_completion_stream_through_the_openai_sdk(client: Any) -> None:
    pieces = list(client.completions.create(model="qwen", prompt=PROMPTS[0], max_tokens=20,
                                            stream=True))
    whole = client.completions.create(model="qwen", prompt=PROMPTS[0], max_tokens=20)
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(p.usage is None for p in pieces)  # no usage chunk unless asked for


def test_models_list_names_the_decoders(client: Any) -> None:
    assert {m.id for m in client.models.list()} == {"llama", "llama-fp32", "qwen",
                                                       "plain"}
    assert client.models.retrieve("qwen").id == "qwen"


def test_a_stop_string_ends_the_text_before_it(client: Any) -> None:
    whole = client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=40).choices[0]
    assert len(whole.text) > 12
    stop = whole.text[6:9]
    cut = client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=40, stop=[stop])
    assert cut.choices[0].text == whole.text[:whole.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="llama", prompt=PROMPTS[1], max_tokens=40, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_sampling_with_a_seed_repeats_and_differs_by_seed(client: Any) -> None:
    def sample(seed: int) -> str:
        return str(client.completions.create(model="llama", prompt=PROMPTS[2], max_tokens=30,
                                             temperature=1.0, top_p=0.95,
                                             extra_body={"top_k": 100},
                                             seed=seed).choices[0].text)

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1
    greedy = client.completions.create(model="llama", prompt=PROMPTS[2], max_tokens=30)
    assert greedy.choices[0].text == client.completions.create(
        model="llama", prompt=PROMPTS[2], max_tokens=30, temperature=0).choices[0].text


def test_token_id_prompts_are_the_text_they_encode(client: Any, api: ModuleType) -> None:
    ids = api.repo.get("llama").encode(PROMPTS[0])
    assert client.completions.create(model="llama", prompt=ids, max_tokens=10).choices[0].text \
        == client.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=10
                                     ).choices[0].text


# --- limits: each a 4xx with a clear line, before any token ----------------------------------

def test_every_limit_is_a_clear_4xx(client: Any, base_url: str) -> None:
    import openai

    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"prompt": "def " * 200}, openai.APIStatusError, "takes at most 64"),
        ({"max_tokens": 101}, openai.UnprocessableEntityError, "at most 100 tokens"),
        ({"max_tokens": 0}, openai.UnprocessableEntityError, "max_tokens"),
        ({"temperature": 3}, openai.UnprocessableEntityError, "temperature"),
        ({"top_p": 0}, openai.UnprocessableEntityError, "top_p"),
        ({"seed": -1}, openai.UnprocessableEntityError, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.UnprocessableEntityError, "stop"),
        ({"n": 2}, openai.UnprocessableEntityError, "'n'"),
        ({"prompt": ""}, openai.UnprocessableEntityError, "empty"),
        ({"prompt": [10 ** 6]}, openai.UnprocessableEntityError, "token ids"),
        ({"model": "nope"}, openai.NotFoundError, "nope"),
    ]
    for extra, kind, words in cases:
        body = {"model": "llama", "prompt": "def f", "max_tokens": 5, **extra}
        with pytest.raises(kind) as caught:
            client.completions.create(**body)
        assert 400 <= caught.value.status_code < 500
        assert words in str(caught.value.body["message"]), (extra, caught.value.body)
    with pytest.raises(openai.UnprocessableEntityError, match="top_k"):
        client.completions.create(model="llama", prompt="x", extra_body={"top_k": -1})
    # the prompt limit is 413, named as such
    status, body = post(base_url, "/v1/completions",
                        {"model": "llama", "prompt": "def " * 200, "max_tokens": 5})
    assert status == 413 and "prompt is" in body["error"]["message"]
    # a folder without a chat template: chat refused, completions served
    with pytest.raises(openai.UnprocessableEntityError, match="no chat template"):
        client.chat.completions.create(model="plain", messages=[{"role": "user",
                                                                 "content": "hi"}])
    # time: the build measured tokens/s; a request that would take longer than the
    # model's max_seconds is refused before it starts
    with pytest.raises(openai.UnprocessableEntityError, match="would take about"):
        client.completions.create(model="plain", prompt="x", max_tokens=200)
    # malformed bodies
    for body in ({"model": "llama"}, {"model": "llama", "messages": []},
                 {"model": "llama", "messages": [{"role": "user", "content": 3}]},
                 {"model": "llama", "messages": [{"role": "user", "content": "x"}],
                  "stream": "yes"}):
        status, out = post(base_url, "/v1/chat/completions", body)
        assert status == 422, out


# --- the Open Inference Protocol's generate extension ----------------------------------------

def test_generate_and_generate_stream(base_url: str, client: Any) -> None:
    import requests

    want = client.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=16).choices[0]
    status, out = post(base_url, "/v2/models/llama/generate",
                       {"text_input": PROMPTS[0], "parameters": {"max_tokens": 16}})
    assert status == 200 and out["text_output"] == want.text
    assert out["model_name"] == "llama" and out["finish_reason"] == want.finish_reason
    r = requests.post(f"{base_url}/v2/models/llama/versions/1/generate_stream",
                      json={"text_input": PROMPTS[0], "parameters": {"max_tokens": 16}},
                      stream=True, timeout=60)
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = [json.loads(line[len("data: "):]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == want.text
    assert [e["done"] for e in events][-1] is True and not any(e["done"] for e in events[:-1])
    assert events[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]
    status, out = post(base_url, "/v2/models/llama/generate", {"parameters": {}})
    assert status == 422 and "text_input" in out["error"]
    status, out = post(base_url, "/v2/models/llama/generate",
                       {"text_input": "x", "parameters": {"max_tokens": 1000}})
    assert status == 422 and "at most 100" in out["error"]


def test_infer_route_generates_per_row(base_url: str, client: Any) -> None:
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2],
                        "data": PROMPTS[:2]}], "parameters": {"max_tokens": 12}}
    status, out = post(base_url, "/v2/models/llama/infer", body)
    assert status == 200, out
    texts = dict((o["name"], o["data"]) for o in out["outputs"])
    for prompt, text in zip(PROMPTS[:2], texts["text_output"], strict=True):
        assert text == client.completions.create(model="llama", prompt=prompt,
                                                 max_tokens=12).choices[0].text
    assert set(texts["finish_reason"]) <= {"stop", "length"}


# --- streams that end early ---------------------------------------------------------------------

def test_a_client_that_disconnects_stops_the_decoding(base_url: str, api: ModuleType) -> None:
    decoder = api.repo.get("llama")
    before = decoder.stats.cancelled
    host, port = base_url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": "llama", "prompt": "def f", "max_tokens": 100, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.fp.readline()  # the first chunk's size line: decoding has begun
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 10
    while decoder.stats.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert decoder.stats.cancelled == before + 1
    assert decoder.stats.last_tokens < 100


def test_an_error_after_the_first_event_ends_the_stream_with_an_error_event() -> None:
    from modelfn.generate.decoder import Delta

    closed: list[bool] = []

    def deltas() -> Iterator[Delta]:
        try:
            yield Delta("a", 1)
            raise RuntimeError("kernel failed")
        finally:
            closed.append(True)

    ended: list[Any] = []
    events = list(Stream(deltas(), lambda d: [d.text.encode()],
                         lambda m: [f"error:{m}".encode()],
                         lambda last, s: ended.append(last)))
    assert events == [b"a", b"error:generation failed: RuntimeError"]
    assert closed == [True] and ended[0].text == "a"


# --- Lambda: the function's own Runtime API loop, response mode streaming -------------------

class RuntimeApi(http.server.BaseHTTPRequestHandler):
    """Lambda's Runtime API, as far as one streamed invocation needs."""

    protocol_version = "HTTP/1.1"
    events: list[dict[str, Any]] = []
    responses: list[tuple[dict[str, str], bytes]] = []

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps(self.events.pop(0)).encode()
        self.send_response(200)
        self.send_header("Lambda-Runtime-Aws-Request-Id", f"req-{len(self.events)}")
        self.send_header("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 60000))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        data = b""
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            while (size := int(self.rfile.readline().strip(), 16)):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).responses.append((dict(self.headers.items()), data))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_lambda_streaming_runtime_loop(api: ModuleType, client: Any) -> None:
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 20, "stream": True}
    RuntimeApi.events = [
        http_event("POST", "/v1/chat/completions", {"content-type": "application/json"},
                   json.dumps(body).encode()),
        http_event("GET", "/v2/health/live", {}, b""),
    ]
    RuntimeApi.responses = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RuntimeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        import sys

        sys.modules["app_stream_under_test"] = api
        lambda_serve(f"127.0.0.1:{server.server_address[1]}",
                     "app_stream_under_test.stream_handler", invocations=2)
    finally:
        server.shutdown()
        server.server_close()
    (headers, streamed), (_, health) = RuntimeApi.responses
    assert headers["Lambda-Runtime-Function-Response-Mode"] == "streaming"
    assert headers["Content-Type"] == PRELUDE_TYPE
    prelude, _, sse = streamed.partition(DELIMITER)
    assert json.loads(prelude) == {"statusCode": 200, "headers": {
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"}}
    events = [line[len(b"data: "):] for line in sse.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                   for e in events[:-1])
    whole = client.chat.completions.create(model="llama", messages=body["messages"],
                                           max_tokens=20)
    assert text == whole.choices[0].message.content
    prelude, _, rest = health.partition(DELIMITER)
    assert json.loads(prelude)["statusCode"] == 200 and json.loads(rest) == {"live": True}


def test_buffered_path_gathers_the_stream(api: ModuleType) -> None:
    """The HTTP API (no streaming): the same events, in one response."""
    from modelfn.local.lambda_context import LocalContext

    event = http_event("POST", "/v1/completions", {"content-type": "application/json"},
                       json.dumps({"model": "qwen", "prompt": "x = ", "max_tokens": 8,
                                   "stream": True}).encode())
    result = api.lambda_handler(event, LocalContext())
    assert result["statusCode"] == 200
    assert result["headers"]["Content-Type"].startswith("text/event-stream")
    assert result["body"].rstrip().endswith("data: [DONE]")
    assert np.all([c.startswith("data: ") for c in result["body"].strip().split("\n\n")])


def test_an_s3_batch_style_file_of_prompts_generates_each_line(root: Path, client: Any) -> None:
    """A JSONL file of prompts through the batch path (what the S3 batch function runs):
    each line's text_output is the completion the API gives for it."""
    import subprocess
    import sys

    lines = root / "prompts.jsonl"
    lines.write_text("".join(json.dumps({"id": str(i), "inputs": p}) + "\n"
                             for i, p in enumerate(PROMPTS[:3])))
    done = subprocess.run([str(Path(sys.executable).with_name("modelfn")), "batch", str(lines),
                           "--model", "llama", "--store", str(root / "store"), "--quiet"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    out = [json.loads(x) for x in (root / "prompts.predictions.jsonl").read_text()
           .splitlines()]
    assert [o["id"] for o in out] == ["0", "1", "2"]
    for o, prompt in zip(out, PROMPTS[:3], strict=True):
        want = client.completions.create(model="llama", prompt=prompt).choices[0]
        assert o["outputs"]["text_output"] == want.text
        assert o["outputs"]["finish_reason"] == want.finish_reason


# --- asynchronous jobs and S3 batch files, on moto as deployed --------------------------------

@pytest.fixture
def stack(root: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    import uuid

    import boto3

    from tests.integration.test_async import Stack

    for name in ("MODELFN_STORE", "MODELFN_IDEMPOTENCY_TABLE", "MODELFN_JOBS_STORE"):
        monkeypatch.setenv(name, "")
    bucket = f"gen-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return Stack(bucket, str(root / "store"))


def test_an_async_generation_job_answers_what_the_synchronous_call_does(stack: Any) -> None:
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2],
                        "data": PROMPTS[:2]}], "parameters": {"max_tokens": 12}}
    status, _, sync = stack.call("POST", "/v2/models/llama/infer", body)
    assert status == 200, sync
    status, _, accepted = stack.call("POST", "/v2/models/llama/infer", body, prefer=True)
    assert status == 202 and accepted["status"] == "queued", accepted
    assert stack.run_queue() == 1
    status, _, done = stack.call("GET", accepted["location"])
    assert status == 200 and done["status"] == "succeeded", done
    assert done["response"] == sync
    # a sampling parameter out of range is refused at once, and no job is made
    body["parameters"] = {"temperature": -1}
    status, _, refused = stack.call("POST", "/v2/models/llama/infer", body, prefer=True)
    assert status == 422 and "temperature" in refused["error"], refused
    assert stack.objects("async/") == [k for k in stack.objects("async/")
                                       if accepted["id"] in k]


def test_a_jsonl_upload_of_prompts_runs_as_batch_lines(stack: Any, client: Any) -> None:
    import requests

    lines = [json.dumps({"id": i, "inputs": p}) for i, p in enumerate(PROMPTS[:3])]
    lines.insert(1, json.dumps({"id": "bad", "inputs": 7}))
    done = stack.jsonl_job("llama", lines)
    assert done["status"] == "succeeded", done
    assert done["summary"] == {"lines": 4, "predictions": 3, "errors": 1}
    got = requests.get(done["result"]["url"], timeout=30)
    # generated text is any UTF-8: the download says so, and a client decodes it as such
    assert got.headers["Content-Type"] == "application/jsonl; charset=utf-8"
    out = [json.loads(line) for line in got.text.splitlines()]
    assert [o["id"] for o in out] == [0, "bad", 1, 2] and "error" in out[1]
    for o, prompt in zip([out[0], *out[2:]], PROMPTS[:3], strict=True):
        want = client.completions.create(model="llama", prompt=prompt).choices[0]
        assert o["outputs"]["text_output"] == want.text
