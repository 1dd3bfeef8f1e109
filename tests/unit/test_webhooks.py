"""A webhook's delivery, choice by choice, against a real HTTP receiver on loopback
(plain http to loopback is what ``MODELFN_WEBHOOK_LOOPBACK`` allows): what is sent and
signed, which answers are retried and how long it waits between tries, what the outcome
says; and the URL checks at their edges (length, default ports, the path sent, the port
the host is resolved for). tests/unit/test_jobs.py covers the addresses refused;
tests/integration/test_async.py the same deliveries from a deployed job."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from modelfn.config import JobSettings
from modelfn.errors import InvalidInput
from modelfn.runtime import webhooks

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
LOOPBACK = JobSettings(webhook_hosts=("127.0.0.1", "localhost"), webhook_loopback=True)


class Receiver:
    """Answers each POST with the next status of ``answers`` (the last one repeats) and
    keeps what it was sent."""

    def __init__(self, *answers: int) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((self.path, dict(self.headers.items()), body))
                status = receiver.answers[min(len(receiver.requests),
                                              len(receiver.answers)) - 1]
                self.send_response(status)
                self.send_header("Content-Length", "2")
                if 300 <= status < 400:
                    self.send_header("Location", "http://169.254.169.254/")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def url(self, path: str = "/hook?x=1") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(*answers)``: a Receiver, shut down after the test."""
    started: list[Receiver] = []

    def start(*answers: int) -> Receiver:
        started.append(Receiver(*answers))
        return started[-1]

    yield start
    for r in started:
        r.server.shutdown()
        r.server.server_close()


@pytest.fixture
def receiver(serve: Any) -> Receiver:
    return serve(200)


def test_a_delivery_posts_the_body_signed_to_the_path_and_query(receiver: Receiver) -> None:
    body = json.dumps({"type": "job.completed", "data": {"id": "j"}}).encode()
    waits: list[float] = []
    outcome = webhooks.deliver(receiver.url(), "j.completed", body, LOOPBACK, SECRET,
                               sleep=waits.append)
    assert outcome == {"delivered": True, "attempts": 1, "status": 200}
    assert waits == []
    ((path, headers, sent),) = receiver.requests
    assert path == "/hook?x=1" and sent == body
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == webhooks.USER_AGENT
    assert headers["webhook-id"] == "j.completed"
    timestamp = headers["webhook-timestamp"]
    assert timestamp.isdigit()
    # the receiver's own check, with the secret's decoded bytes as the key
    expected = hmac.new(b"k" * 32, f"j.completed.{timestamp}.".encode() + body,
                        hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(expected).decode()


@pytest.mark.parametrize("status", [200, 204, 299])
def test_every_2xx_is_delivered(serve: Any, status: int) -> None:
    r = serve(status)
    outcome = webhooks.deliver(r.url(), "j.failed", b"{}", LOOPBACK, SECRET)
    assert outcome == {"delivered": True, "attempts": 1, "status": status}


@pytest.mark.parametrize(("status", "error"), [
    (300, "the receiver answered 300 (redirects are not followed)"),
    (301, "the receiver answered 301 (redirects are not followed)"),
    (399, "the receiver answered 399 (redirects are not followed)"),
    (400, "the receiver answered 400"),
    (404, "the receiver answered 404"),
    (499, "the receiver answered 499"),
])
def test_a_redirect_or_a_refusal_is_not_followed_nor_sent_again(serve: Any, status: int,
                                                                 error: str) -> None:
    r = serve(status, 200)
    waits: list[float] = []
    outcome = webhooks.deliver(r.url(), "j.failed", b"{}", LOOPBACK, SECRET,
                               sleep=waits.append)
    assert outcome == {"delivered": False, "attempts": 1, "status": status,
                       "error": error}
    assert len(r.requests) == 1 and waits == []


@pytest.mark.parametrize("status", [429, 500, 503])
def test_429_and_5xx_are_retried_with_backoff_until_the_attempts_run_out(serve: Any,
                                                                         status: int) -> None:
    r = serve(status)
    waits: list[float] = []
    outcome = webhooks.deliver(r.url(), "j.failed", b"{}", LOOPBACK, SECRET,
                               sleep=waits.append)
    assert outcome == {"delivered": False, "attempts": webhooks.ATTEMPTS,
                       "status": status, "error": f"the receiver answered {status}"}
    assert len(r.requests) == webhooks.ATTEMPTS
    assert waits == [1.0, 2.0, 4.0] == list(webhooks.BACKOFF)
    # every try is the same message: one id, signed again with its own timestamp
    assert {h["webhook-id"] for _, h, _ in r.requests} == {"j.failed"}


def test_a_retry_that_is_answered_clears_the_error(serve: Any) -> None:
    r = serve(503, 502, 201)
    waits: list[float] = []
    outcome = webhooks.deliver(r.url(), "j.completed", b"{}", LOOPBACK, SECRET,
                               sleep=waits.append)
    assert outcome == {"delivered": True, "attempts": 3, "status": 201}
    assert waits == [1.0, 2.0]


def test_a_receiver_that_is_not_listening_is_retried_and_the_error_names_the_failure(
        ) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits: list[float] = []
    outcome = webhooks.deliver(f"http://127.0.0.1:{port}/", "j.failed", b"{}", LOOPBACK,
                               SECRET, sleep=waits.append)
    assert outcome["delivered"] is False and outcome["attempts"] == webhooks.ATTEMPTS
    assert outcome["error"].startswith("ConnectionRefusedError: ") and "status" not in outcome
    assert waits == list(webhooks.BACKOFF)


def test_more_attempts_than_waits_keep_the_longest_wait(serve: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "ATTEMPTS", 6)
    r = serve(500)
    waits: list[float] = []
    outcome = webhooks.deliver(r.url(), "j.failed", b"{}", LOOPBACK, SECRET,
                               sleep=waits.append)
    assert outcome["attempts"] == 6 and waits == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_url_refused_when_the_job_ends_sends_nothing(receiver: Receiver) -> None:
    deployed = JobSettings(webhook_hosts=("127.0.0.1",))  # no loopback mode
    outcome = webhooks.deliver(receiver.url(), "j.completed", b"{}", deployed, SECRET)
    assert outcome == {"delivered": False, "attempts": 0,
                       "error": "'webhook' must be an https:// URL"}
    assert receiver.requests == []


# --- the URL, at its edges --------------------------------------------------------------

def resolver(calls: list[tuple[str, int]], address: str = "8.8.8.8") -> Any:
    """getaddrinfo for a name that resolves to ``address`` (no DNS in these tests)."""
    def resolve(host: str, port: int, **kwargs: Any) -> list[tuple]:
        calls.append((host, port))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
    return resolve


HOSTS = JobSettings(webhook_hosts=("hooks.example",))


def test_a_url_of_2048_characters_is_taken_and_one_more_is_refused() -> None:
    base = "https://hooks.example/"
    exact = base + "a" * (2048 - len(base))
    assert len(exact) == 2048
    target = webhooks.check_url(exact, HOSTS, resolve=resolver([]))
    assert target.path == "/" + "a" * (2048 - len(base))
    with pytest.raises(InvalidInput, match="at most 2048 characters"):
        webhooks.check_url(exact + "a", HOSTS, resolve=resolver([]))


def test_the_default_ports_are_resolved_and_kept_and_the_path_has_no_empty_query() -> None:
    calls: list[tuple[str, int]] = []
    https = webhooks.check_url("https://Hooks.Example", HOSTS, resolve=resolver(calls))
    assert https == webhooks.Target("https", "hooks.example", 443, "/", "8.8.8.8")
    local = webhooks.check_url("http://localhost/cb", LOOPBACK,
                               resolve=resolver(calls, "127.0.0.1"))
    assert local == webhooks.Target("http", "localhost", 80, "/cb", "127.0.0.1")
    explicit = webhooks.check_url("https://hooks.example:8443/a?b=c&d", HOSTS,
                                  resolve=resolver(calls))
    assert explicit.port == 8443 and explicit.path == "/a?b=c&d"
    assert calls == [("hooks.example", 443), ("localhost", 80), ("hooks.example", 8443)]


@pytest.mark.parametrize("url", ["https://user:pw@hooks.example/", "https://u@hooks.example/"])
def test_credentials_in_a_url_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput, match="must not carry credentials"):
        webhooks.check_url(url, HOSTS, resolve=resolver([]))


def test_a_host_that_does_not_resolve_or_resolves_to_nothing_is_refused() -> None:
    def fails(host: str, port: int, **kwargs: Any) -> list[tuple]:
        raise socket.gaierror("no such host")

    with pytest.raises(InvalidInput, match="'hooks.example' does not resolve"):
        webhooks.check_url("https://hooks.example/", HOSTS, resolve=fails)
    with pytest.raises(InvalidInput, match="'hooks.example' does not resolve"):
        webhooks.check_url("https://hooks.example/", HOSTS, resolve=lambda *a, **k: [])
    with pytest.raises(InvalidInput, match="is not a valid URL"):
        webhooks.check_url("https://hooks.example:99999/", HOSTS, resolve=resolver([]))


def test_an_address_with_a_zone_is_judged_without_it() -> None:
    assert not webhooks._allowed_address("fe80::1%eth0", JobSettings())
    assert webhooks._allowed_address("2606:4700::1111%2", JobSettings())


def test_a_whsec_secret_that_is_not_base64_is_its_own_bytes() -> None:
    assert webhooks.secret_key("whsec_not base64!") == b"whsec_not base64!"
    assert webhooks.secret_key("whsec_" + base64.b64encode(b"xyz").decode()) == b"xyz"
