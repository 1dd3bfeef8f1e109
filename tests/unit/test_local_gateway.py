"""The local API gateway's socket: Nagle's algorithm off, and each response (headers
and body) in one write, so that a keep-alive client never waits out a delayed ACK
(~40 ms a request; the latency itself is measured by bench/load.py)."""

from __future__ import annotations

import socket
import threading
from typing import Any

import requests

from modelfn.local.apigw import make_server


def test_each_response_is_one_write_on_a_socket_without_nagle() -> None:
    body = "x" * 3000
    server = make_server(lambda event, context: {"statusCode": 200, "body": body,
                                                 "headers": {"content-type": "text/plain"}},
                         port=0, quiet=True)
    gateway: Any = server.RequestHandlerClass
    nodelay: list[int] = []
    writes: list[int] = []
    setup = gateway.setup

    def spied_setup(self: Any) -> None:
        setup(self)
        nodelay.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        write = self.wfile.write

        def counted(data: bytes) -> Any:
            writes.append(len(data))
            return write(data)

        self.wfile.write = counted

    gateway.setup = spied_setup
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v2/health/live"
        with requests.Session() as session:
            replies = [session.get(url, timeout=30) for _ in range(3)]
        assert [r.text for r in replies] == [body] * 3
        assert len(nodelay) == 1 and nodelay[0] != 0  # one kept-alive connection, no Nagle
        assert len(writes) == 3 and all(n > len(body) for n in writes)  # head + body each
    finally:
        server.shutdown()
        server.server_close()


# --- CORS, as the HTTP API does it with CorsAllowOrigins set -------------------------------

def _serving(tmp_path: Any, monkeypatch: Any, cors: tuple[str, ...]) -> Any:
    from modelfn.local.apigw import load_function

    monkeypatch.setenv("MODELFN_STORE", str(tmp_path))  # an empty store: health answers
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    app = load_function("api", f"modelfn_api_cors_{len(cors)}")
    server = make_server(app.lambda_handler, port=0, quiet=True, cors=cors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_cors_preflight_is_answered_by_the_gateway_and_responses_name_the_origin(
        tmp_path: Any, monkeypatch: Any) -> None:
    from modelfn.local.apigw import CORS_EXPOSE, CORS_HEADERS

    app_origin = "http://localhost:5173"
    server = _serving(tmp_path, monkeypatch, (app_origin, "https://app.example.com"))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        pre = requests.options(f"{base}/v2/models/m/infer", timeout=30, headers={
            "Origin": app_origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,prefer"})
        assert pre.status_code == 204 and pre.content == b""
        assert pre.headers["Access-Control-Allow-Origin"] == app_origin
        assert set(pre.headers["Access-Control-Allow-Headers"].split(",")) == set(CORS_HEADERS)
        assert "POST" in pre.headers["Access-Control-Allow-Methods"].split(",")
        assert pre.headers["Vary"] == "Origin"
        live = requests.get(f"{base}/v2/health/live", headers={"Origin": app_origin},
                            timeout=30)
        assert live.status_code == 200
        assert live.headers["Access-Control-Allow-Origin"] == app_origin
        assert set(live.headers["Access-Control-Expose-Headers"].split(",")) == set(CORS_EXPOSE)
        other = requests.get(f"{base}/v2/health/live", timeout=30,
                             headers={"Origin": "https://evil.example.com"})
        assert other.status_code == 200  # answered, but the browser will refuse it
        assert not [h for h in other.headers if h.lower().startswith("access-control-")]
        refused = requests.options(f"{base}/v2/models/m/infer", timeout=30, headers={
            "Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 204
        assert "Access-Control-Allow-Origin" not in refused.headers
    finally:
        server.shutdown()
        server.server_close()


def test_without_cors_an_options_request_reaches_the_api_and_no_header_is_added(
        tmp_path: Any, monkeypatch: Any) -> None:
    server = _serving(tmp_path, monkeypatch, ())
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        pre = requests.options(f"{base}/v2/health/live", timeout=30, headers={
            "Origin": "http://localhost:5173", "Access-Control-Request-Method": "GET"})
        assert pre.status_code == 405 and "Access-Control-Allow-Origin" not in pre.headers
        live = requests.get(f"{base}/v2/health/live", timeout=30,
                            headers={"Origin": "http://localhost:5173"})
        assert live.status_code == 200 and "Access-Control-Allow-Origin" not in live.headers
    finally:
        server.shutdown()
        server.server_close()


def test_a_cors_origin_that_is_not_one_is_refused_saying_what_one_is() -> None:
    import pytest

    from modelfn.errors import LocalServiceError
    from modelfn.local.apigw import cors_origins

    assert cors_origins("https://a.example.com, http://localhost:5173/") == (
        "https://a.example.com", "http://localhost:5173")
    assert cors_origins("") == () and cors_origins("*") == ("*",)
    for bad in ("a.example.com", "https://a.example.com/app", "ftp://x", "https://"):
        with pytest.raises(LocalServiceError, match="scheme://host"):
            cors_origins(bad)


def test_serve_chooses_its_threads_unless_told_and_says_so(monkeypatch: Any) -> None:
    import os

    from modelfn.config import cpu_count
    from modelfn.local.apigw import choose_threads

    monkeypatch.delenv("MODELFN_THREADS", raising=False)
    note = choose_threads()
    chosen = int(os.environ["MODELFN_THREADS"])
    assert 1 <= chosen <= cpu_count()
    assert note.startswith(f"{chosen} onnxruntime thread")
    assert f"of the {cpu_count()} CPUs it may use" in note and "MODELFN_THREADS" in note
    monkeypatch.setenv("MODELFN_THREADS", "3")
    assert choose_threads() == "3 onnxruntime threads (MODELFN_THREADS)"
    assert os.environ["MODELFN_THREADS"] == "3"
