"""The README's operating guide runs: each `modelfn` command in it is run here against
a local store (the AWS-only ones are parsed), each `make` line is a target make
accepts, and each profile and parameter it names exists."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from modelfn.cli import main, parser
from tests.conftest import ROOT


def guide() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Operating it")
    return text[start:text.index("\n## ", start + 1)]


def commands(prefix: str) -> list[str]:
    """Lines of the guide's sh blocks, and inline `code`, that start with ``prefix``."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", guide(), re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith(prefix):
                found.append(line)
    inline = prefix.removeprefix(".venv/bin/") + " "  # e.g. `modelfn promote ... --store`
    found += [c for c in re.findall(r"`([^`\n]+)`", guide())
              if c.startswith(inline) and "--store" in c]
    return found


def test_the_guide_has_the_commands_it_promises() -> None:
    text = " ".join(commands(".venv/bin/modelfn"))
    for needed in ("train", "--remote sagemaker", "build", "models", "promote", "package",
                   "--image"):
        assert needed in text
    assert len(commands("make deploy")) >= 3


def test_every_modelfn_command_in_the_guide_runs(store_copy: Path, sam_build: Path,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ran = parsed = 0
    for line in commands(".venv/bin/modelfn"):
        argv = shlex.split(line.replace("$STORE", str(store_copy)))
        argv = argv[1:]  # the program
        if "--remote" in argv:  # needs SageMaker: tests/integration/test_sagemaker.py
            args = parser().parse_args(argv)
            assert args.remote == "sagemaker" and args.role.startswith("arn:aws:iam::")
            parsed += 1
            continue
        if argv[0] == "package":
            argv += ["--build-dir", str(sam_build), "--out", str(tmp_path / "dist")]
        if argv[0] == "train":
            argv += ["--epochs", "2", "--quiet"]  # the guide's own, only shorter
        if argv[0] == "eval":  # its report goes to tmp_path, not ./eval/ in the checkout
            argv += ["--out", str(tmp_path / "eval")]
        assert main(argv) == 0, (line, capsys.readouterr())
        ran += 1
    out = capsys.readouterr().out
    assert "canary → 2" in out and "live from 2 → 1" in out  # promote, then roll back
    assert ran >= 7 and parsed == 1
    assert list((tmp_path / "dist").glob("minilm-*-models-layer.zip"))
    assert (tmp_path / "dist" / "minilm-1-image" / "Dockerfile").is_file()


def test_every_make_line_in_the_guide_is_a_target_with_known_parameters() -> None:
    for line in commands("make "):
        argv = shlex.split(re.sub(r"<[^>]+>", "x", line))
        out = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, (line, out.stderr)
        assigns = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
        if argv[1] == "deploy":  # its profile and overrides are checked as make would
            assert main(["deploy-parameters", "--config-env", assigns.get("ENV", "dev"),
                         *assigns.get("OVERRIDES", "").split()]) == 0


def test_every_profile_and_stack_the_guide_names_exists() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    for env in re.findall(r"ENV=(\w+)", guide()):
        assert env in config
    for stack in re.findall(r"--stack-name (\S+)", guide()):
        assert stack in {config[e]["global"]["parameters"]["stack_name"] for e in config
                         if e != "version"}
