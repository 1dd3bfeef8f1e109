"""What the budget of other tests under a mutant costs and buys: a seeded sample of the
mutants a finished ``make mutate`` ran, run again as mutmut runs them (forked from one
process that collected the tests, two at a time, each fork pinned to its CPU by
tests/conftest.py), once per budget, in the same run: the seconds it took and the kills
it lost or gained against that run's verdicts.

    python -m bench.mutation_budget [--sample 240] [--seed 1] [--budgets 1,inf]

A budget is ``MODELFN_MUTATE_OTHER_S`` (tests/conftest.py: the seconds of tests outside
the mutated module's own and its package's that run for a mutant; ``inf``: every test
that reaches it, mutmut's own choice). Writes bench/results/mutation-budget.{json,md}.
Run it alone on the machine, after ``make mutate`` (it reads mutants/)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, now

#: mutmut's arguments to pytest for a mutant (mutmut/runners/harness.py), and the project's
PYTEST = ["--rootdir=.", "--tb=native", "-x", "-q", "-p", "no:randomly", "-p", "no:random-order"]


def verdicts(root: Path) -> dict[str, int]:
    """Each mutant's exit code in the finished run (0 survived, 1 killed, ...)."""
    codes: dict[str, int] = {}
    for meta in (root / "src").rglob("*.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def run_sample(mutants: list[str], tests_of: dict[str, list[str]], extra: list[str],
               budget: str) -> tuple[float, dict[str, tuple[int, float]]]:
    """Each mutant in a fork of this process, two at a time: (wall seconds, {mutant:
    (pytest's exit code, seconds)})."""
    import pytest

    os.environ["MODELFN_MUTATE_OTHER_S"] = budget
    todo, running, out = list(mutants), {}, {}
    started = time.perf_counter()
    while todo or running:
        while todo and len(running) < 2:
            name = todo.pop()
            pid = os.fork()
            if pid == 0:  # the child: as mutmut's worker runs a mutant
                os.environ["MUTANT_UNDER_TEST"] = name
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                os._exit(int(pytest.main(PYTEST + tests_of[name] + extra)))
            running[pid] = (name, time.perf_counter())
        pid, status = os.wait()
        name, since = running.pop(pid)
        out[name] = (os.waitstatus_to_exitcode(status), time.perf_counter() - since)
        print(f"\r  budget {budget}: {len(out)}/{len(mutants)}", end="", file=sys.stderr,
              flush=True)
    print(file=sys.stderr)
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=240)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budgets", default="1,inf")
    args = parser.parse_args(argv)
    root = Path("mutants").resolve()
    if not (root / "mutmut-stats.json").is_file():
        print("no finished run in mutants/: run `make mutate` first", file=sys.stderr)
        return 1
    import mutmut  # noqa: F401  (tests/conftest.py warms the fork server under mutmut)
    from mutmut.configuration import config

    codes = verdicts(root)
    stats = json.loads((root / "mutmut-stats.json").read_text())
    by_function = stats["tests_by_mangled_function_name"]
    ran = sorted(n for n, c in codes.items() if c in (0, 1))  # killed or survived
    if not ran:
        print("mutants/ holds no mutant that ran: run `make mutate` first", file=sys.stderr)
        return 1
    sample = random.Random(args.seed).sample(ran, min(args.sample, len(ran)))
    tests_of = {n: sorted(by_function[n.rsplit("__mutmut_", 1)[0]]) for n in sample}
    os.chdir(root)
    sys.path.insert(0, str(root / "src"))
    os.environ["MUTANT_UNDER_TEST"] = ""
    extra = list(config().pytest_add_cli_args)
    with contextlib.redirect_stdout(io.StringIO()):  # what mutmut's fork server imports
        import pytest

        pytest.main(["--rootdir=.", "--collect-only", "-qqq",
                     *config().pytest_add_cli_args_test_selection, *extra])
    full_kills = sum(1 for n in sample if codes[n] == 1)
    rows: list[dict[str, Any]] = []
    for budget in args.budgets.split(","):
        wall, out = run_sample(sample, tests_of, extra, budget)
        lost = sorted(n for n, (c, _) in out.items() if c == 0 and codes[n] == 1)
        gained = sorted(n for n, (c, _) in out.items() if c != 0 and codes[n] == 0)
        rows.append({"budget_s": budget, "seconds": round(wall, 1),
                     "killed": sum(1 for c, _ in out.values() if c != 0),
                     "lost": lost, "gained": gained})
        print(f"budget {budget}: {wall:.0f} s, killed {rows[-1]['killed']} of {len(sample)} "
              f"(the run in mutants/: {full_kills}), {len(lost)} kills lost, {len(gained)} "
              "gained",
              file=sys.stderr)
    report = {"date": now(), "machine": machine(), "sample": len(sample), "seed": args.seed,
              "of": len(ran), "full_run_kills": full_kills, "budgets": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mutation-budget.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# The budget of other tests under a mutant", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
             f"{report['date']}. `python -m bench.mutation_budget` after `make mutate`: "
             f"{len(sample)} of the {len(ran)} mutants that ran (seed {args.seed}), each "
             "run again as mutmut runs it, once per budget, in the same run; the run in "
             f"mutants/ (`make mutate`'s budget) killed {full_kills} of them.", "",
             "| budget (s of other tests) | seconds | killed | kills lost | kills gained |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['budget_s']} | {r['seconds']} | {r['killed']} | {len(r['lost'])} | "
              f"{len(r['gained'])} |" for r in rows]
    lines += ["", "Against the run in mutants/: kills lost (killed there, not under the budget) "
             "and gained (alive there, killed under the budget):", ""]
    for r in rows:
        lines += [f"- budget {r['budget_s']}, lost: "
                  + (", ".join(f"`{n}`" for n in r["lost"]) or "none"),
                  f"- budget {r['budget_s']}, gained: "
                  + (", ".join(f"`{n}`" for n in r["gained"]) or "none")]
    (RESULTS / "mutation-budget.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'mutation-budget.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
