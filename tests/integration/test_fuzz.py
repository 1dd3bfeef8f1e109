"""Schemathesis against `modelfn serve --with-s3` (the asynchronous routes on): cases
generated from the served OpenAPI document for every operation, every check on
(tests/schemathesis.toml), a fixed seed so that CI reruns the same cases. Zero failures;
at least 500 cases."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, start, stop


@pytest.fixture(scope="module")
def server(built_store: Path) -> Iterator[str]:
    port = free_port()
    proc = start(["serve", "--store", str(built_store), "--quiet", "--with-s3"], port)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def test_schemathesis_finds_no_failure_in_500_or_more_cases(server: str) -> None:
    st = Path(sys.executable).parent / "schemathesis"
    proc = subprocess.run(
        [str(st), "--config-file", str(ROOT / "tests/schemathesis.toml"), "run",
         f"{server}/openapi.json", "--checks", "all", "--max-examples", "60", "--seed", "1",
         "--no-color"], capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    found = re.search(r"(\d+) generated, (\d+) passed", out)
    assert proc.returncode == 0 and found, out[-6000:]
    generated, passed = map(int, found.groups())
    assert generated >= 500 and passed == generated, out[-3000:]
