"""A competing CPU load on demand, and the check that gate verdicts survive it (not a test).

    .venv/bin/python benchmarks/noise.py load --threads 2 --seconds 300
        busy-loops THREADS processes for SECONDS (Ctrl-C stops them): run anything beside it.
    .venv/bin/python benchmarks/noise.py gates --runs 10 --threads 2 [--quiet-runs 3]
        the reduced default recipe (2 fine-tune epochs, fp32 + dynamic INT8, 1 timing thread, as
        in tests/test_end_to_end.py) is run once; then, QUIET-RUNS times on a quiet machine and
        RUNS times under a THREADS-process load, validation is measured again (--revalidate) and
        the gate decides two speed limits from each report: the recipe's 1.5x (which the quiet
        machine passes) and a "tight" limit 1.25x above the quiet ratio (which it fails). A
        verdict is wrong when it is not the quiet machine's verdict and not inconclusive. Prints
        one table and writes benchmarks/measurements/noise.json.

The load is plain Python busy loops, one process each, bounded in time, so a forgotten harness
cannot keep a machine busy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "minilm-ner-wnut16.yaml"
REDUCED = [
    "finetune.epochs=2",
    "search=null",
    "variants={fp32: [], int8-dynamic: [{quantize: {mode: dynamic, per_channel: true}}]}",
    "validate.latency={batch_sizes: [1, 8], seq_lens: [64], warmup: 3, iters: 40, block: 10, threads: 1}",
]
VARIANT = "int8-dynamic"


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@contextmanager
def competing_load(threads: int, seconds: float):
    """`threads` busy processes for at most `seconds` (stopped when the block ends)."""
    workers = [multiprocessing.Process(target=_spin, args=(seconds,), daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()


def _pipeline(*args: str, exported: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline", *args, "--exported", str(exported)]
    for override in REDUCED:
        command += ["--set", override]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def _gate(exported: Path, limit: float) -> str:
    done = _pipeline("gate", str(RECIPE), "--set", f"gates.min_speedup_vs_pytorch={limit}", exported=exported)
    return {0: "pass", 3: "fail", 4: "inconclusive"}.get(done.returncode, f"error {done.returncode}")


def _one(exported: Path, limits: dict[str, float]) -> dict:
    run = _pipeline("run", str(RECIPE), "--revalidate", exported=exported)
    if run.returncode not in (0, 3, 4):
        raise SystemExit(f"run failed ({run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
    report = json.loads((exported / "minilm-ner-wnut16" / "report.json").read_text())
    entry = report["variants"][VARIANT]
    quality = report["settings"].get("timing_quality") or {}
    return {
        "ratios": entry["speedup_vs_pytorch"],
        "intervals": entry.get("speedup_ci"),
        "interfered": {k: q.get("interfered") for k, q in quality.items()},
        "rounds": {k: q.get("rounds") for k, q in quality.items()},
        "other_cores": {k: q.get("other_cores") for k, q in quality.items()},
        "pytorch_p50": {k: v["p50_ms"] for k, v in report["baseline"]["latency"].items()},
        "verdicts": {name: _gate(exported, limit) for name, limit in limits.items()},
    }


def gates(runs: int, quiet_runs: int, threads: int, exported: Path) -> None:
    from tabulate import tabulate

    first = _pipeline("run", str(RECIPE), exported=exported)
    if first.returncode not in (0, 3, 4):
        raise SystemExit(f"the reduced recipe failed: {first.stderr.strip().splitlines()[-1:]}")
    limits = {"recipe 1.5x": 1.5}
    quiet = [{"load": "quiet", **_one(exported, limits)}]
    # A limit the quiet machine fails: 1.25x above its slower ratio (decided on the same report).
    limits["tight"] = round(min(quiet[0]["ratios"].values()) * 1.25, 2)
    quiet[0]["verdicts"]["tight"] = _gate(exported, limits["tight"])
    quiet += [{"load": "quiet", **_one(exported, limits)} for _ in range(quiet_runs - 1)]
    expected = {name: quiet[0]["verdicts"][name] for name in limits}
    loaded = []
    for _ in range(runs):
        with competing_load(threads, seconds=900):
            loaded.append({"load": f"{threads} busy threads", **_one(exported, limits)})
    rows, wrong = [], 0
    for row in quiet + loaded:
        flags = []
        for name, got in row["verdicts"].items():
            if got not in (expected[name], "inconclusive"):
                flags.append(name)
        wrong += bool(flags) and row["load"] != "quiet"
        rows.append(
            [
                row["load"],
                *(
                    f"{row['ratios'][k]:.2f}x [{row['intervals'][k][0]:.2f}, {row['intervals'][k][1]:.2f}]"
                    for k in sorted(row["ratios"])
                ),
                ", ".join(f"{k} {v}" for k, v in sorted(row["other_cores"].items())),
                ", ".join(f"{k} {v}" for k, v in sorted(row["rounds"].items())),
                row["verdicts"]["recipe 1.5x"],
                row["verdicts"]["tight"],
                "WRONG: " + ", ".join(flags) if flags else "ok",
            ]
        )
    keys = sorted(quiet[0]["ratios"])
    header = [
        "load",
        *(f"{VARIANT} x PyTorch {k}" for k in keys),
        "other cores",
        "rounds",
        "gate 1.5x",
        f"gate {limits['tight']}x",
        "verdict",
    ]
    print(tabulate(rows, headers=header, tablefmt="github"))
    print(f"\n{wrong} wrong verdicts in {runs} loaded runs (quiet verdicts: {expected})")
    out = ROOT / "benchmarks" / "measurements" / "noise.json"
    out.write_text(
        json.dumps({"limits": limits, "expected": expected, "runs": quiet + loaded}, indent=1) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="busy-loop THREADS processes for SECONDS")
    load.add_argument("--threads", type=int, default=2)
    load.add_argument("--seconds", type=float, default=300)
    check = sub.add_parser("gates", help="gate verdicts of the reduced default recipe, quiet and loaded")
    check.add_argument("--runs", type=int, default=10)
    check.add_argument("--quiet-runs", type=int, default=2)
    check.add_argument("--threads", type=int, default=2)
    check.add_argument("--exported", type=Path, default=ROOT / "exported" / "_noise")
    args = parser.parse_args()
    if args.command == "load":
        with competing_load(args.threads, args.seconds):
            time.sleep(args.seconds)
    else:
        gates(args.runs, args.quiet_runs, args.threads, args.exported)


if __name__ == "__main__":
    main()
