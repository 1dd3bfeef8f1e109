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
