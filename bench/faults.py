"""Fault injection on the batch path (jobs and batch files), deployed in the local
emulation (moto's S3, SQS and DynamoDB from template.yaml's definitions; the batch
function in execution environments of their own, as Lambda runs them): invocations are
killed (SIGKILL: no ``except`` or ``finally`` runs, as a timeout or an out-of-memory
does) at random points, and some runs on every delivery (a record that can never
finish); then every run is checked against the answer of the model run directly.

    .venv/bin/python -m bench.faults          # ~6 minutes; bench/results/faults.*

Reported: runs lost (no final state, or a success without its result), duplicated (an
output row twice, or a job told both completed and failed), stuck (queued, running, or
a split run neither finished nor failed, or a record left on a queue), and wrong (a
result that is not the model's); each must be 0. Also what was killed where, the
dead letters, and webhook redeliveries (the same ``webhook-id`` again after a kill:
at-least-once, which Standard Webhooks receivers deduplicate).
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote_plus

import numpy as np

from bench.common import (
    bench_store,
    headroom,
    label_bars,
    machine,
    now,
    save_figure,
    subplots,
    write_results,
)

SEED = 7
JOBS = 160
WHOLE_FILES = 40
SPLIT_FILES = 24
PART_LINES = 64  # a multiple of the micro-batch (32): split files of 4-7 parts
#: chance that an invocation is killed, at a random point; and the share of runs whose
#: every delivery is killed (they must end failed, saying why)
KILL_CHANCE = 0.3
DOOMED = 0.06
TIMER_MAX_S = 0.4
OUTPUT = ""  # the model's first output, compared


class Hooks:
    """A loopback webhook receiver: every delivery, by webhook-id."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, dict[str, Any]]] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hooks.deliveries.append((self.headers["webhook-id"], body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def digits(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    return x[rng.integers(0, len(x), n)]


def main() -> None:  # noqa: C901, PLR0915 (one run, told in order)
    import boto3

    from modelfn import registry
    from modelfn.config import JobSettings
    from modelfn.local.s3events import KILL_POINTS, BatchDeployment, Kill, LocalS3
    from modelfn.runtime.jobs import Jobs
    from modelfn.runtime.repository import Repository
    from modelfn.store import open_store

    rng = np.random.default_rng(SEED)
    pick = random.Random(SEED)
    store_path = bench_store()
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    os.environ["POWERTOOLS_LOG_LEVEL"] = "CRITICAL"  # the dead letters' error lines
    local = LocalS3()
    bucket = "faults"
    boto3.client("s3").create_bucket(Bucket=bucket)
    source, target = open_store(str(store_path)), open_store(f"s3://{bucket}")
    manifest = source.read_json("models/digits-cnn/1/manifest.json")
    files = {rel: source.read_bytes(f"models/digits-cnn/1/{rel}") for rel in manifest["files"]}
    registry.publish_version(target, "digits-cnn", "1", {
        **files, "manifest.json": source.read_bytes("models/digits-cnn/1/manifest.json")})
    hooks = Hooks()
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    os.environ.update({"MODELFN_WEBHOOK_HOSTS": "127.0.0.1", "MODELFN_WEBHOOK_LOOPBACK": "true",
                       "MODELFN_WEBHOOK_SECRET": secret,
                       "MODELFN_BATCH_PART_LINES": str(PART_LINES)})
    deployment = BatchDeployment(bucket, f"s3://{bucket}")
    deployment.receive()  # the setup's s3:TestEvent, handled already
    jobs = Jobs(JobSettings.from_env(os.environ))
    models = Repository(target)
    reference = models.get("digits-cnn")
    global OUTPUT
    OUTPUT = next(iter(reference.run({"pixels": digits(1, rng)})))

    # --- the runs: jobs, whole files, split files; some doomed --------------------------
    expected_jobs: dict[str, np.ndarray] = {}
    doomed: set[str] = set()  # job ids and input keys
    for _ in range(JOBS):
        x = digits(int(rng.integers(1, 9)), rng)
        body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32",
                                       "shape": list(x.shape), "data": x.ravel().tolist()}],
                           "parameters": {"webhook": hooks.url}}).encode()
        job = jobs.accept("anonymous", models, "digits-cnn", "1", body, None)["id"]
        expected_jobs[job] = reference.run({"pixels": x})[OUTPUT]
        if pick.random() < DOOMED:
            doomed.add(job)
    expected_files: dict[str, dict[str, np.ndarray]] = {}
    for i in range(WHOLE_FILES + SPLIT_FILES):
        whole = i < WHOLE_FILES
        n = int(rng.integers(5, PART_LINES)) if whole else int(rng.integers(200, 450))
        x = digits(n, rng)
        key = f"inputs/digits-cnn/{'whole' if whole else 'split'}-{i:03d}.jsonl"
        ids = [f"{key}#{j}" for j in range(n)]
        body = "".join(json.dumps({"id": r, "inputs": row.tolist()}) + "\n"
                       for r, row in zip(ids, x, strict=True))
        target.write_bytes(key, body.encode())
        out = reference.run({"pixels": x})[OUTPUT]
        expected_files[key] = dict(zip(ids, out, strict=True))
        if pick.random() < DOOMED:
            doomed.add(key)

    # --- the kill policy: doomed runs on every delivery, any other by chance ------------
    points = [*KILL_POINTS, "timer"]
    armed: Counter[str] = Counter()  # kills set up; those reached are the environment's
    invocations = [0]

    def owner(body: dict[str, Any]) -> str:
        if body.get("modelfn"):
            return str(body["key"])
        key = unquote_plus(body["Records"][0]["s3"]["object"]["key"])  # as S3 sends it
        return key.split("/")[2] if key.startswith("async/") else key

    def decide(messages: list[dict[str, Any]]) -> Kill | None:
        invocations[0] += 1
        body = json.loads(messages[0]["Body"])
        if "Records" not in body and not body.get("modelfn"):
            return None
        doom = owner(body) in doomed
        if not doom and pick.random() >= KILL_CHANCE:
            return None
        if doom:  # before its first prediction, every time
            armed["every delivery (doomed)"] += 1
            return Kill("model", 1)
        point = pick.choice(points)
        armed[point] += 1
        return Kill(point, pick.randint(1, 3), pick.uniform(0.0, TIMER_MAX_S))

    started = time.perf_counter()

    def progress() -> None:
        while not done.is_set():
            time.sleep(10)
            print(f"  {time.perf_counter() - started:5.0f} s: {invocations[0]} invocations, "
                  f"{killed()} killed, {environment_starts()} environments",
                  flush=True)

    def environment_starts() -> int:
        return deployment.environment.started if deployment.environment else 0

    def killed() -> int:
        return sum(deployment.environment.killed.values()) if deployment.environment else 0

    done = threading.Event()
    threading.Thread(target=progress, daemon=True).start()
    print(f"{JOBS} jobs, {WHOLE_FILES} whole files and {SPLIT_FILES} split files; "
          f"{len(doomed)} doomed; killing {KILL_CHANCE:.0%} of invocations ...", flush=True)
    handled = deployment.drain(retry_after=0, kill=decide, limit=100_000)
    done.set()
    seconds = time.perf_counter() - started

    # --- the checks ----------------------------------------------------------------------
    outcome: dict[str, Counter[str]] = {"jobs": Counter(), "whole files": Counter(),
                                        "split files": Counter()}
    problems: list[str] = []
    by_job: dict[str, list[str]] = {}
    for hook_id, _ in hooks.deliveries:
        by_job.setdefault(hook_id.split(".")[0], []).append(hook_id)
    for job, want in expected_jobs.items():
        state = jobs.describe("anonymous", job)
        events = sorted(set(by_job.get(job, [])))
        if state["status"] in ("queued", "running"):
            outcome["jobs"]["stuck"] += 1
            problems.append(f"job {job} is {state['status']}")
        elif len(events) != 1:
            outcome["jobs"]["duplicated" if len(events) > 1 else "lost"] += 1
            problems.append(f"job {job}: webhooks {events}")
        elif state["status"] == "succeeded":
            (got_output,) = [o for o in state["response"]["outputs"] if o["name"] == OUTPUT]
            got = np.asarray(got_output["data"], np.float32)
            ok = np.allclose(got, want.ravel(), atol=1e-5)
            outcome["jobs"]["succeeded" if ok else "wrong"] += 1
            if not ok:
                problems.append(f"job {job}: a result that is not the model's")
        else:
            outcome["jobs"]["failed, doomed" if job in doomed else "failed, by chance"] += 1
    for key, want_rows in expected_files.items():
        kind = "whole files" if "/whole-" in key else "split files"
        out_key = key.replace("inputs/", "outputs/")
        summary_key = out_key.replace(".jsonl", ".summary.json")
        try:
            summary = target.read_json(summary_key)
        except FileNotFoundError:
            outcome[kind]["stuck"] += 1
            problems.append(f"{key}: no summary")
            continue
        has_output = target.exists(out_key)
        if summary.get("error"):
            outcome[kind]["failed, doomed" if key in doomed else "failed, by chance"] += 1
            if has_output:
                outcome[kind]["half-written"] += 1
                problems.append(f"{key}: failed with an output")
            continue
        rows = [json.loads(line) for line in target.read_bytes(out_key).decode().splitlines()]
        ids = Counter(r["id"] for r in rows)
        if any(c > 1 for c in ids.values()):
            outcome[kind]["duplicated"] += 1
            problems.append(f"{key}: {sum(c > 1 for c in ids.values())} rows twice")
        elif set(ids) != set(want_rows):
            outcome[kind]["lost"] += 1
            problems.append(f"{key}: {len(set(want_rows) - set(ids))} rows missing")
        elif not all(np.allclose(np.asarray(r["outputs"][OUTPUT], np.float32).ravel(),
                                 want_rows[r["id"]].ravel(), atol=1e-5) for r in rows):
            outcome[kind]["wrong"] += 1
            problems.append(f"{key}: a row that is not the model's")
        else:
            outcome[kind]["succeeded"] += 1
    left = target.objects("batch-parts/")
    if left:
        problems.append(f"{len(left)} part files left under batch-parts/")
    ddb = boto3.client("dynamodb")
    runs = ddb.scan(TableName=deployment.runs_table)["Items"]
    open_runs = [r for r in runs if "finished" not in r and "failed" not in r]
    if open_runs:
        problems.append(f"{len(open_runs)} split runs neither finished nor failed")
    queued = len(deployment.receive(0)) + len(deployment.receive(0, deployment.dlq))
    if queued:
        problems.append(f"{queued} records left on the queues")
    redelivered = len(hooks.deliveries) - len({h for h, _ in hooks.deliveries})
    doomed_failed = sum(c[k] for c in outcome.values() for k in c if k == "failed, doomed")
    totals = {k: sum(c[k] for c in outcome.values()) for k in
              ("lost", "duplicated", "wrong", "half-written", "stuck")}
    totals["stuck"] += len(open_runs) + queued
    report = {
        "when": now(), "machine": machine(), "seed": SEED,
        "setup": {"jobs": JOBS, "whole_files": WHOLE_FILES, "split_files": SPLIT_FILES,
                  "part_lines": PART_LINES, "kill_chance": KILL_CHANCE,
                  "doomed_share": DOOMED, "doomed_runs": len(doomed),
                  "max_receive_count": 5},
        "seconds": round(seconds, 1), "messages_handled": handled,
        "invocations": invocations[0], "armed": dict(armed),
        "kills": dict(deployment.environment.killed) if deployment.environment else {},
        "environments_started": environment_starts(),
        "outcomes": {k: dict(v) for k, v in outcome.items()},
        "totals": totals, "doomed_failed": doomed_failed,
        "webhook_deliveries": len(hooks.deliveries), "webhook_redeliveries": redelivered,
        "split_runs": len(runs), "problems": problems[:50],
    }
    deployment.close()
    local.stop()
    write_results("faults", report, markdown, chart)
    print(markdown(report))
    if problems or doomed_failed != len(doomed):
        raise SystemExit(f"{len(problems)} problems; doomed failed {doomed_failed} of "
                         f"{len(doomed)}")


def markdown(r: dict[str, Any]) -> str:
    s, t = r["setup"], r["totals"]
    runs = s["jobs"] + s["whole_files"] + s["split_files"]
    lines = [
        "# Fault injection: killed batch and job work", "",
        f"Measured {r['when']} on {r['machine']['cpu']} ({r['machine']['cores']} cores), "
        f"`.venv/bin/python -m bench.faults` (seed {r['seed']}).", "",
        f"{runs} runs ({s['jobs']} jobs with webhooks, {s['whole_files']} whole batch files, "
        f"{s['split_files']} files split into parts of {s['part_lines']} lines) through the "
        "local emulation of the deployed batch path: S3 notification, SQS (maxReceiveCount "
        f"{s['max_receive_count']}, then the dead-letter queue and its consumer), the batch "
        "function in execution environments of their own. Each invocation was killed "
        f"(SIGKILL) with a chance of {s['kill_chance']:.0%} at a random point (before the "
        "model, before an S3 write, before an output stream, before a runs-table or SQS "
        f"call, or at a random time up to {TIMER_MAX_S} s), and {s['doomed_runs']} runs "
        "on every delivery.", "",
        f"**Lost {t['lost']}, duplicated {t['duplicated']}, stuck {t['stuck']}, wrong "
        f"{t['wrong']}, failed with an output {t['half-written']}.** "
        f"Doomed runs failed with their reason: {r['doomed_failed']} of {s['doomed_runs']}.",
        "",
        f"{r['invocations']} invocations in {r['seconds']} s, {sum(r['kills'].values())} "
        f"killed, {r['environments_started']} execution environments started, "
        f"{r['messages_handled']} messages handled (dead letters included), "
        f"{r['split_runs']} split runs.", "",
        "| runs | " + " | ".join(r["outcomes"]) + " |",
        "|---|" + "---|" * len(r["outcomes"]),
    ]
    keys = sorted({k for v in r["outcomes"].values() for k in v})
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(v.get(k, 0)) for v in r["outcomes"].values())
                     + " |")
    lines += ["", "| kill point | kills set up | invocations killed |", "|---|---|---|"]
    for k in sorted(set(r["kills"]) | set(r["armed"]) - {"every delivery (doomed)"}):
        lines.append(f"| {k} | {r['armed'].get(k, 0)}"
                     + (f" + {r['armed'].get('every delivery (doomed)', 0)} (doomed runs)"
                        if k == "model" else "") + f" | {r['kills'].get(k, 0)} |")
    lines += ["", "A kill set up at a point the invocation never reaches (a runs-table call "
              "in a job, a later call than the invocation makes, a timer past its end) "
              "lets it finish."]
    lines += ["", f"Webhooks: {r['webhook_deliveries']} deliveries, of which "
              f"{r['webhook_redeliveries']} repeated a `webhook-id` already delivered (a "
              "kill after the POST and before its outcome was recorded: at-least-once; each "
              "job was told one outcome).", ""]
    if r["problems"]:
        lines += ["Problems:", ""] + [f"- {p}" for p in r["problems"]] + [""]
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Any) -> None:
    fig, (left, right) = subplots(1, 2, figsize=(12, 4.6))
    kinds = list(r["outcomes"])
    keys = ["succeeded", "failed, doomed", "failed, by chance", "lost", "duplicated",
            "stuck", "wrong"]
    width = 0.8 / len(kinds)
    top = 1.0
    for i, kind in enumerate(kinds):
        values = [r["outcomes"][kind].get(k, 0) for k in keys]
        bars = left.bar(np.arange(len(keys)) + (i - (len(kinds) - 1) / 2) * width, values,
                        width, label=kind)
        label_bars(left, bars, [str(v) for v in values], fontsize=7)
        top = max(top, *values)
    left.set_xticks(np.arange(len(keys)), [k.replace(", ", ",\n") for k in keys], fontsize=8)
    left.set_ylabel("runs")
    left.set_title("Outcome of each run (lost, duplicated, stuck, wrong: must be 0)",
                   fontsize=10)
    left.legend(fontsize=8)
    headroom(left, top, 1.2)
    kills = sorted(r["kills"].items(), key=lambda kv: -kv[1])
    bars = right.barh([k for k, _ in kills], [v for _, v in kills], color="#c44")
    right.bar_label(bars, padding=2, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("invocations killed (SIGKILL)")
    right.set_title(f"Where invocations were killed ({sum(r['kills'].values())} of "
                    f"{r['invocations']})", fontsize=10)
    right.set_xlim(0, max(v for _, v in kills) * 1.15)
    save_figure(fig, path, "Fault injection on the batch path: bench.faults")


if __name__ == "__main__":
    main()
