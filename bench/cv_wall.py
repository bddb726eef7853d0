"""What `orchestrator cv` saves over running the folds by hand: jobs/cv_digits.yaml's k folds as one
cross-validation (folds side by side on one embedded Ray) against k sequential `orchestrator run`s of the
same folds (`data.fold=i`, each its own process and Ray), measured back to back on this machine.

Prints both wall times (the commands', start to exit) and the ratio cv / sequential (goal <= 0.6 on 2 cores),
and checks that both ways trained the same folds to the same numbers of steps.
Usage: python bench/cv_wall.py [--folds K] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "cv_digits.yaml"


def orchestrator(*args: str) -> tuple[dict, float]:
    """One CLI command with --json: its result and its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"orchestrator {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5, help="folds (data.folds)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-cv-") as storage:
        common = [f"checkpoint.storage={storage}", f"data.folds={args.folds}"]
        runs, sequential = [], 0.0
        for i in range(args.folds):
            out, wall = orchestrator("run", str(JOB), *common, f"data.fold={i}", f"name=bench-fold-{i}")
            runs.append(out)
            sequential += wall
        cv, cv_wall = orchestrator("cv", str(JOB), *common)
    same = [r["steps"] for r in runs] == [f["steps"] for f in cv["folds"]]
    ratio = cv_wall / sequential
    figures = {
        "folds": args.folds,
        "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "sequential_wall_s": round(sequential, 1),
        "cv_wall_s": round(cv_wall, 1),
        "ratio": round(ratio, 3),
        "same_steps": same,
        "cv_mean_val_accuracy": cv["metrics"]["val_accuracy"]["mean"],
        "goal_met": ratio <= 0.6 and same,
    }
    print(f"{args.folds} folds of {JOB.name} on {os.cpu_count()} CPUs (load {figures['load_1min']:.1f})")
    print(f"  {args.folds} sequential `orchestrator run`s  {sequential:6.1f} s")
    print(f"  one `orchestrator cv`              {cv_wall:6.1f} s")
    print(f"  cv / sequential {ratio:.2f} (goal <= 0.60); the same steps per fold: {same}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
