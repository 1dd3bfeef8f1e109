"""The runtime configuration: every MODELFN_* setting read once, with its default, and a
clear error for a value that is not one."""

from __future__ import annotations

import pytest

from modelfn.config import BatchLimits, Settings
from modelfn.errors import ConfigError


def test_settings_defaults_are_values() -> None:
    s = Settings.from_env({})
    assert (s.store, s.max_body_bytes, s.max_batch, s.preload, s.alias, s.threads) == (
        ".modelfn", 1 << 20, 64, (), "live", 0)
    assert s.batch == BatchLimits(20 << 30, 500_000_000, 32, 100_000, 64 << 20) == BatchLimits()
    assert all(isinstance(v, int) for v in s.batch)
    assert s.idempotency_ttl_seconds == 7 * 86400 and s.idempotency_table == ""


def test_settings_read_every_variable() -> None:
    s = Settings.from_env({
        "MODELFN_STORE": "s3://b/p", "MODELFN_MAX_BODY_BYTES": "10", "MODELFN_MAX_BATCH": "3",
        "MODELFN_PRELOAD": " a:1, b ,", "MODELFN_ALIAS": "canary", "MODELFN_THREADS": "2",
        "MODELFN_BATCH_MAX_BYTES": "100", "MODELFN_BATCH_MAX_LINES": "7",
        "MODELFN_BATCH_MICRO_BATCH": "5", "MODELFN_IDEMPOTENCY_TABLE": "t",
        "MODELFN_IDEMPOTENCY_TTL_SECONDS": "60"})
    assert (s.store, s.max_body_bytes, s.max_batch, s.preload, s.alias, s.threads) == (
        "s3://b/p", 10, 3, ("a:1", "b"), "canary", 2)
    assert s.batch == BatchLimits(100, 7, 5)
    assert (s.idempotency_table, s.idempotency_ttl_seconds) == ("t", 60)


@pytest.mark.parametrize("name, value, message", [
    ("MODELFN_MAX_BATCH", "many", "expected an integer"),
    ("MODELFN_MAX_BATCH", "0", "at least 1"),
    ("MODELFN_BATCH_MAX_LINES", "-1", "at least 1"),
    ("MODELFN_THREADS", "-1", "at least 0"),
])
def test_settings_refuse_what_is_not_a_value(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}.*{message}"):
        Settings.from_env({name: value})


def test_a_busy_neighbour_is_seen_and_takes_its_cpu_from_the_threads() -> None:
    """A process spinning on one of this process's CPUs is counted as (about) one busy
    CPU, and a local server's threads leave it out."""
    import os
    import subprocess
    import sys
    import time

    from modelfn.config import busy_cpus, cpu_count, usable_threads

    allowed = sorted(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(spinner.pid, {allowed[0]})
        time.sleep(0.3)
        busy = busy_cpus(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.8 <= busy <= len(allowed), busy
    assert usable_threads(cpu_count(), busy) == max(1, min(cpu_count(), round(cpu_count()
                                                                            - busy)))
    assert usable_threads(2, 1.0) == 1 and usable_threads(2, 0.1) == 2
    assert usable_threads(4, 3.9) == 1 and usable_threads(8, 2.6) == 5
    assert usable_threads(1, 0.0) == 1  # never more than the CPUs it may use


def test_cpu_times_read_only_the_cpus_this_process_may_use() -> None:
    from modelfn.config import _cpu_times

    stat = ("cpu  10 0 10 80 0 0 0 0 0 0\n"
            "cpu0 5 0 5 40 10 0 0 0 0 0\ncpu1 1 0 1 90 0 0 0 0 0 0\nintr 1 2 3\n")
    assert _cpu_times(stat, {0}) == {0: (50, 60)}
    assert _cpu_times(stat, {0, 1}) == {0: (50, 60), 1: (90, 92)}
