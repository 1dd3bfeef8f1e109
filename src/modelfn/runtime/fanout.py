"""Batch files of any size: cut into parts on line ends, run concurrently, stitched.

A file is read once to plan it: its lines are counted and it is cut where a part
reaches ``part_lines`` lines (a multiple of the micro-batch, so that a file without
blank or bad lines runs the same micro-batches whole or in parts) or ``part_bytes``
bytes. A file of one part runs as it always did (:func:`batch.process_object`).

Deployed (:class:`FanOut`), the parts are messages on the batch queue itself, run by
the batch function like any record, with a DynamoDB item per split file:

1. the S3 event's run plans the file, puts the item ``{run, parts: N}`` and sends one
   message per part (each carrying its byte range and first line number);
2. a part runs its range into ``batch-parts/<run>/<part>.jsonl`` (+ its summary), then
   adds its number to the item's ``done`` set; the part that completes the set sends
   the ``finish`` message;
3. ``finish`` stitches the parts into ``outputs/<key>`` with one multipart upload
   (S3 copies parts of 5 MiB and more itself), writes the file's summary, and deletes
   the parts.

Every stage is idempotent (Powertools' record per stage and part in the batch
function, the ``done`` set, a deterministic output): a redelivered or retried message
adds no row. A part that fails is retried by the queue; on its last delivery it fails
the file: the item is marked failed, the summary names the part and the reason, no
output is written, and the parts still queued do nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np

from modelfn.config import BatchLimits
from modelfn.errors import LimitExceeded, ModelfnError, ObjectChanged, StoreError
from modelfn.runtime import batch
from modelfn.runtime.repository import Repository
from modelfn.store import S3Store, Store
from modelfn.store.keys import PARTS_PREFIX, model_from_key, output_key, part_file, summary_key

#: at most this many parts a file (S3's multipart upload takes 10,000 parts, and the
#: stitching may need one more for each part it reads rather than copies)
MAX_PARTS = 5000
#: the planner reads the file in ranges of this size, this many at once
READ_CHUNK = 16 << 20
READ_AHEAD = 4
PART_MESSAGE, FINISH_MESSAGE = "batch-part", "batch-finish"


class OutOfTime(Exception):  # noqa: N818 (not an error of the input: of the invocation)
    """The invocation is about to reach its timeout (BatchTimeout): stop cleanly, so that
    the failure is reported rather than the function killed mid-write."""


def deadline(remaining_ms: int) -> float:
    """The ``time.monotonic()`` by which a stage stops, for an invocation with
    ``remaining_ms`` left: a tenth of it (10 s at least) kept to abort and report."""
    seconds = remaining_ms / 1000
    return time.monotonic() + seconds - max(10.0, seconds / 10)


def _check(when: float | None, what: str) -> None:
    if when is not None and time.monotonic() > when:
        raise OutOfTime(what)


@dataclass(frozen=True)
class Part:
    """Bytes ``start`` to ``end`` (exclusive) of a file: whole lines, the first of them
    line ``first_line`` (1-based, blank lines counted) of the file."""

    index: int
    start: int
    end: int
    first_line: int
    lines: int

    def describe(self, total: int) -> str:
        return (f"part {self.index + 1} of {total} (lines {self.first_line}-"
                f"{self.first_line + self.lines - 1})")


def plan(chunks: Iterable[bytes], part_bytes: int, part_lines: int) -> list[Part]:
    """Cut the bytes ``chunks`` yields into parts that end at a line end, each of at
    most ``part_lines`` lines and ending at the first line end at or past
    ``part_bytes`` bytes. A last line without its ``\\n`` is a line."""
    parts: list[Part] = []
    start, first, lines, offset = 0, 1, 0, 0

    def cut(end: int) -> None:
        nonlocal start, first, lines
        parts.append(Part(len(parts), start, end, first, lines))
        start, first, lines = end, first + lines, 0

    last = b""
    for chunk in chunks:
        if not chunk:
            continue
        ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + offset + 1
        i = 0  # line ends of this chunk not yet counted
        while i < len(ends):
            by_lines = i + part_lines - lines - 1  # the line end that fills the part
            by_bytes = i + int(np.searchsorted(ends[i:], start + part_bytes))
            j = min(by_lines, by_bytes)
            if j >= len(ends):
                break
            lines += j - i + 1
            cut(int(ends[j]))
            i = j + 1
        lines += len(ends) - i
        offset += len(chunk)
        last = chunk[-1:]
    if offset > start:  # the last part; its last line may lack its "\n"
        lines += last != b"\n"
        cut(offset)
    return parts


def read_plan(store: Store, key: str, limits: BatchLimits, etag: str | None = None,
              until: float | None = None) -> list[Part]:
    """Plan ``key`` in ``store`` (its ranges read ahead, a few at once; of the object
    with ``etag`` only, if given); LimitExceeded for a file over the limits (bytes,
    lines, parts) or one that cannot be read before ``until`` (a monotonic time)."""
    size = store.size(key)
    if size > limits.max_bytes:
        raise LimitExceeded(f"the file is {size} bytes; the limit is {limits.max_bytes}")
    part_lines = _part_lines(limits)
    try:
        parts = plan(_read_ahead(store, key, size, etag, until), limits.part_bytes,
                     part_lines)
    except OutOfTime as exc:  # retrying cannot help: the file is too big to plan
        raise LimitExceeded(str(exc)) from None
    lines = sum(p.lines for p in parts)
    if lines > limits.max_lines:
        raise LimitExceeded(f"the file has more than {limits.max_lines} lines")
    if len(parts) > MAX_PARTS:
        raise LimitExceeded(f"the file needs {len(parts)} parts of at most {part_lines} "
                            f"lines or {limits.part_bytes} bytes; the most is {MAX_PARTS}: "
                            "raise the part size (MODELFN_BATCH_PART_LINES, "
                            "MODELFN_BATCH_PART_BYTES)")
    return parts


def _part_lines(limits: BatchLimits) -> int:
    """Lines a part, rounded down to a multiple of the micro-batch (one at least)."""
    return max(limits.micro_batch, limits.part_lines // limits.micro_batch * limits.micro_batch)


def _read_ahead(store: Store, key: str, size: int, etag: str | None = None,
                until: float | None = None) -> Iterator[bytes]:
    """The object's bytes in order, READ_AHEAD ranges fetched at once; OutOfTime past
    ``until``."""
    late = (f"the file ({size} bytes) could not be read to plan its parts within the "
            "function's timeout: raise BatchTimeout (at most 900 s) or upload it as "
            "smaller files")
    def fetch(start: int) -> bytes:
        return b"".join(store.iter_chunks(key, READ_CHUNK, start, min(size, start +
                                                                       READ_CHUNK), etag))

    with ThreadPoolExecutor(READ_AHEAD) as pool:
        pending: list[Future[bytes]] = []
        starts = iter(range(0, size, READ_CHUNK))
        for start in starts:
            pending.append(pool.submit(fetch, start))
            if len(pending) == READ_AHEAD:
                break
        while pending:
            chunk = pending.pop(0).result()
            nxt = next(starts, None)
            if nxt is not None:
                pending.append(pool.submit(fetch, nxt))
            _check(until, late)
            yield chunk


def run_part(store: Store, key: str, part: Part, repo: batch.Models, out: Store,
             out_key: str, limits: BatchLimits, *, default_model: str | None,
             default_version: str | None = None, etag: str | None = None,
             no_model_hint: str = batch.NO_MODEL_HINT,
             progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Run one part of ``key`` (of the object with ``etag``, if given) into ``out_key``
    of ``out`` (whole or not at all); return its summary. Failures other than a line's
    raise, as for a whole file; so does ``progress``, to stop it."""
    summary = batch.Summary(input=key, output=out_key)
    with out.open_writer(out_key) as writer:
        batch.run_lines(store.iter_lines(key, part.start, part.end, etag), repo,
                        writer.write, summary=summary, default_model=default_model,
                        default_version=default_version, limits=limits, progress=progress,
                        no_model_hint=no_model_hint, first_line=part.first_line)
    return summary.as_dict()


def merged(key: str, output: str, parts: list[dict[str, Any]], seconds: float
           ) -> batch.Summary:
    summary = batch.Summary(input=key, output=output, parts=len(parts), seconds=seconds)
    for part in parts:
        summary.add(part)
    return summary


def run_id(bucket: str, key: str, etag: str, object_version: str = "") -> str:
    """One run an upload: a redelivered event names the same object version, a new
    upload of the same bytes (same ETag) another one."""
    return hashlib.sha256(f"{bucket}\0{key}\0{etag}\0{object_version}".encode()
                          ).hexdigest()[:32]


class FanOut:
    """The deployed fan-out over one bucket: the batch queue carries the parts, the
    DynamoDB table ``table`` counts them (see the module's docstring). The item of a
    run: ``parts``, ``created``, ``expires``, ``done`` (a set of part numbers), then
    ``stitching`` (the stitching began: no part may fail the file any more),
    ``finished``, or ``failed`` (the reason; nothing is stitched after it)."""

    def __init__(self, store: S3Store, bucket: str, table: str, queue_url: str,
                 attempts: int, retention_seconds: int) -> None:
        import boto3

        self.store, self.bucket, self.table, self.queue_url = store, bucket, table, queue_url
        self.attempts, self.retention = attempts, retention_seconds
        self._ddb, self._sqs = boto3.client("dynamodb"), boto3.client("sqs")

    # --- 1. the S3 event: plan, then run whole or send the parts -------------------------
    def start(self, obj: dict[str, Any], repo: Repository, limits: BatchLimits,
              until: float | None = None) -> dict[str, Any]:
        """``obj``: the event's ``key``, ``etag`` and ``object_version``."""
        key, etag = obj["key"], obj["etag"]
        if not (self.table and self.queue_url):  # not deployed to fan out: as before
            return batch.process_object(self.store, key, repo, limits)
        if self.store.size(key) < min(_part_lines(limits), limits.part_bytes):
            # fewer bytes than a part's lines (a line is a byte at least): one part
            return batch.process_object(self.store, key, repo, limits)
        try:
            parts = read_plan(self.store, key, limits, etag, until)
        except LimitExceeded as exc:
            return batch.reject(self.store, key, exc)
        except ObjectChanged:  # replaced while being planned: the new upload's event runs
            return {"input": key, "status": "skipped", "reason": "replaced"}
        if len(parts) <= 1:
            return batch.process_object(self.store, key, repo, limits)
        run = run_id(self.bucket, key, etag, obj.get("object_version", ""))
        now = time.time()
        self._call("put", self._ddb.put_item, TableName=self.table, Item={
            "run": {"S": run}, "key": {"S": key}, "parts": {"N": str(len(parts))},
            "created": {"N": f"{now:.3f}"}, "expires": {"N": str(int(now) + self.retention)}},
            ConditionExpression="attribute_not_exists(#r)", ExpressionAttributeNames={
                "#r": "run"}, exists_ok=True)
        # every part runs the version of the file's model live now, even if the alias
        # moves while the parts run
        model, version = model_from_key(key), None
        if model is not None:
            with contextlib.suppress(ModelfnError):  # no such model: each line says so
                version = repo.resolve(model)
        base = {"bucket": self.bucket, "key": key, "etag": etag, "run": run,
                "parts": len(parts), "object_version": obj.get("object_version", ""),
                "model_version": version}
        self._send([{"modelfn": PART_MESSAGE, **base, "part": list(astuple(p))}
                    for p in parts])
        return {"input": key, "status": "split", "run": run, "parts": len(parts)}

    # --- 2. a part ----------------------------------------------------------------------
    def part(self, message: dict[str, Any], repo: batch.Models, limits: BatchLimits,
             attempt: int, until: float | None = None) -> dict[str, Any]:
        part = Part(*message["part"])
        run, key, total = message["run"], message["key"], message["parts"]
        item = self._item(run)
        if {"failed", "stitching"} & set(item):  # the file failed, or all parts were
            # done already (this is a late copy of a message): nothing to add
            return {"input": key, "status": "skipped", "run": run, "part": part.index}
        what = part.describe(total)
        late = (f"{what} did not finish within the function's timeout (BatchTimeout): "
                "make parts smaller (BatchPartLines, BatchPartBytes) or raise BatchTimeout")
        try:
            result = run_part(
                self.store, key, part, repo, self.store, part_file(run, part.index, ".jsonl"),
                limits, default_model=model_from_key(key), etag=message["etag"],
                default_version=message.get("model_version"),
                progress=None if until is None else lambda _: _check(until, late))
            self.store.write_json(part_file(run, part.index, ".json"), result)
            done = self._call("update", self._ddb.update_item, TableName=self.table,
                              Key={"run": {"S": run}}, UpdateExpression="ADD done :p",
                              ExpressionAttributeValues={":p": {"SS": [str(part.index)]}},
                              ReturnValues="ALL_NEW")["Attributes"]
        except ObjectChanged as exc:  # a new upload of the key: its own event runs it
            return self._fail(run, key, total, f"{what}: {exc.message}; the new upload "
                              "runs on its own")
        except Exception as exc:
            if attempt < self.attempts:
                raise  # the queue delivers the part again
            return self._fail(run, key, total, f"{what} failed after {attempt} attempts: "
                              f"{_reason(exc)}")
        if len(done.get("done", {}).get("SS", [])) == total and "failed" not in done:
            self._send([{"modelfn": FINISH_MESSAGE, **{k: message[k] for k in (
                "bucket", "key", "etag", "object_version", "run", "parts")}}])
        return {"input": key, "status": "part done", "run": run, "part": part.index,
                "lines": result["lines"]}

    # --- 3. stitch ----------------------------------------------------------------------
    def finish(self, message: dict[str, Any], attempt: int) -> dict[str, Any]:
        run, key, total = message["run"], message["key"], message["parts"]
        item = self._item(run)
        if "finished" in item:  # a copy of this message: all is written
            return {"input": key, "status": "finished", "run": run}
        claimed = self._call(  # from now on no part may fail the file
            "update", self._ddb.update_item, TableName=self.table, Key={"run": {"S": run}},
            UpdateExpression="SET stitching = :t", ConditionExpression=(
                "attribute_not_exists(failed)"),
            ExpressionAttributeValues={":t": {"BOOL": True}}, exists_ok=True)
        if claimed is None:
            return {"input": key, "status": "skipped", "run": run}
        prefix = f"{PARTS_PREFIX}{run}/"
        outputs = [part_file(run, i, ".jsonl") for i in range(total)]
        summaries = [part_file(run, i, ".json") for i in range(total)]
        wrote = False
        try:
            sizes = {o["key"]: o["size"] for o in self.store.objects(prefix)}
            missing = [k for k in outputs + summaries if k not in sizes]
            if missing:
                raise StoreError(f"{len(missing)} part files are missing, e.g. {missing[0]}")
            with ThreadPoolExecutor(8) as pool:
                parts = list(pool.map(self.store.read_json, summaries))
            self.store.concat(output_key(key), outputs, [sizes[k] for k in outputs])
            wrote = True
            summary = merged(key, output_key(key), parts,
                             time.time() - float(item["created"]["N"]))
            result = summary.as_dict()
            self.store.write_json(summary_key(key), result)
        except Exception as exc:
            if attempt < self.attempts:
                raise
            return self._fail(run, key, total, f"stitching the {total} parts failed after "
                              f"{attempt} attempts: {_reason(exc)}", stitching=True,
                              wrote=wrote)
        self._call("update", self._ddb.update_item, TableName=self.table,
                   Key={"run": {"S": run}}, UpdateExpression="SET finished = :t",
                   ExpressionAttributeValues={":t": {"BOOL": True}})
        self.store.delete(outputs + summaries)
        return result

    # --- what the queue gave up on (its dead-letter queue's consumer) --------------------
    def dead_letter(self, message: dict[str, Any], reason: str) -> dict[str, Any]:
        """A part or the stitching of a split file whose every delivery failed or was
        killed: the file fails with ``reason`` (once; not a file already finished, nor,
        for a part, one whose stitching began: every part was done). A file replaced
        since keeps what its new upload's run writes: only this run is marked failed."""
        run, key, total = message["run"], message["key"], message["parts"]
        stitching = message.get("modelfn") == FINISH_MESSAGE
        what = (f"stitching the {total} parts" if stitching
                else Part(*message["part"]).describe(total))
        current = self.store.stat(key)
        return self._fail(run, key, total, f"{what}: {reason}", stitching=stitching,
                          wrote=stitching, replaced=current is None or
                          current["etag"] != message["etag"].strip('"'))

    def dead_letter_file(self, obj: dict[str, Any], reason: str) -> dict[str, Any]:
        """An upload's S3 event whose every delivery failed or was killed: the file
        fails with ``reason``, no output. Whole (never split): a failed summary, unless
        one newer than the upload says it ran (killed after writing it); split: its
        run fails as a part's would. An upload replaced or deleted since: nothing."""
        key, etag = obj["key"], obj["etag"].strip('"')
        current = self.store.stat(key)
        if current is None or current["etag"] != etag:
            return {"input": key, "status": "skipped", "reason": "replaced"}
        run = run_id(self.bucket, key, obj["etag"], obj.get("object_version", ""))
        item = self._call("get", self._ddb.get_item, TableName=self.table,
                          Key={"run": {"S": run}}, ConsistentRead=True).get(
                              "Item") if self.table else None
        if item is not None:  # planned, and its parts (some or all) were sent
            return self._fail(run, key, int(item["parts"]["N"]),
                              f"planning and sending its parts: {reason}")
        done = self.store.stat(summary_key(key))
        if done is not None and done["modified"] >= current["modified"]:
            summary: dict[str, Any] = self.store.read_json(summary_key(key))
            if not summary.get("error"):  # it ran (a file failed as a whole has one)
                return {"input": key, "status": "skipped", "reason": "done"}
        self.store.delete([output_key(key)])  # a run killed between output and summary
        summary = batch.Summary(input=key, output=output_key(key), status="failed",
                                error=reason).as_dict()
        self.store.write_json(summary_key(key), summary)
        return summary

    # --- helpers ------------------------------------------------------------------------
    def _fail(self, run: str, key: str, total: int, reason: str, stitching: bool = False,
              wrote: bool = False, replaced: bool = False) -> dict[str, Any]:
        """Fail the file once: the first failure writes the summary, and no output is
        written after it. A part cannot fail a file whose stitching began (every part
        was done: this is a late copy); the stitching itself can, until it finished."""
        condition = "attribute_not_exists(failed) AND attribute_not_exists(" + (
            "finished)" if stitching else "stitching)")
        first = self._call("update", self._ddb.update_item, TableName=self.table,
                           Key={"run": {"S": run}}, UpdateExpression="SET failed = :r",
                           ConditionExpression=condition,
                           ExpressionAttributeValues={":r": {"S": reason}}, exists_ok=True)
        if first is None:  # failed already (counted once), or done after all
            return {"input": key, "status": "skipped", "run": run}
        # this run's parts: nothing stitches them now
        self.store.delete([o["key"] for o in self.store.objects(f"{PARTS_PREFIX}{run}/")])
        if replaced:  # the key's new upload runs on its own: its files are not this run's
            return {"input": key, "status": "failed", "run": run, "error": reason,
                    "reason": "replaced"}
        if wrote:  # the output was written, its summary could not be: no output then
            self.store.delete([output_key(key)])
        summary = batch.Summary(input=key, output=output_key(key), status="failed",
                                error=reason, parts=total).as_dict()
        self.store.write_json(summary_key(key), summary)
        return summary

    def _item(self, run: str) -> dict[str, Any]:
        item = self._call("get", self._ddb.get_item, TableName=self.table,
                          Key={"run": {"S": run}}, ConsistentRead=True).get("Item")
        if item is None:
            raise StoreError(f"batch run {run} has no record in {self.table}")
        return dict(item)

    def _send(self, messages: list[dict[str, Any]]) -> None:
        for start in range(0, len(messages), 10):  # SendMessageBatch takes 10 a call
            entries = [{"Id": str(i), "MessageBody": json.dumps(m)}
                       for i, m in enumerate(messages[start:start + 10])]
            resp = self._call("send", self._sqs.send_message_batch, QueueUrl=self.queue_url,
                              Entries=entries)
            if resp.get("Failed"):
                raise StoreError(f"SQS refused {len(resp['Failed'])} part messages: "
                                 f"{resp['Failed'][0].get('Code')}")

    def _call(self, what: str, fn: Any, exists_ok: bool = False, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if exists_ok and code == "ConditionalCheckFailedException":
                return None
            raise StoreError(f"{what} on the batch runs failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"{what} on the batch runs failed: {exc}") from exc


def _reason(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"[:500]


# --- locally: parts in worker processes (modelfn batch --workers N) -------------------------

_worker: dict[str, Any] = {}


def _start_worker(settings: Any, store_uri: str, threads: int, events: Any) -> None:
    from modelfn.store import open_store

    _worker["repo"] = Repository.from_settings(settings._replace(threads=threads),
                                               open_store(store_uri))
    _worker["events"] = events


def _run_local_part(source: str, part: Part, folder: str, default_model: str | None,
                    limits: BatchLimits, hint: str) -> dict[str, Any]:
    from pathlib import Path

    from modelfn.store import LocalStore

    events, counted = _worker["events"], [0]

    def progress(n: int) -> None:  # a message per 1,000 lines, not per line
        counted[0] += n
        if counted[0] >= 1000:
            events.put(counted[0])
            counted[0] = 0

    path = Path(source)
    result = run_part(LocalStore(path.parent), path.name, part, _worker["repo"],
                      LocalStore(folder), f"{part.index:05d}.jsonl", limits,
                      default_model=default_model, no_model_hint=hint, progress=progress)
    events.put(counted[0])
    return result


def run_local(source: Any, target: Any, *, workers: int, settings: Any, store_uri: str,
              default_model: str | None, limits: BatchLimits, hint: str,
              progress: Callable[[int], Any] | None = None) -> batch.Summary:
    """``source`` (a local JSONL file) cut into parts run by ``workers`` processes, each
    with its share of the machine's cores, stitched into ``target`` (whole or not at
    all: a part that fails raises, and nothing is written). ``progress`` is called in
    this process with the lines done, as the workers report them."""
    import multiprocessing
    import shutil
    import tempfile
    import threading
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path

    from modelfn.config import cpu_count
    from modelfn.store import LocalStore

    started = time.perf_counter()
    source, target = Path(source), Path(target)
    reader = LocalStore(source.parent)
    parts = read_plan(reader, source.name, limits)
    lines = sum(p.lines for p in parts)
    if len(parts) < 2 * workers:  # two parts a worker at least: none left idle at the end
        parts = read_plan(reader, source.name, limits._replace(
            part_lines=max(1, -(-lines // (2 * workers)))))
    context = multiprocessing.get_context("spawn")  # no onnxruntime state forked
    events = context.Queue()
    threads = settings.threads or max(1, cpu_count() // workers)

    def relay() -> None:
        while (n := events.get()) is not None:
            if progress is not None and n:
                progress(n)

    listener = threading.Thread(target=relay, daemon=True)
    listener.start()
    with tempfile.TemporaryDirectory(prefix=".modelfn-parts-", dir=target.parent) as folder:
        try:
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                     initargs=(settings, store_uri, threads, events)) as pool:
                futures = [pool.submit(_run_local_part, str(source), p, folder,
                                       default_model, limits, hint) for p in parts]
                try:
                    results = [f.result() for f in futures]
                except BaseException:  # one part failed: the file fails, now
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        finally:
            events.put(None)
            listener.join()
        with LocalStore(target.parent).open_writer(target.name) as out:
            for p in parts:
                with (Path(folder) / f"{p.index:05d}.jsonl").open("rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)  # type: ignore[misc]
    return merged(str(source), str(target), results, time.perf_counter() - started)
