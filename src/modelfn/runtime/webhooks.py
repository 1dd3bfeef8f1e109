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
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import socket
import ssl
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


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with SNI and certificate checks for the host name."""

    def __init__(self, target: Target, context: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=CONNECT_TIMEOUT, context=context)
        self._address = target.address
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), CONNECT_TIMEOUT)
        sock.settimeout(READ_TIMEOUT)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: Target) -> None:
        super().__init__(target.host, target.port, timeout=CONNECT_TIMEOUT)
        self._address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), CONNECT_TIMEOUT)
        self.sock.settimeout(READ_TIMEOUT)


def _post(target: Target, headers: dict[str, str], body: bytes) -> int:
    conn: http.client.HTTPConnection = (
        _PinnedHTTPS(target, ssl.create_default_context()) if target.scheme == "https"
        else _PinnedHTTP(target))
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(64 * 1024)
        return response.status
    finally:
        conn.close()


def deliver(url: str, message_id: str, body: bytes, settings: JobSettings, secret: str,
            sleep: Callable[[float], Any] = time.sleep) -> dict[str, Any]:
    """POST ``body`` to ``url``, signed; retried (connection errors, timeouts, 429 and
    5xx) up to ATTEMPTS times with backoff. Returns the outcome (never raises): a job's
    result does not depend on whether its receiver answered."""
    outcome: dict[str, Any] = {"delivered": False, "attempts": 0}
    if not secret:
        outcome["error"] = "no webhook secret is configured: nothing is sent unsigned"
        return outcome
    try:
        target = check_url(url, settings)  # again: DNS may answer otherwise than at submit
    except InvalidInput as exc:
        outcome["error"] = exc.message
        return outcome
    for attempt in range(ATTEMPTS):
        if attempt:
            sleep(BACKOFF[min(attempt - 1, len(BACKOFF) - 1)])
        outcome["attempts"] = attempt + 1
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "webhook-id": message_id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(secret, message_id, timestamp, body)}
        try:
            status = _post(target, headers, body)
        except (OSError, http.client.HTTPException) as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        outcome["status"] = status
        if 200 <= status < 300:
            outcome.pop("error", None)
            outcome["delivered"] = True
            return outcome
        outcome["error"] = (f"the receiver answered {status}" + (
            " (redirects are not followed)" if 300 <= status < 400 else ""))
        if status != 429 and status < 500:
            return outcome  # the receiver refused it: sending it again will not help
    return outcome
