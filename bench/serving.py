"""The serving benchmarks in one run: cold start, warm latency and cost, the BentoML
peer, sizes. Each writes its own report and chart under bench/results/; this one
adds bench/results/serving.md, every target against its measured figure.

    make bench            (= .venv/bin/python -m bench.serving; about 10 minutes)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench import cold_start, peer, sizes, warm_latency
from bench.common import RESULTS, now, write_results


def targets(cold: dict[str, Any], warm: dict[str, Any], size: dict[str, Any],
            peer_: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, met) rows."""
    rows = []
    for label, res in cold["models"].items():
        fr = res["ratios"]["modelfn / floor"]
        tr = res["ratios"]["torch handler / modelfn"]
        lim, need = cold["targets"]["floor_ratio_max"], cold["targets"]["torch_speedup_min"]
        rows.append((f"cold start {label}: modelfn within {lim}x of the onnxruntime floor",
                     f"{fr:.2f}x ({res['modelfn']['p50_ms']:.0f} vs "
                     f"{res['floor']['p50_ms']:.0f} ms)", "met" if fr <= lim else "missed"))
        rows.append((f"cold start {label}: at least {need:.0f}x faster than a torch handler",
                     f"{tr:.1f}x ({res['torch handler']['p50_ms']:.0f} ms for torch)",
                     "met" if tr >= need else "missed"))
    lim = warm["targets"]["minilm handler/raw p50 max"]
    for label, batches in warm["results"].items():
        for n, s in batches.items():
            # from the p50s (warm_latency.ratios): over the faster of raw and runtime
            r = warm_latency.ratios(s)
            base = r["overhead baseline"]
            if label.startswith("minilm"):
                rows.append((f"warm {label} batch {n}: handler p50 within {lim}x of {base}",
                             f"{r['handler / baseline p50']:.2f}x ({s['handler']['p50']:.2f} vs "
                             f"{s[base]['p50']:.2f} ms)",
                             "met" if r["handler / baseline p50"] <= lim else "missed"))
            else:
                rows.append((f"warm {label} batch {n}: handler overhead over {base} (report)",
                             f"{r['handler overhead p50 us']:.0f} µs", "reported"))
    layer = size["layer"]["unzipped"]
    for label, b in size["bundles"].items():
        total = (layer + b["unzipped"]) / 1e6
        rows.append((f"size: layer + {label} within Lambda's 262.1 MB", f"{total:.1f} MB",
                     "met" if total <= size["limits_mb"]["unzipped_mb"] else "missed"))
    servers = list(peer_["results"])
    ours, theirs = peer_["results"][servers[0]], peer_["results"][servers[1]]
    for label in ours:
        a, b = ours[label], theirs[label]
        rows.append((f"peer {label}: start to first answer, {servers[0]} vs {servers[1]}",
                     f"{a['start_to_first_answer_s']:.2f} vs {b['start_to_first_answer_s']:.2f} s",
                     "reported"))
        for c in ("c1", "c4"):
            rows.append((f"peer {label} {c}: p50 / p99 ms, {servers[0]} vs {servers[1]}",
                         f"{a[c]['p50']:.2f} / {a[c]['p99']:.2f} vs {b[c]['p50']:.2f} / "
                         f"{b[c]['p99']:.2f}", "reported"))
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Serving benchmarks: targets and measured figures", "",
             f"{report['when']} · {report['machine']['cpu']} · details, method and charts: "
             "[cold-start](cold-start.md), [warm-latency](warm-latency.md) (with cost), "
             "[peer](peer.md), [sizes](sizes.md). Reproduce: `make bench`.", "",
             "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {ok} |" for t, m, ok in report["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="cold starts per variant")
    ap.add_argument("--summary-only", action="store_true",
                    help="rewrite serving.md from the recorded parts (after rerunning one)")
    args = ap.parse_args()
    if args.summary_only:
        cold, warm, peer_, size = (json.loads((RESULTS / f"{stem}.json").read_text())
                                   for stem in ("cold-start", "warm-latency", "peer", "sizes"))
    else:
        cold = cold_start.run(args.rounds)
        write_results("cold-start", cold, cold_start.markdown, cold_start.chart)
        warm = warm_latency.run()  # reads cold-start.json for the memory each model needs
        write_results("warm-latency", warm, warm_latency.markdown, warm_latency.chart)
        peer_ = peer.run()
        write_results("peer", peer_, peer.markdown, peer.chart)
        size = sizes.run()
        write_results("sizes", size, sizes.markdown, sizes.chart)
    report = {"when": now(), "machine": cold["machine"],
              "rows": targets(cold, warm, size, peer_)}
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "serving.md").write_text(markdown(report))
    print(f"wrote {RESULTS / 'serving.md'}")


if __name__ == "__main__":
    main()
