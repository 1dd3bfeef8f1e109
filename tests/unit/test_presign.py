"""Presigned URLs live no longer than the credentials that sign them, and say so: long-lived
keys sign for what was asked (7 days at most), a bare session token for 15 minutes,
refreshable credentials until a minute before they expire (refreshed first when that is
under a minute away), and POST /v2/uploads and GET /v2/jobs/{id} answer the URL's own
expiry. On moto's S3, with the signing credentials given to a fresh botocore session."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.session
import pytest
import requests
from botocore.config import Config
from botocore.credentials import CredentialProvider, RefreshableCredentials

from modelfn.config import JobSettings, Settings
from modelfn.errors import ConfigError
from modelfn.runtime import jobs as jobs_mod
from modelfn.runtime.jobs import Jobs
from modelfn.store.s3 import S3Store

OWNER = "o" * 32


class _Given(CredentialProvider):
    """The credentials a test names, ahead of the environment's."""

    METHOD = "given"

    def __init__(self, creds: Any) -> None:
        super().__init__()
        self.creds = creds

    def load(self) -> Any:
        return self.creds


def _jobs(bucket: str, creds: Any = None, presign_seconds: int = 3600) -> Jobs:
    """Jobs on ``bucket``, signing with ``creds`` (None: the environment's, read now)."""
    session = botocore.session.Session()
    if creds is not None:
        session.get_component("credential_provider").insert_before("env", _Given(creds))
    store = S3Store(f"s3://{bucket}")
    store._s3 = boto3.Session(botocore_session=session).client(
        "s3", config=Config(signature_version="s3v4"))
    return Jobs(JobSettings(store=f"s3://{bucket}", presign_seconds=presign_seconds), store)


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def _signed_at(url: str) -> float:
    return datetime.strptime(_query(url)["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=UTC).timestamp()


def _truthful(url: str, expires: str) -> int:
    """The URL's X-Amz-Expires, once its answered expiry is checked against the URL's own
    (signing time plus X-Amz-Expires): never later, and at most the second that may
    tick between reading the clock and signing earlier."""
    seconds = int(_query(url)["X-Amz-Expires"])
    assert 0 <= _signed_at(url) + seconds - jobs_mod._seconds(expires) <= 1
    return seconds


def _metadata(seconds: float, token: str = "tok") -> dict[str, str]:
    return {"access_key": "testing", "secret_key": "testing", "token": token,
            "expiry_time": (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()}


def _refreshable(seconds: float, refresh: Callable[[], dict[str, str]],
                 **timeouts: int) -> RefreshableCredentials:
    return RefreshableCredentials.create_from_metadata(
        _metadata(seconds), refresh_using=refresh, method="given", **timeouts)


def _upload(jobs: Jobs) -> tuple[dict[str, Any], int]:
    """POST /v2/uploads' answer and its URL's X-Amz-Expires."""
    answer = jobs.create_upload(OWNER, {"size": 2, "format": "json"})
    return answer, _truthful(answer["url"], answer["expires"])


def _result(jobs: Jobs) -> tuple[dict[str, Any], int]:
    """GET /v2/jobs/{id}'s result link for a binary result, and its X-Amz-Expires."""
    jobs.store.write_bytes("async/r.bin", b"\x00\x01")
    doc = jobs.public(OWNER, {"id": "j", "status": "succeeded", "result": {
        "key": "async/r.bin", "content_type": "application/octet-stream", "bytes": 2}})
    result = doc["result"]
    seconds = _truthful(result["url"], result["expires"])
    assert requests.get(result["url"], timeout=30).content == b"\x00\x01"
    return result, seconds


def test_long_lived_keys_sign_for_what_was_asked_up_to_seven_days(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_SESSION_TOKEN")  # an access key and its secret, nothing else
    jobs = _jobs(s3_bucket, presign_seconds=3 * 86400)
    answer, seconds = _upload(jobs)
    assert seconds == 3 * 86400
    assert abs(jobs_mod._seconds(answer["expires"]) - (time.time() + 3 * 86400)) <= 2
    put = requests.put(answer["url"], data=b"{}", headers=answer["headers"], timeout=30)
    assert put.status_code == 200
    assert _result(jobs)[1] == 3 * 86400
    assert jobs.store.url_seconds(30 * 86400) == 7 * 86400  # SigV4's limit


def test_a_session_token_of_unknown_expiry_signs_for_15_minutes(s3_bucket: str) -> None:
    jobs = _jobs(s3_bucket)  # moto's environment: AWS_SESSION_TOKEN, as Lambda gives
    assert jobs.store._s3._request_signer._credentials.get_frozen_credentials().token
    answer, seconds = _upload(jobs)
    assert seconds == 900
    assert abs(jobs_mod._seconds(answer["expires"]) - (time.time() + 900)) <= 2
    result, seconds = _result(jobs)
    assert seconds == 900
    assert abs(jobs_mod._seconds(result["expires"]) - (time.time() + 900)) <= 2
    assert _jobs(s3_bucket, presign_seconds=300).store.url_seconds(300) == 300


def test_credentials_expiring_in_10_minutes_sign_until_a_minute_before(
        s3_bucket: str) -> None:
    refreshed: list[int] = []

    def refresh() -> dict[str, str]:  # the provider can give no longer-lived ones
        refreshed.append(1)
        return _metadata(600)

    jobs = _jobs(s3_bucket, _refreshable(600, refresh))
    answer, seconds = _upload(jobs)
    assert 538 <= seconds <= 540
    assert abs(jobs_mod._seconds(answer["expires"]) - (time.time() + 540)) <= 2
    assert refreshed  # botocore's own refresh (it refreshes inside 15 minutes) came first
    result, seconds = _result(jobs)
    assert 538 <= seconds <= 540
    assert abs(jobs_mod._seconds(result["expires"]) - (time.time() + 540)) <= 2


def test_credentials_under_a_minute_from_expiry_are_refreshed_before_signing(
        s3_bucket: str) -> None:
    refreshed: list[int] = []

    def refresh() -> dict[str, str]:
        refreshed.append(1)
        return _metadata(3600, token="new")

    # timeouts of 0: botocore itself would sign with them until the last second
    jobs = _jobs(s3_bucket, _refreshable(30, refresh, advisory_timeout=0,
                                         mandatory_timeout=0), presign_seconds=7200)
    answer, seconds = _upload(jobs)
    assert refreshed == [1]
    assert _query(answer["url"])["X-Amz-Security-Token"] == "new"
    assert 3538 <= seconds <= 3540


def test_credentials_that_cannot_be_refreshed_still_get_a_second(s3_bucket: str) -> None:
    def refresh() -> dict[str, str]:
        raise RuntimeError("the credentials endpoint is down")

    jobs = _jobs(s3_bucket, _refreshable(30, refresh, advisory_timeout=0,
                                         mandatory_timeout=0))
    assert _upload(jobs)[1] == 1  # the truth: they expire in under the margin


def test_presign_seconds_over_seven_days_are_refused() -> None:
    assert JobSettings.from_env({}).presign_seconds == 900
    assert JobSettings.from_env({"MODELFN_PRESIGN_SECONDS": "604800"}).presign_seconds == \
        604800
    for env in ({"MODELFN_PRESIGN_SECONDS": "604801"}, {"MODELFN_PRESIGN_SECONDS": "9999999"}):
        with pytest.raises(ConfigError, match=r"MODELFN_PRESIGN_SECONDS=\d+: SigV4 presigned "
                                              r"URLs last at most 7 days \(604800 seconds\)"):
            JobSettings.from_env(env)
        with pytest.raises(ConfigError, match="at most 7 days"):
            Settings.from_env(env)
