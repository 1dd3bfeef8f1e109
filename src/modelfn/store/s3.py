"""A store in ``s3://bucket/prefix``. boto3 is imported only when one is opened: it is
a large share of a cold start."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

from modelfn.errors import ObjectChanged, StoreError
from modelfn.store.base import CHUNK, Store, Writer, json_bytes

PART_SIZE = 8 << 20  # multipart parts (S3 needs >= 5 MiB for all but the last)
MIN_PART = 5 << 20
#: SigV4's limit on a presigned URL's X-Amz-Expires
MAX_PRESIGN_SECONDS = 7 * 86400
#: a presigned URL stops working when the credentials that signed it expire, whatever
#: its X-Amz-Expires says: it is given their time left less this margin (clock skew,
#: the request's own time in flight)
CREDENTIALS_MARGIN = 60
#: temporary credentials with no known expiry (a bare AWS_SESSION_TOKEN in the
#: environment, as an on-demand Lambda function gets): 15 minutes, the shortest session
#: STS issues, so that a URL never claims more than any role session is sure to give
UNKNOWN_EXPIRY_SECONDS = 900


class Presigned(NamedTuple):
    """A presigned URL and how long it really works: ``seconds`` (its X-Amz-Expires)
    from when it was signed, until ``expires`` (Unix seconds)."""

    url: str
    seconds: int
    expires: int


class S3Store(Store):
    """``s3://bucket/prefix``. The endpoint follows boto3's own settings
    (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), which is how tests reach moto."""

    def __init__(self, uri: str) -> None:
        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"invalid S3 store URI {uri!r}: expected s3://bucket[/prefix]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._s3 = _client()

    def reconnect(self) -> None:
        self._s3 = _client()

    def _key(self, key: str) -> str:
        return "/".join(part for part in (self.prefix, key.strip("/")) if part)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise FileNotFoundError(kwargs.get("Key", what)) from exc
            if code in {"PreconditionFailed", "412"} and "IfMatch" in kwargs:
                raise ObjectChanged(f"{kwargs.get('Key')} in {self.uri} was replaced while "
                                    "it was being read") from exc
            raise StoreError(f"S3 {what} failed on {self.uri}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {what} failed on {self.uri}: {exc}") from exc

    def read_bytes(self, key: str) -> bytes:
        resp = self._call("get", self._s3.get_object, Key=self._key(key))
        return resp["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("put", self._s3.put_object, Key=self._key(key), Body=data)

    def update_json(self, key: str, change: Callable[[Any], Any],
                    attempts: int = 20) -> Any:
        """Compare-and-swap with S3's conditional writes: the put carries the ETag that
        was read (If-Match), or If-None-Match: * when there was no object; a concurrent
        writer makes it fail with 412 (or 409), and the update starts again."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        for _ in range(attempts):
            try:
                resp = self._call("get", self._s3.get_object, Key=full)
                old, condition = json.loads(resp["Body"].read()), {"IfMatch": resp["ETag"]}
            except FileNotFoundError:
                old, condition = None, {"IfNoneMatch": "*"}
            new = change(old)
            try:
                self._s3.put_object(Bucket=self.bucket, Key=full, Body=json_bytes(new),
                                    **condition)
            except BotoCoreError as exc:
                raise StoreError(f"S3 put failed on {self.uri}: {exc}") from exc
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
                    continue  # someone else wrote first: read their version and retry
                raise StoreError(f"S3 put failed on {self.uri}: {code or exc}") from exc
            return new
        raise StoreError(f"{key} in {self.uri} kept changing under {attempts} attempts "
                         "to update it")

    def exists(self, key: str) -> bool:
        try:
            self._call("head", self._s3.head_object, Key=self._key(key))
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._call("head", self._s3.head_object, Key=self._key(key))["ContentLength"])

    def stat(self, key: str) -> dict[str, Any] | None:
        """``{"size", "etag", "modified"}`` of ``key`` (the ETag without its quotes), or
        None when there is no such object."""
        try:
            head = self._call("head", self._s3.head_object, Key=self._key(key))
        except FileNotFoundError:
            return None
        return {"size": int(head["ContentLength"]), "etag": str(head["ETag"]).strip('"'),
                "modified": head["LastModified"]}

    def iter_chunks(self, key: str, chunk_size: int = CHUNK, start: int = 0,
                    end: int | None = None, etag: str | None = None) -> Iterator[bytes]:
        if end is not None and end <= start:
            return
        ranged: dict[str, str] = {} if not start and end is None else {
            "Range": f"bytes={start}-{'' if end is None else end - 1}"}
        if etag:
            ranged["IfMatch"] = f'"{etag.strip(chr(34))}"'
        body = self._call("get", self._s3.get_object, Key=self._key(key), **ranged)["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys a call
            resp = self._call("delete", self._s3.delete_objects, Delete={
                "Objects": [{"Key": self._key(k)} for k in keys[start:start + 1000]],
                "Quiet": True})
            if resp.get("Errors"):
                error = resp["Errors"][0]
                raise StoreError(f"S3 delete failed on {self.uri}: {error.get('Code')} "
                                 f"for {error.get('Key')}")

    def concat(self, key: str, parts: list[str], sizes: list[int] | None = None) -> None:
        """One multipart upload: a part of at least 5 MiB is copied by S3 itself
        (UploadPartCopy: its bytes never pass through here; 8 copies at a time). S3
        needs 5 MiB for every upload part but the last: smaller parts are read and sent
        with their neighbours, and a big part after unsent bytes first tops them up to
        5 MiB from its start, the rest copied (CopySourceRange), so that the upload has
        at most about two parts for each of ``parts``. ``sizes``: the parts' sizes, if
        known (else one HEAD each)."""
        from concurrent.futures import ThreadPoolExecutor

        sizes = sizes if sizes is not None else [self.size(p) for p in parts]
        with ThreadPoolExecutor(8) as pool, self.open_writer(key) as out:
            writer: _PartWriter = out  # type: ignore[assignment]
            try:
                for part, size in zip(parts, sizes, strict=True):
                    head = MIN_PART - writer.pending if 0 < writer.pending < MIN_PART else 0
                    if size - head < MIN_PART:  # too small to copy: read it
                        for chunk in self.iter_chunks(part, PART_SIZE):
                            writer.write(chunk)
                        continue
                    if head:
                        writer.write(b"".join(self.iter_chunks(part, PART_SIZE, 0, head)))
                    writer.flush()
                    writer.copy(pool, self._key(part), head, size)
                writer.wait()
            except BaseException:
                writer.wait(quiet=True)  # no copy may land after the upload is aborted
                raise

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[Writer]:
        """A multipart upload, completed only when the block ends cleanly; aborted
        (no object, no parts left behind) when it raises."""
        full = self._key(key)
        upload = self._call("multipart start", self._s3.create_multipart_upload, Key=full)
        writer = _PartWriter(self, full, upload["UploadId"])
        try:
            yield writer
            writer.flush(final=True)
            writer.wait()
            self._call("multipart complete", self._s3.complete_multipart_upload, Key=full,
                       UploadId=writer.upload_id, MultipartUpload={"Parts": writer.parts})
        except BaseException:
            with contextlib.suppress(Exception):
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                UploadId=writer.upload_id)
            raise

    def _list(self, prefix: str, delimiter: str | None) -> list[dict[str, Any]]:
        pages = []
        base = self._key(prefix)
        kwargs: dict[str, Any] = {"Prefix": f"{base}/" if base else ""}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        token = None
        while True:
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", self._s3.list_objects_v2, **kwargs)
            pages.append(resp)
            token = resp.get("NextContinuationToken")
            if not token:
                return pages

    def objects(self, prefix: str) -> list[dict[str, Any]]:
        """The objects whose keys start with ``prefix`` (no ``/`` added): each as
        ``{"key", "size", "modified"}``, ``key`` relative to the store. A listing reads
        no object's contents (``s3:ListBucket`` is all it needs)."""
        found, token = [], None
        base, skip = self._key(prefix), len(self._key("")) + (1 if self.prefix else 0)
        if base and (prefix.endswith("/") or not prefix.strip("/")):
            base += "/"  # a folder's objects: not those of a sibling that starts alike
        while True:
            kwargs: dict[str, Any] = {"Prefix": base}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", self._s3.list_objects_v2, **kwargs)
            found += [{"key": o["Key"][skip:], "size": int(o["Size"]),
                       "modified": o["LastModified"]} for o in resp.get("Contents", [])]
            token = resp.get("NextContinuationToken")
            if not token:
                return found

    def presigned(self, method: str, key: str, expires: int, **params: Any) -> Presigned:
        """A presigned URL for ``method`` (``get_object``, ``put_object``) on ``key``,
        valid ``expires`` seconds or less (see ``url_seconds``), and how long it is;
        ``params`` (ContentType, ContentLength) are signed into it, so that S3 refuses a
        request that sends others."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            seconds = self.url_seconds(expires)
            # the URL's X-Amz-Date (whole seconds) is read after this: ``expires`` is
            # never later than S3's own
            signed = int(time.time())
            url = str(self._s3.generate_presigned_url(
                method, Params={"Bucket": self.bucket, "Key": self._key(key), **params},
                ExpiresIn=seconds))
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"S3 presign failed on {self.uri}: {exc}") from exc
        return Presigned(url, seconds, signed + seconds)

    def presign(self, method: str, key: str, expires: int, **params: Any) -> str:
        """``presigned``'s URL alone."""
        return self.presigned(method, key, expires, **params).url

    def url_seconds(self, asked: int) -> int:
        """How long a URL signed now for ``asked`` seconds really works (at least 1):
        SigV4 allows 7 days; long-lived keys (no session token) sign for up to that;
        temporary credentials of known expiry (assume-role, the container and instance
        metadata providers that Lambda SnapStart and Managed Instances use) until
        CREDENTIALS_MARGIN before it; others UNKNOWN_EXPIRY_SECONDS. Credentials about
        to expire are refreshed first, where botocore can."""
        from botocore.credentials import RefreshableCredentials

        seconds = min(asked, MAX_PRESIGN_SECONDS)
        signer = getattr(self._s3, "_request_signer", None)  # the credentials that sign
        creds = getattr(signer, "_credentials", None)
        if creds is None:  # an unsigned client: nothing else expires
            return max(1, seconds)
        frozen = creds.get_frozen_credentials()  # botocore's own refresh, where it is due
        left = _seconds_left(creds)
        if left is not None and left < 2 * CREDENTIALS_MARGIN and \
                isinstance(creds, RefreshableCredentials):
            # botocore only refreshes inside its own windows (which a provider may set
            # shorter): a URL that would get under a minute is worth a refresh
            with creds._refresh_lock:
                creds._protected_refresh(is_mandatory=False)  # a failure is logged
            frozen = creds.get_frozen_credentials()
            left = _seconds_left(creds)
        if left is not None:
            seconds = min(seconds, int(left) - CREDENTIALS_MARGIN)
        elif frozen.token:
            seconds = min(seconds, UNKNOWN_EXPIRY_SECONDS)
        return max(1, seconds)

    def children(self, prefix: str) -> list[str]:
        names = set()
        for page in self._list(prefix, "/"):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(n for n in names if not n.startswith("."))



def _seconds_left(creds: Any) -> float | None:
    """Seconds until ``creds`` expire, or None where that is not known (botocore keeps
    it only on RefreshableCredentials, with no public accessor)."""
    from botocore.credentials import RefreshableCredentials

    expiry = getattr(creds, "_expiry_time", None)
    if not isinstance(creds, RefreshableCredentials) or not isinstance(expiry, datetime):
        return None
    return (expiry - datetime.now(UTC)).total_seconds()


def _client() -> Any:
    import boto3
    from botocore.config import Config

    # SigV4 everywhere: presigned URLs then sign Content-Type and Content-Length too
    return boto3.client("s3", config=Config(signature_version="s3v4"))


class _PartWriter:
    """Buffers writes into parts of PART_SIZE bytes (S3's minimum is 5 MiB but for the
    last part): memory stays at one part whatever the object's size."""

    def __init__(self, store: S3Store, key: str, upload_id: str) -> None:
        self.store, self.key, self.upload_id = store, key, upload_id
        self.parts: list[dict[str, Any]] = []
        self._buffer = bytearray()
        self._copies: list[Any] = []  # futures of UploadPartCopy calls

    @property
    def pending(self) -> int:
        """Bytes written and not yet sent as a part."""
        return len(self._buffer)

    def copy(self, pool: Any, source: str, start: int, size: int) -> None:
        """The next part is bytes ``start`` to ``size`` of the object ``source`` (at
        least 5 MiB of them), copied by S3."""
        number = len(self.parts) + 1
        entry: dict[str, Any] = {"PartNumber": number}
        self.parts.append(entry)
        ranged = {"CopySourceRange": f"bytes={start}-{size - 1}"} if start else {}

        def run() -> None:
            resp = self.store._call(
                "multipart copy", self.store._s3.upload_part_copy, Key=self.key,
                UploadId=self.upload_id, PartNumber=number,
                CopySource={"Bucket": self.store.bucket, "Key": source}, **ranged)
            entry["ETag"] = resp["CopyPartResult"]["ETag"]

        self._copies.append(pool.submit(run))

    def wait(self, quiet: bool = False) -> None:
        """Wait for the copies; raise the first one's failure, if any (the upload is
        then aborted), unless ``quiet``."""
        copies, self._copies = self._copies, []
        for future in copies:
            try:
                future.result()
            except Exception:
                if not quiet:
                    raise

    def write(self, data: bytes, /) -> int:
        self._buffer += data
        if len(self._buffer) >= PART_SIZE:
            self.flush()
        return len(data)

    def flush(self, final: bool = False) -> None:
        empty_object = final and not self.parts  # completing needs at least one part
        if not self._buffer and not empty_object:
            return
        number = len(self.parts) + 1
        resp = self.store._call("multipart upload", self.store._s3.upload_part, Key=self.key,
                                UploadId=self.upload_id, PartNumber=number,
                                Body=bytes(self._buffer))
        self.parts.append({"ETag": resp["ETag"], "PartNumber": number})
        self._buffer.clear()


