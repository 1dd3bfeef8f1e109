"""Webhooks: a job's final state POSTed to the URL its request named, signed, to
allow-listed HTTPS hosts only.

The signature follows Standard Webhooks (https://www.standardwebhooks.com), so a
receiver can verify it with that project's libraries or with a few lines of its own::

    webhook-id:        <job>.<event>                 the same on every retry of a delivery
    webhook-timestamp: <unix seconds>                refuse it when far from your clock
    webhook-signature: v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>

The secret is ``whsec_<base64>`` (its decoded bytes are the key) or any other text (its
UTF-8 bytes are). What a URL may reach: the scheme is https (plain http only to
loopback, and only in the local emulation, ``MODELFN_WEBHOOK_LOOPBACK``); the host is on
``MODELFN_WEBHOOK_HOSTS`` (``host`` or ``*.domain``); every address it resolves to is a
public one (no private, loopback, link-local, metadata or reserved address, whatever
the list says); the connection goes to the address that was checked (no second DNS
lookup to rebind); redirects are not followed; timeouts are short and retries bounded.

A delivery has a total deadline (``DEADLINE``, or the caller's ``deadline`` / ``until``,
whichever ends first): every connect and socket operation waits at most the time left, a
watchdog shuts the connection down when it passes (a receiver that drips its answer a
byte at a time never lets one read time out), and no retry waits past it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from modelfn.config import JobSettings
from modelfn.errors import InvalidInput

EVENTS = ("completed", "failed")
#: deliveries tried per event, and the waits between them (seconds)
ATTEMPTS = 4
BACKOFF = (1.0, 2.0, 4.0)
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 5.0
#: a whole delivery, every attempt, wait and read included (seconds): the batch function
#: that sends it has a bounded invocation time
DEADLINE = 30.0
USER_AGENT = "modelfn-webhook/1"


class Target(NamedTuple):
    scheme: str
    host: str
    port: int
    path: str
    address: str  # the checked IP address the connection goes to


def _loopback_name(host: str) -> bool:
    return host in {"localhost", "127.0.0.1", "::1"}


#: IPv6 forms that carry an IPv4 address (IPv4-compatible, NAT64, 6to4, Teredo): the
#: IPv4 inside decides, so that e.g. 64:ff9b::a00:1 is not a way to 10.0.0.1
_EMBEDDING = [ipaddress.ip_network(n) for n in ("::/96", "64:ff9b::/96", "64:ff9b:1::/48")]


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _EMBEDDING) and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _allowed_address(ip: str, settings: JobSettings) -> bool:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if settings.webhook_loopback and address.is_loopback:
        return True
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            return _allowed_address(str(inner), settings)
    return address.is_global and not address.is_multicast


def _on_list(host: str, hosts: tuple[str, ...]) -> bool:
    """``host`` is listed, or is a sub-domain of a ``*.domain`` entry (not the domain)."""
    return any(host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
               for allowed in hosts)


def check_url(url: Any, settings: JobSettings,
              resolve: Callable[..., Any] = socket.getaddrinfo) -> Target:
    """The target of ``url`` if a webhook may go there; else InvalidInput saying why.
    Resolves the host (every address must be allowed) and returns the one to use."""
    if not settings.webhook_hosts:
        raise InvalidInput("webhooks are not enabled on this deployment (its operator sets "
                           "WebhookHosts, the hosts they may go to, and WebhookSecret)")
    if not isinstance(url, str) or len(url) > 2048:
        raise InvalidInput("'webhook' must be a URL (a string of at most 2048 characters)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidInput("'webhook' is not a valid URL") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidInput("'webhook' must be an absolute URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("'webhook' must not carry credentials (user:password@)")
    if parts.scheme != "https" and not (
            parts.scheme == "http" and settings.webhook_loopback and _loopback_name(host)):
        raise InvalidInput("'webhook' must be an https:// URL")
    if not _on_list(host, settings.webhook_hosts):
        raise InvalidInput(f"webhook host {host!r} is not on this deployment's allow-list")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InvalidInput(f"webhook host {host!r} does not resolve") from None
    # IPv4 first: a function outside a dual-stack VPC has no IPv6 route
    addresses = sorted({info[4][0] for info in infos}, key=lambda a: (":" in a, a))
    if not addresses:
        raise InvalidInput(f"webhook host {host!r} does not resolve")
    refused = [a for a in addresses if not _allowed_address(a, settings)]
    if refused:
        raise InvalidInput(f"webhook host {host!r} resolves to an address webhooks may not "
                           f"reach ({refused[0]}: private, loopback, link-local or reserved)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port, path, addresses[0])


def secret_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except ValueError:
            pass
    return secret.encode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value for ``body``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class _Cut(Exception):
    """The delivery's deadline passed during an attempt (or before it could start)."""


def _wait(limit: float, end: float) -> float:
    """``limit``, or the time left before ``end`` when that is shorter."""
    left = end - time.monotonic()
    if left <= 0:
        raise _Cut()
    return min(limit, left)


class _Watchdog:
    """Shuts the attempt's socket down at ``end``. Per-operation timeouts do not bound a
    receiver that sends a byte just before each would expire, and close() does not wake
    a recv blocked in another thread on Linux: shutdown() does."""

    def __init__(self, end: float) -> None:
        self.fired = False
        self._sock: socket.socket | None = None
        self._over = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, end - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:  # it passed while the socket was being made
                self._shut(sock)

    def _fire(self) -> None:
        with self._lock:
            if self._over:
                return
            self.fired = True  # set first: what the shutdown wakes must see it
            if self._sock is not None:
                self._shut(self._sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed, or not connected yet
            # the plain socket's: SSLSocket.shutdown would tear its TLS state down first
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        with self._lock:  # once this returns, no shutdown can hit a socket reused later
            self._over = True
            self._sock = None
        self._timer.cancel()
        self._timer.join()


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with SNI and certificate checks for the host name."""

    def __init__(self, target: Target, context: ssl.SSLContext, end: float,
                 watchdog: _Watchdog) -> None:
        super().__init__(target.host, target.port, timeout=CONNECT_TIMEOUT, context=context)
        self._address = target.address
        self._tls = context
        self._end = end
        self._watchdog = watchdog

    def connect(self) -> None:
        self.sock = sock = socket.create_connection((self._address, self.port),
                                                    _wait(CONNECT_TIMEOUT, self._end))
        self._watchdog.watch(sock)  # and closed with the connection, whatever comes next
        sock.settimeout(_wait(READ_TIMEOUT, self._end))
        # the handshake after the watchdog has the TLS socket (wrapping detaches this one)
        tls = self._tls.wrap_socket(sock, server_hostname=self.host,
                                    do_handshake_on_connect=False)
        self._watchdog.watch(tls)
        self.sock = tls
        tls.do_handshake()


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: Target, end: float, watchdog: _Watchdog) -> None:
        super().__init__(target.host, target.port, timeout=CONNECT_TIMEOUT)
        self._address = target.address
        self._end = end
        self._watchdog = watchdog

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port),
                                             _wait(CONNECT_TIMEOUT, self._end))
        self._watchdog.watch(self.sock)
        self.sock.settimeout(_wait(READ_TIMEOUT, self._end))


def _post(target: Target, headers: dict[str, str], body: bytes, end: float) -> int:
    """The status the receiver answered; _Cut when the deadline passed first."""
    watchdog = _Watchdog(end)
    conn: http.client.HTTPConnection = (
        _PinnedHTTPS(target, ssl.create_default_context(), end, watchdog)
        if target.scheme == "https" else _PinnedHTTP(target, end, watchdog))
    try:
        try:
            conn.request("POST", target.path, body=body, headers=headers)
            if conn.sock is not None:
                conn.sock.settimeout(_wait(READ_TIMEOUT, end))
            response = conn.getresponse()
        except (OSError, http.client.HTTPException):
            if watchdog.fired:
                raise _Cut() from None
            raise
        if watchdog.fired:  # the shutdown's end of stream reads as the end of the headers
            raise _Cut()
        try:
            response.read(64 * 1024)
        except (OSError, http.client.HTTPException):
            if not watchdog.fired:
                raise
        return response.status  # the answer is its status: a body cut short leaves it
    finally:
        watchdog.cancel()
        conn.close()


def _seconds(value: float) -> str:
    return f"{round(max(value, 0.0), 2):g}"


def deliver(url: str, message_id: str, body: bytes, settings: JobSettings, secret: str,
            sleep: Callable[[float], Any] = time.sleep, *, deadline: float | None = None,
            until: float | None = None) -> dict[str, Any]:
    """POST ``body`` to ``url``, signed; retried (connection errors, timeouts, 429 and
    5xx) up to ATTEMPTS times with backoff, all within ``deadline`` seconds (None:
    DEADLINE) and by ``until`` (a time.monotonic() instant), whichever ends first.
    Returns the outcome (never raises): a job's result does not depend on whether its
    receiver answered."""
    start = time.monotonic()
    end = start + (DEADLINE if deadline is None else deadline)
    if until is not None:
        end = min(end, until)
    outcome: dict[str, Any] = {"delivered": False, "attempts": 0}
    if not secret:
        outcome["error"] = "no webhook secret is configured: nothing is sent unsigned"
        return outcome
    try:
        target = check_url(url, settings)  # again: DNS may answer otherwise than at submit
    except InvalidInput as exc:
        outcome["error"] = exc.message
        return outcome
    late = f"no answer within the {_seconds(end - start)} s deadline"
    for attempt in range(ATTEMPTS):
        if attempt:
            wait = BACKOFF[min(attempt - 1, len(BACKOFF) - 1)]
            if time.monotonic() + wait >= end:  # a retry after it would be too late
                outcome["error"] = (f"{late} (attempt {attempt}: {outcome['error']}; the "
                                    f"next, after a {_seconds(wait)} s wait, would pass it)")
                return outcome
            sleep(wait)
        if time.monotonic() >= end:  # resolving the host took it all
            outcome["error"] = f"{late} (it passed before attempt {attempt + 1})"
            return outcome
        if not _attempt(target, message_id, body, secret, end, outcome, late):
            return outcome
    return outcome


def _attempt(target: Target, message_id: str, body: bytes, secret: str, end: float,
             outcome: dict[str, Any], late: str) -> bool:
    """One try, recorded in ``outcome``: whether another may follow."""
    outcome["attempts"] += 1
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               "webhook-id": message_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(secret, message_id, timestamp, body)}
    try:
        status = _post(target, headers, body, end)
    except _Cut:
        outcome["error"] = f"{late} (attempt {outcome['attempts']} was still under way)"
        return False
    except (OSError, http.client.HTTPException) as exc:
        outcome["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if time.monotonic() < end:
            return True
        # a wait cut to the time left ran out
        outcome["error"] = f"{late} (attempt {outcome['attempts']}: {outcome['error']})"
        return False
    outcome["status"] = status
    if 200 <= status < 300:
        outcome.pop("error", None)
        outcome["delivered"] = True
        return False
    outcome["error"] = (f"the receiver answered {status}" + (
        " (redirects are not followed)" if 300 <= status < 400 else ""))
    # 4xx: the receiver refused it, sending it again will not help
    return status == 429 or status >= 500
