"""The S3 store's own behaviour on moto's S3: its URI and prefix, what absent and
replaced objects raise, ranges, the multipart writer (empty, one part, several),
deletes and listings past S3's 1,000 a call, and an update that cannot win."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
import requests

from modelfn.errors import ObjectChanged, StoreError
from modelfn.store import s3 as s3_mod
from modelfn.store.s3 import S3Store


def test_the_uri_names_a_bucket_and_an_optional_prefix(s3_bucket: str) -> None:
    store = S3Store(f"s3://{s3_bucket}//p/q/")
    assert (store.bucket, store.prefix, store.uri) == (s3_bucket, "p/q", f"s3://{s3_bucket}/p/q")
    assert S3Store(f"s3://{s3_bucket}").uri == f"s3://{s3_bucket}"
    with pytest.raises(StoreError, match=r"invalid S3 store URI 's3://': expected "
                                         r"s3://bucket\[/prefix\]"):
        S3Store("s3://")
    store.write_bytes("/a/b.txt", b"x")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["p/q/a/b.txt"]
    assert store.objects("a/") == [{"key": "a/b.txt", "size": 1,
                                    "modified": store.objects("a/")[0]["modified"]}]


def test_absent_is_file_not_found_and_other_failures_name_the_store(s3_bucket: str) -> None:
    store = S3Store(f"s3://{s3_bucket}/p")
    for call in (lambda: store.read_bytes("none"), lambda: store.size("none")):
        with pytest.raises(FileNotFoundError):
            call()
    assert not store.exists("none")
    gone = S3Store("s3://no-such-bucket-for-this-test")
    with pytest.raises(StoreError) as info:
        gone.read_bytes("k")
    assert info.value.message == "S3 get failed on s3://no-such-bucket-for-this-test: " \
                                 "NoSuchBucket"
    with pytest.raises(StoreError, match="S3 put failed on s3://no-such-bucket-for-this-test"):
        gone.write_bytes("k", b"")


def test_a_range_of_a_replaced_object_is_object_changed(s3_bucket: str) -> None:
    store = S3Store(f"s3://{s3_bucket}")
    etag = boto3.client("s3").put_object(Bucket=s3_bucket, Key="f", Body=b"0123456789")["ETag"]
    assert b"".join(store.iter_chunks("f", 3, 2, 8, etag)) == b"234567"
    assert b"".join(store.iter_chunks("f", 3, 2, 8, etag.strip('"'))) == b"234567"
    assert b"".join(store.iter_chunks("f", 4, 7)) == b"789"
    assert b"".join(store.iter_chunks("f", 4)) == b"0123456789"
    assert list(store.iter_chunks("f", 4, 5, 5)) == [] == list(store.iter_chunks("f", 4, 6, 5))
    assert [len(c) for c in store.iter_chunks("f", 4)] == [4, 4, 2]
    store.write_bytes("f", b"new bytes")
    with pytest.raises(ObjectChanged) as info:
        b"".join(store.iter_chunks("f", 3, 0, 4, etag))
    assert info.value.message == f"f in s3://{s3_bucket} was replaced while it was being read"


def test_the_writer_sends_parts_of_part_size_and_an_empty_object(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = S3Store(f"s3://{s3_bucket}")
    with store.open_writer("empty") as out:
        pass
    assert store.read_bytes("empty") == b"" and store.exists("empty")
    monkeypatch.setattr(s3_mod, "PART_SIZE", 5 << 20)
    sent: list[int] = []
    real = store._s3.upload_part

    def spy(**kwargs: Any) -> Any:
        sent.append(len(kwargs["Body"]))
        return real(**kwargs)

    monkeypatch.setattr(store._s3, "upload_part", spy)
    block = b"a" * (3 << 20)
    with store.open_writer("big") as out:
        for _ in range(4):
            assert out.write(block) == len(block)
    assert sent == [6 << 20, 6 << 20]  # flushed at each crossing of 5 MiB, then the rest
    assert store.read_bytes("big") == block * 4
    assert store.size("big") == 12 << 20


def test_deletes_go_past_1000_keys_a_call(s3_bucket: str) -> None:
    store = S3Store(f"s3://{s3_bucket}/p")
    keys = [f"many/{i:04d}" for i in range(1003)]
    for k in (keys[0], keys[999], keys[1000], keys[1002], "other"):
        store.write_bytes(k, b"x")  # (keys that are not there delete quietly)
    store.delete(keys)
    assert [o["key"] for o in store.objects("")] == ["other"]
    store.delete([])


def test_listings_follow_every_page(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = S3Store(f"s3://{s3_bucket}/p")
    keys = [f"many/{i}" for i in range(5)]
    for i, k in enumerate(keys):
        store.write_bytes(k, b"x" * i)
    store.write_bytes("manyx", b"")
    real = store._s3.list_objects_v2
    pages: list[int] = []

    def two_a_page(**kwargs: Any) -> Any:
        resp = real(MaxKeys=2, **kwargs)
        pages.append(len(resp.get("Contents", [])))
        return resp

    monkeypatch.setattr(store._s3, "list_objects_v2", two_a_page)
    listed = store.objects("many/")
    assert [o["key"] for o in listed] == keys and [o["size"] for o in listed] == [0, 1, 2, 3, 4]
    assert pages == [2, 2, 1]
    assert store.children("") == ["many"]
    assert [o["key"] for o in store.objects("many")][-1] == "manyx"  # no "/": a key prefix
    S3Store(f"s3://{s3_bucket}/px").write_bytes("y", b"")  # a sibling of the store's prefix
    assert len(store.objects("")) == 6 == len(store.objects("/"))


def test_children_are_the_visible_folders_under_a_prefix(s3_bucket: str) -> None:
    store = S3Store(f"s3://{s3_bucket}/root")
    for key in ("models/b/1/m", "models/a/m", "models/.hidden/m", "models/file", "x/y"):
        store.write_bytes(key, b"")
    assert store.children("models") == ["a", "b"]
    assert store.children("") == ["models", "x"]
    assert store.children("nothing") == []


def test_an_update_that_never_wins_says_so(s3_bucket: str) -> None:
    store = S3Store(f"s3://{s3_bucket}")
    store.write_json("c.json", {"n": 0})
    other = S3Store(f"s3://{s3_bucket}")
    calls: list[Any] = []

    def change(old: Any) -> Any:
        calls.append(old)
        other.write_json("c.json", {"n": len(calls)})  # someone else always writes first
        return {"n": -1}

    with pytest.raises(StoreError, match=f"c.json in s3://{s3_bucket} kept changing under 3 "
                                         "attempts to update it"):
        store.update_json("c.json", change, attempts=3)
    assert calls == [{"n": 0}, {"n": 1}, {"n": 2}]
    created = store.update_json("fresh.json", lambda old: {"was": old})
    assert created == {"was": None} == store.read_json("fresh.json")


def test_a_presigned_url_reads_the_object(s3_bucket: str) -> None:
    store = S3Store(f"s3://{s3_bucket}/p")
    store.write_bytes("r.json", b'{"a": 1}')
    url = store.presign("get_object", "r.json", 60)
    assert f"/{s3_bucket}/p/r.json" in url or f"{s3_bucket}" in url
    assert requests.get(url, timeout=30).content == b'{"a": 1}'
