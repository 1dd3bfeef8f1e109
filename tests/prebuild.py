"""``python -m tests.prebuild DIR``: the store the ``built_store`` fixture builds, built
once into DIR (nothing is done if DIR holds it already), for runs that set
``MODELFN_TEST_STORE=DIR`` (``make mutate``)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import build_examples


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.prebuild DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    if (root / "models" / "minilm").is_dir():
        print(f"prebuild: {root} holds the built examples already")
        return 0
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    print(f"prebuild: training and building digits-cnn, textcls and minilm into {root} "
          "(about 5 minutes on 2 cores)", flush=True)
    build_examples(partial, log=lambda line: print(line, flush=True))
    partial.rename(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
