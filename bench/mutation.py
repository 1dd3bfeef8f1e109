"""The mutation score of the last ``mutmut run`` (``make mutate``), per module, and every
mutant that survived, as bench/results/mutation.md (and .json, and a chart).

    python -m bench.mutation [--before FILE.json] [--seconds S] [--notes FILE.md]

``--before``: the .json of an earlier run (its scores become the "before" column);
``--seconds``: how long the run took (``make mutate`` measures it); ``--notes``: the
judgement of the survivors (why each kind is equivalent or not worth a test), kept with
the results. Score = (killed + timeout) / (every mutant but those skipped and, in a
stopped run, those not checked), as mutmut's own badge counts it: a mutant that no fast
test reaches counts as surviving."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, now, save_figure, subplots

KILLED = ("killed", "timeout", "caught by type check")
#: not in the score: skipped by configuration, or not reached by a run that was stopped
UNCOUNTED = ("skipped", "not checked")


def read_run(root: Path, only: set[str] | None = None) -> dict[str, Any]:
    """Per module: the count of each status, and the names of the mutants left alive
    (of the mutants in ``only``, if given: a sample)."""
    from mutmut.__main__ import SourceFileMutationData, walk_mutatable_files
    from mutmut.configuration import config
    from mutmut.stats import status_by_exit_code

    cwd = Path.cwd()
    os.chdir(root)
    try:
        config()
        modules: dict[str, Any] = {}
        for path in walk_mutatable_files():
            data = SourceFileMutationData(path=path)
            data.load()
            if not data.exit_code_by_key:
                continue
            statuses = {k: status_by_exit_code[v] for k, v in data.exit_code_by_key.items()
                        if only is None or (k in only and v is not None)}
            if not statuses:
                continue
            alive = sorted(k for k, s in statuses.items() if s not in KILLED + UNCOUNTED)
            modules[str(path)] = {"counts": dict(Counter(statuses.values())), "alive": alive,
                                  "status": {k: statuses[k] for k in alive}}
        return modules
    finally:
        os.chdir(cwd)


def diff_of(root: Path, name: str, path: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = Path.cwd()
    os.chdir(root)
    try:
        lines = get_diff_for_mutant(name, path=path).splitlines()
    finally:
        os.chdir(cwd)
    changed = [line for line in lines if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return " / ".join(line.strip() for line in changed)[:240]


#: kinds of survivor, told apart by their diff (the notes judge each kind)
KINDS = {
    "unreached": "no fast test reaches the function",
    "log": "a log line's words or fields",
    "wording": "the words of a message (a string changed: XX added, or its case)",
    "dtype/copy": "a dtype or copy= argument numpy gives the same result without",
    "behaviour": "anything else: read it",
}


def kind_of(status: str, diff: str) -> str:
    """Which of KINDS a survivor is (by its status and its one-line diff)."""
    if status == "no tests":
        return "unreached"
    old, _, new = diff.partition(" / +")
    old = old.removeprefix("-")
    if "logger." in old or "log(" in old:
        return "log"
    if "XX" in new or (new.lower() == old.lower() and new != old):
        return "wording"
    if any(k in new and k in old for k in ("copy=", "dtype=", ".astype(")) and (
            new.replace(" ", "") in old.replace(" ", "") or "copy=" in new or "=None" in new
            or ", )" in new):
        return "dtype/copy"
    return "behaviour"


def score(counts: dict[str, int]) -> tuple[int, int, float]:
    total = sum(n for s, n in counts.items() if s not in UNCOUNTED)
    killed = sum(counts.get(s, 0) for s in KILLED)
    return killed, total, (killed / total if total else 0.0)


def markdown(report: dict[str, Any], notes: str) -> str:
    before = report.get("before") or {}
    lines = ["# Mutation testing", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, Python "
             f"{report['machine']['python']}; {report['date']}.", "",
             f"Tool: mutmut {report['mutmut']} (`make mutate`), `--max-children 2`, the fast "
             "tests (`tests/unit -m 'not slow'`, the examples' store built once); for each "
             "mutant the tests of its module and its package that reach it, then the other "
             "tests that reach it fastest first, up to a budget (`MODELFN_MUTATE_OTHER_S`, "
             "0.5 s by default: tests/conftest.py). "
             + (f"Run time: {report['seconds'] / 60:.1f} min." if report.get("seconds") else "")
             + (" **A sample**: up to 60 mutants a module drawn at random (seeded) from every "
                "mutant mutmut makes, each run as a full run would; the counts below are of "
                "the sampled mutants that ran." if report.get("sample") else ""),
             "", "Score = (killed + timeout) / all mutants; a mutant that no fast test reaches "
             "(\"no tests\") counts as surviving."
             + (" Before: the tests of the last release on a random sample of up to 60 "
                "mutants a module (the same configuration; a share of 60 is within about "
                "±6 points)." if report.get("before_sample") else ""), "",
             "| module | mutants | killed | survived | no tests | timeout | score | before |",
             "|---|---|---|---|---|---|---|---|"]
    totals: Counter[str] = Counter()
    for module, data in sorted(report["modules"].items()):
        c = data["counts"]
        totals.update(c)
        killed, total, s = score(c)
        was = before.get(module) if before.get(module, {}).get("counts") else None
        lines.append(f"| {module.removeprefix('src/modelfn/')} | {total} | {killed} | "
                     f"{c.get('survived', 0)} | {c.get('no tests', 0)} | {c.get('timeout', 0)} | "
                     f"{s:.1%} | {score(was['counts'])[2]:.1%} |" if was else
                     f"| {module.removeprefix('src/modelfn/')} | {total} | {killed} | "
                     f"{c.get('survived', 0)} | {c.get('no tests', 0)} | {c.get('timeout', 0)} | "
                     f"{s:.1%} | |")
    killed, total, s = score(totals)
    # before, over all: each module's score weighted by its number of mutants (a sample
    # has the same share of every module, whatever its size)
    weights = {mod: score(d["counts"])[1] for mod, d in report["modules"].items()
               if before.get(mod, {}).get("counts")}
    b = ""
    if weights:
        weighted = sum(score(before[mod]["counts"])[2] * w for mod, w in weights.items())
        b = f"{weighted / sum(weights.values()):.1%}"
    lines += [f"| **all** | {total} | {killed} | {totals.get('survived', 0)} | "
              f"{totals.get('no tests', 0)} | {totals.get('timeout', 0)} | **{s:.1%}** | {b} |",
              ""]
    unchecked = totals.get("not checked", 0)
    if unchecked:
        lines += [f"**The run was stopped before its end**: {unchecked} mutants were not "
                  "checked (the costliest: mutmut runs them last) and are not counted above.",
                  ""]
    typed = totals.get("caught by type check", 0)
    if typed:
        by_tests = killed - typed
        lines += [f"Of the {total} mutants, {typed} were caught by mypy (`type_check_command`: "
                  "a mutant `make test`'s mypy rejects never reaches a test); the tests killed "
                  f"{by_tests} of the other {total - typed} "
                  f"(**{by_tests / max(1, total - typed):.1%} by the tests alone**).", ""]
    lines += ["![scores](mutation.png)", ""]
    if notes:
        lines += [notes.strip(), ""]
    kinds: Counter[str] = Counter()
    for data in report["modules"].values():
        for name in data["alive"]:
            kinds[kind_of(data["status"][name], data["diffs"].get(name, ""))] += 1
    lines += ["## The survivors by kind", "", "| kind | mutants | what it is |", "|---|---|---|"]
    lines += [f"| {k} | {kinds.get(k, 0)} | {what} |" for k, what in KINDS.items()]
    lines += ["", "## Every mutant left alive", "",
              "`mutmut show NAME` prints one in full; `mutmut apply NAME` writes it into the "
              "tree to try a test against it. Each is tagged with its kind.", ""]
    for module, data in sorted(report["modules"].items()):
        if not data["alive"]:
            continue
        lines += [f"### {module} ({len(data['alive'])})", ""]
        for name in data["alive"]:
            short = name.split(".")[-1].replace("ǁ", ".").lstrip("x.")
            diff = data["diffs"].get(name, "")
            lines.append(f"- `{short}` ({data['status'][name]}, "
                         f"{kind_of(data['status'][name], diff)}): `{diff}`")
        lines.append("")
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    modules = sorted(report["modules"])
    labels = [m.removeprefix("src/modelfn/") for m in modules]
    after = [score(report["modules"][m]["counts"])[2] * 100 for m in modules]
    before = [score(report["before"][m]["counts"])[2] * 100
              if report.get("before", {}).get(m, {}).get("counts") else 0 for m in modules]
    fig, ax = subplots(figsize=(9, 0.32 * len(modules) + 1.5))
    y = range(len(modules))
    ax.barh([i + 0.2 for i in y], before, height=0.4, label="before", color="#bbbbbb")
    ax.barh([i - 0.2 for i in y], after, height=0.4, label="after", color="#3b75af")
    ax.axvline(85, color="#c44e52", linestyle="--", linewidth=1, label="target 85%")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("mutants killed (%)")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path, "Mutation score per module (mutmut, fast tests)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(), help="where mutants/ is")
    parser.add_argument("--before", type=Path)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--notes", type=Path, default=RESULTS / "mutation-notes.md")
    parser.add_argument("--stem", default="mutation")
    parser.add_argument("--sample", type=Path, help="a JSON list of the mutants to count "
                        "(a random sample per module, for a quick estimate)")
    args = parser.parse_args(argv)
    if not (args.root / "mutants").is_dir():
        print(f"no mutants/ in {args.root.resolve()}: run `make mutate` first", file=sys.stderr)
        return 1
    import mutmut

    only = set(json.loads(args.sample.read_text())) if args.sample else None
    modules = read_run(args.root, only)
    if not modules:
        print("mutants/ holds no results: run `make mutate` first", file=sys.stderr)
        return 1
    for module, data in modules.items():
        data["diffs"] = {n: diff_of(args.root, n, module) for n in data["alive"]}
    report = {"date": now(), "machine": machine(), "mutmut": mutmut.__version__,
              "seconds": args.seconds, "modules": modules, "sample": only is not None,
              "before": {}, "before_sample": False}
    if args.before:
        before = json.loads(args.before.read_text())
        report["before"], report["before_sample"] = before["modules"], before.get("sample")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    notes = args.notes.read_text() if args.notes and args.notes.exists() else ""
    (RESULTS / f"{args.stem}.md").write_text(markdown(report, notes))
    chart(report, RESULTS / f"{args.stem}.png")
    everything: Counter[str] = Counter()
    for data in modules.values():
        everything.update(data["counts"])
    killed, total, s = score(everything)
    print(f"mutation score {s:.1%} ({killed} of {total} killed); wrote "
          f"{RESULTS / (args.stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
