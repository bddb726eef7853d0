"""What ASHA saves: one search space, the same number of trials, run under FIFO (every trial to its end) and
under ASHA (weak trials stopped at rungs), through `orchestrator sweep` on an embedded Ray.

Prints the best validation metric of each, ASHA's gap to FIFO's best (goal: within 0.5%) and the
training steps each consumed, as ASHA/FIFO (goal <= 0.40). The search space is jobs/sweep_digits_asha.yaml's.
Usage: python bench/sweep.py [--samples N] [--seed S] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "jobs" / "sweep_digits_asha.yaml"


def run_sweep(storage: str, scheduler: str, samples: int, seed: int) -> dict:
    """One sweep through the CLI; its --json result."""
    overrides = [
        f"checkpoint.storage={storage}",
        f"sweep.name=bench-{scheduler}",
        f"sweep.num_samples={samples}",
        f"sweep.seed={seed}",
    ]
    if scheduler == "fifo":
        overrides.append("sweep.scheduler={name: fifo}")
    cmd = [sys.executable, "-m", "orchestrator", "sweep", str(SWEEP), *overrides, "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{scheduler} sweep failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="trials in each sweep")
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the random search (both sweeps draw the same trials)"
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as storage:
        fifo = run_sweep(storage, "fifo", args.samples, args.seed)
        asha = run_sweep(storage, "asha", args.samples, args.seed)
    same_trials = sorted(map(str, (t["config"] for t in fifo["trials"]))) == sorted(
        map(str, (t["config"] for t in asha["trials"]))
    )
    metric = fifo["metric"]
    gap = (fifo["best"]["metric"] - asha["best"]["metric"]) / fifo["best"]["metric"]
    ratio = asha["total_steps"] / fifo["total_steps"]
    stopped = sum(t["status"] == "stopped" for t in asha["trials"])
    figures = {
        "trials": args.samples,
        "same_trials": same_trials,
        "metric": metric,
        "fifo_best": fifo["best"]["metric"],
        "asha_best": asha["best"]["metric"],
        "asha_gap": gap,
        "fifo_steps": fifo["total_steps"],
        "asha_steps": asha["total_steps"],
        "steps_ratio": ratio,
        "asha_stopped": stopped,
        "fifo_wall_s": fifo["wall_s"],
        "asha_wall_s": asha["wall_s"],
        "fifo_best_config": fifo["best"]["config"],
        "asha_best_config": asha["best"]["config"],
        "goal_met": gap <= 0.005 and ratio <= 0.40,
    }
    print(
        f"{args.samples} trials each ({'the same draws' if same_trials else 'DIFFERENT draws'}), {metric}, search space of {SWEEP.name}"
    )
    print(f"  FIFO  best {fifo['best']['metric']:.4f}  steps {fifo['total_steps']:>6}  wall {fifo['wall_s']:.0f}s")
    print(
        f"  ASHA  best {asha['best']['metric']:.4f}  steps {asha['total_steps']:>6}  wall {asha['wall_s']:.0f}s  ({stopped} trials stopped early)"
    )
    print(f"  ASHA/FIFO steps {ratio:.2f} (goal <= 0.40)   ASHA below FIFO's best by {gap:.2%} (goal <= 0.50%)")
    print(f"  FIFO's best: {fifo['best']['config']}")
    print(f"  ASHA's best: {asha['best']['config']}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
