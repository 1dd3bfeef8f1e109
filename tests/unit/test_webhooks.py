"""A webhook's delivery, choice by choice, against a real HTTP receiver on loopback
(plain http to loopback is what ``MODELFN_WEBHOOK_LOOPBACK`` allows): what is sent and
signed, which answers are retried and how long it waits between tries, what the outcome
says; the total deadline, against receivers that drip their answer a byte at a time (no
single read ever times out) or keep answering 503; and the URL checks at their edges
(length, default ports, the path sent, the port the host is resolved for).
tests/unit/test_jobs.py covers the addresses refused; tests/integration/test_async.py the
same deliveries from a deployed job."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
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


# --- the total deadline -----------------------------------------------------------------

class Dripper:
    """Reads a request, sends ``head``, then one byte of ``drip`` every ``every`` seconds
    (well inside READ_TIMEOUT, so no read times out) until stopped, or until ``limit`` s
    have passed: a delivery with no deadline then ends too, failing the test, not hanging
    it."""

    def __init__(self, head: bytes, every: float = 0.5, limit: float = 4.0) -> None:
        self.head, self.every, self.limit = head, every, limit
        self.sent = 0
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.05)  # close() does not wake a blocked accept()
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self.limit)
                conn.recv(65536)  # the request (or a TLS client hello)
                conn.sendall(self.head)
                began = time.monotonic()
                while not self._stop.wait(self.every) and time.monotonic() - began < self.limit:
                    conn.sendall(b"x")
                    self.sent += 1
            except OSError:
                pass  # the client went: what the deadline is for

    def stop(self) -> None:
        self._stop.set()
        self._server.close()


@pytest.fixture
def drip() -> Iterator[Any]:
    """``drip(head)``: a Dripper, stopped after the test."""
    started: list[Dripper] = []

    def start(head: bytes) -> Dripper:
        started.append(Dripper(head))
        return started[-1]

    yield start
    for d in started:
        d.stop()


def timers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, threading.Timer)]


@pytest.mark.parametrize(("scheme", "head"), [
    # a status line, then a header line that never ends
    ("http", b"HTTP/1.1 200 OK\r\nX-Slow: "),
    # a TLS record header for 16 KiB, its bytes one at a time: stuck in the handshake
    # (which the ssl module times out as a whole: the watchdog or that timeout, cut to
    # the time left, ends it, whichever comes first)
    ("https", b"\x16\x03\x03\x40\x00"),
], ids=["headers", "tls-handshake"])
def test_a_receiver_that_drips_its_answer_is_cut_at_the_deadline(drip: Any, scheme: str,
                                                                 head: bytes) -> None:
    d = drip(head)
    waits: list[float] = []
    began = time.monotonic()
    outcome = webhooks.deliver(f"{scheme}://127.0.0.1:{d.port}/", "j.failed", b"{}",
                               LOOPBACK, SECRET, sleep=waits.append, deadline=1.5)
    took = time.monotonic() - began
    assert 1.45 <= took < 2.5
    assert d.sent >= 2  # it was still dripping: no read had timed out
    # not the 200 of a status line whose headers the cut ended, and not tried again
    assert outcome.pop("error").startswith("no answer within the 1.5 s deadline (attempt 1")
    assert outcome == {"delivered": False, "attempts": 1} and waits == []
    assert timers() == []


def test_until_cuts_a_delivery_before_its_deadline_when_it_comes_first(drip: Any) -> None:
    d = drip(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    began = time.monotonic()
    outcome = webhooks.deliver(f"http://127.0.0.1:{d.port}/", "j.failed", b"{}", LOOPBACK,
                               SECRET, deadline=30.0, until=began + 1.0)
    assert time.monotonic() - began < 2.0
    assert outcome["delivered"] is False and outcome["attempts"] == 1
    assert outcome["error"].startswith("no answer within the 1 s deadline")


def test_a_body_that_drips_after_a_2xx_is_cut_and_the_status_stands(drip: Any) -> None:
    d = drip(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    began = time.monotonic()
    outcome = webhooks.deliver(f"http://127.0.0.1:{d.port}/", "j.completed", b"{}",
                               LOOPBACK, SECRET, deadline=1.5)
    assert 1.45 <= time.monotonic() - began < 2.5
    assert outcome == {"delivered": True, "attempts": 1, "status": 200}


def test_no_retry_waits_past_the_deadline(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "BACKOFF", (0.2, 0.4, 0.8))
    r = serve(503)
    began = time.monotonic()
    outcome = webhooks.deliver(r.url(), "j.failed", b"{}", LOOPBACK, SECRET, deadline=1.0)
    assert time.monotonic() - began < 1.0  # 0.2 + 0.4 waited; 0.8 more would pass it
    assert len(r.requests) == 3 < webhooks.ATTEMPTS
    assert outcome == {"delivered": False, "attempts": 3, "status": 503, "error":
                       "no answer within the 1 s deadline (attempt 3: the receiver answered "
                       "503; the next, after a 0.8 s wait, would pass it)"}


@pytest.mark.parametrize(("deadline", "until"), [(2.5, None), (None, 2.5), (2.5, 100.0),
                                                 (100.0, 2.5)])
def test_the_earlier_of_deadline_and_until_bounds_the_backoff(serve: Any,
                                                              deadline: float | None,
                                                              until: float | None) -> None:
    r = serve(503)
    waits: list[float] = []
    at = None if until is None else time.monotonic() + until
    outcome = webhooks.deliver(r.url(), "j.failed", b"{}", LOOPBACK, SECRET,
                               sleep=waits.append, deadline=deadline, until=at)
    assert waits == [1.0, 2.0]  # the 4 s wait would end past 2.5 s
    assert outcome["attempts"] == len(r.requests) == 3
    assert "within the 2.5 s deadline" in outcome["error"]


def test_the_default_deadline_leaves_the_whole_backoff(serve: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    r = serve(503)
    waits: list[float] = []
    webhooks.deliver(r.url(), "j.failed", b"{}", LOOPBACK, SECRET, sleep=waits.append)
    assert waits == list(webhooks.BACKOFF)
    monkeypatch.setattr(webhooks, "DEADLINE", 1.5)  # read at each call
    waits.clear()
    outcome = webhooks.deliver(r.url(), "j.failed", b"{}", LOOPBACK, SECRET,
                               sleep=waits.append)
    assert waits == [1.0] and outcome["attempts"] == 2


def test_a_deadline_already_passed_sends_nothing(receiver: Receiver) -> None:
    outcome = webhooks.deliver(receiver.url(), "j.completed", b"{}", LOOPBACK, SECRET,
                               deadline=10.0, until=time.monotonic() - 1)
    assert outcome == {"delivered": False, "attempts": 0, "error":
                       "no answer within the 0 s deadline (it passed before attempt 1)"}
    assert receiver.requests == []


@pytest.mark.parametrize(("deadline", "connect", "read"), [(None, 3.0, 5.0),
                                                           (1.0, 1.0, 1.0), (4.0, 3.0, 4.0)])
def test_an_answering_receiver_is_delivered_to_with_waits_cut_to_the_time_left(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch, deadline: float | None,
        connect: float, read: float) -> None:
    made: list[tuple[float, socket.socket]] = []
    create = socket.create_connection

    def spy(address: Any, timeout: float, *args: Any) -> socket.socket:
        made.append((timeout, create(address, timeout, *args)))
        return made[-1][1]

    monkeypatch.setattr(webhooks.socket, "create_connection", spy)
    outcome = webhooks.deliver(receiver.url(), "j.completed", b"{}", LOOPBACK, SECRET,
                               deadline=deadline)
    assert outcome == {"delivered": True, "attempts": 1, "status": 200}
    ((timeout, sock),) = made
    assert connect - 0.1 < timeout <= connect
    assert read - 0.1 < (sock.gettimeout() or 0) <= read
    assert timers() == []  # the watchdog went with the attempt


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
