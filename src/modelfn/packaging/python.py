"""A local stand-in for Lambda's python3.12 runtime, where this machine has one: the
built layer is run under it by the sam-build test and the cold-start benchmark."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

LAMBDA_PYTHON = (3, 12)


def lambda_python() -> str | None:
    """The real binary of a local CPython 3.12 (not a pyenv shim: a shim is a shell
    script that would add its own start-up to every measurement), or None."""
    pyenv = Path("~/.pyenv/versions").expanduser()
    candidates = [*map(str, sorted(pyenv.glob("3.12*/bin/python3.12"))),
                  shutil.which("python3.12")]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(LAMBDA_PYTHON):
            return candidate
    return None
