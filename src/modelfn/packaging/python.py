"""A local stand-in for Lambda's python3.12 runtime, where this machine has one: the
built layer is run under it by the sam-build test and the cold-start benchmark."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

LAMBDA_PYTHON = (3, 12)


def lambda_python(version: tuple[int, int] = LAMBDA_PYTHON) -> str | None:
    """The real binary of a local CPython 3.12 (or ``version``: 3.13 for Lambda Managed
    Instances; not a pyenv shim: a shim is a shell script that would add its own
    start-up to every measurement), or None."""
    pyenv = Path("~/.pyenv/versions").expanduser()
    name = "python{}.{}".format(*version)
    candidates = [*map(str, sorted(pyenv.glob("{}.{}*/bin/".format(*version) + name))),
                  shutil.which(name)]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(version):
            return candidate
    return None
