"""The pieces of asynchronous inference that need no AWS: the Prefer header, who owns a
job, which webhook URLs may be reached, and the signature (the whole path runs on moto
in tests/integration/test_async.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from modelfn.config import JobSettings, Settings
from modelfn.errors import InvalidInput
from modelfn.runtime import webhooks
from modelfn.runtime.http import principal
from modelfn.runtime.jobs import owner_of, prefers_async
from modelfn.store.keys import is_token, job_file, job_from_key


@pytest.mark.parametrize(("header", "wanted"), [
    ("respond-async", True), ("RESPOND-ASYNC", True), ("wait=10, respond-async", True),
    ("respond-async; x=1", True), ("return=minimal", False), ("", False), (None, False),
    ("respond-asynchronously", False),
    # RFC 7240: token [= value] *(; parameter), commas with or without spaces
    ("wait=10,respond-async", True), ("respond-async; a=1; b=2", True),
    ("respond-async=1", True), ("wait=respond-async", False), ("x; respond-async", False),
])
def test_prefer_respond_async_is_found_among_preferences(header: str | None,
                                                         wanted: bool) -> None:
    assert prefers_async(header) is wanted


def test_a_job_belongs_to_the_caller_the_authorizer_named() -> None:
    iam = {"requestContext": {"authorizer": {"iam": {"userArn": "arn:aws:iam::1:role/a",
                                                     "callerId": "AROA:a"}}}}
    jwt = {"requestContext": {"authorizer": {"jwt": {"claims": {"iss": "https://i",
                                                                 "sub": "u1"}}}}}
    other = {"requestContext": {"authorizer": {"jwt": {"claims": {"iss": "https://i",
                                                                   "sub": "u2"}}}}}
    owners = {owner_of(principal(e)) for e in (iam, jwt, other)}
    assert len(owners) == 3
    assert all(len(owner) == 32 and is_token(owner) for owner in owners)
    assert owner_of(principal({"requestContext": {}})) == "anonymous"
    assert owner_of(principal(iam)) == owner_of(principal(iam))

    def session(name: str) -> dict:
        return {"requestContext": {"authorizer": {"iam": {
            "userArn": f"arn:aws:sts::1:assumed-role/worker/{name}",
            "callerId": f"AROAEXAMPLE:{name}"}}}}

    # a role's sessions come and go: the role is the caller
    assert owner_of(principal(session("s1"))) == owner_of(principal(session("s2")))
    assert owner_of(principal(session("s1"))) != owner_of(principal(iam))
    for owner in owners:
        key = job_file(owner, "a" * 32, "request.json")
        assert job_from_key(key) == (owner, "a" * 32)


def test_only_a_request_key_names_a_job() -> None:
    assert job_from_key("async/o/" + "b" * 32 + "/status.json") is None
    assert job_from_key("async/o/" + "b" * 32 + "/result.json") is None
    assert job_from_key("async/o/nothex/request.json") is None
    assert job_from_key("inputs/o/" + "b" * 32 + "/request.json") is None
    assert job_from_key("async/../" + "b" * 32 + "/request.json") is None
    assert is_token("0123456789abcdef" * 2) and not is_token("0123456789ABCDEF" * 2)


HOSTS = JobSettings(webhook_hosts=("8.8.8.8", "10.1.2.3", "::1", "127.0.0.1",
                                   "169.254.169.254", "*.hooks.example"))


@pytest.mark.parametrize(("url", "reason"), [
    ("https://10.1.2.3/x", "may not reach (10.1.2.3"),
    ("https://169.254.169.254/", "may not reach (169.254.169.254"),
    ("https://127.0.0.1:8443/", "may not reach (127.0.0.1"),
    ("https://[::1]/", "may not reach (::1"),
    ("http://8.8.8.8/", "https://"),
    ("https://8.8.4.4/", "not on this deployment's allow-list"),
    ("https://hooks.example/", "not on this deployment's allow-list"),
    ("https://evilhooks.example/", "not on this deployment's allow-list"),
    ("https:///nohost", "with a host"),
    (42, "must be a URL"),
])
def test_a_webhook_url_is_refused_for_what_it_could_reach(url: object, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason.replace("(", r"\(").replace(".", r"\.")):
        webhooks.check_url(url, HOSTS)


@pytest.mark.parametrize("address", [
    "::127.0.0.1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1",
    "2002:a9fe:a9fe::", "::", "fe80::1", "fc00::1", "100.64.0.1", "192.168.1.1",
    "172.16.0.1", "0.0.0.0", "224.0.0.1", "169.254.169.254",
])
def test_internal_addresses_are_refused_in_every_form(address: str) -> None:
    assert not webhooks._allowed_address(address, HOSTS)


def test_public_addresses_are_allowed_and_ipv4_comes_first() -> None:
    for address in ("8.8.8.8", "::ffff:8.8.8.8", "2606:4700::1111"):
        assert webhooks._allowed_address(address, HOSTS)

    def dual_stack(host: str, port: int, **kwargs: object) -> list[tuple]:
        return [(10, 1, 6, "", ("2606:4700::1111", port, 0, 0)),
                (2, 1, 6, "", ("93.184.215.14", port))]

    target = webhooks.check_url("https://a.hooks.example/", HOSTS, resolve=dual_stack)
    assert target.address == "93.184.215.14" and target.host == "a.hooks.example"


def test_a_public_listed_address_is_the_one_connected_to() -> None:
    target = webhooks.check_url("https://8.8.8.8/hooks?a=1", HOSTS)
    assert target == webhooks.Target("https", "8.8.8.8", 443, "/hooks?a=1", "8.8.8.8")
    assert webhooks._on_list("a.hooks.example", HOSTS.webhook_hosts)
    assert webhooks._on_list("b.a.hooks.example", HOSTS.webhook_hosts)


def test_webhooks_are_off_without_an_allow_list() -> None:
    with pytest.raises(InvalidInput, match="not enabled on this deployment"):
        webhooks.check_url("https://8.8.8.8/", JobSettings())
    assert Settings.from_env({}).jobs.webhook_hosts == ()
    hosts = Settings.from_env({"MODELFN_WEBHOOK_HOSTS": " A.example , *.b.example,"}).jobs
    assert hosts.webhook_hosts == ("a.example", "*.b.example")


def test_the_signature_is_standard_webhooks_hmac_sha256_over_id_time_and_body() -> None:
    key = b"0123456789abcdef0123456789abcdef"
    secret = "whsec_" + base64.b64encode(key).decode()
    body = b'{"type": "job.completed"}'
    expected = base64.b64encode(hmac.new(key, b"msg_1.1700000000." + body,
                                         hashlib.sha256).digest()).decode()
    assert webhooks.sign(secret, "msg_1", 1700000000, body) == "v1," + expected
    # a secret without the prefix is its own bytes
    plain = base64.b64encode(hmac.new(b"text", b"m.1.{}", hashlib.sha256).digest()).decode()
    assert webhooks.sign("text", "m", 1, b"{}") == "v1," + plain


def test_nothing_is_sent_without_a_secret() -> None:
    outcome = webhooks.deliver("https://8.8.8.8/", "j.completed", b"{}", HOSTS, secret="")
    assert outcome == {"delivered": False, "attempts": 0,
                       "error": "no webhook secret is configured: nothing is sent unsigned"}
