"""What the orchestrator costs: the same model and data trained by `orchestrator run` (Ray Train,
one worker actor) and by a plain single-process PyTorch loop, measured in one run.

Prints steps/s of each, their ratio (goal >= 0.95), and the time from command start to the first
training step. Usage: python bench/overhead.py [--steps N] [--preset cpu|gpu] [--json]
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
JOB = ROOT / "jobs" / "digits_mlp.yaml"  # both sides load this file under the same overrides

PRESETS = {
    # A digits MLP big enough that a step is compute, not bookkeeping (about 3 GFLOP a step).
    "cpu": [
        "name=bench-overhead",
        "model.name=mlp",
        "model.hidden=1024",
        "model.layers=3",
        "data.name=digits",
        "train.batch_size=256",
        "optim.name=adamw",
        "schedule.name=constant",
        "train.precision=fp32",
    ],
    # GPT-2-small sized (12 layers, 768 wide, 12 heads) in bf16 on a synthetic token stream.
    "gpu": [
        "name=bench-overhead-gpu",
        "model.name=gpt",
        "model.hidden=768",
        "model.layers=12",
        "model.heads=12",
        "model.context=256",
        "data.name=synthetic",
        "data.task=lm",
        "data.vocab_size=50257",
        "data.seq_len=256",
        "data.samples=20000",
        "train.batch_size=16",
        "optim.name=adamw",
        "optim.lr=3e-4",
        "schedule.name=constant",
        "train.precision=bf16",
        "scaling.use_gpu=true",
    ],
}


def common(steps: int, storage: str) -> list[str]:
    # Validation and checkpoints only at the end, in both: what is compared is the training step.
    return [
        f"train.max_steps={steps}",
        "train.epochs=1000",
        "validation.every_n_steps=1000000",
        "checkpoint.every_n_epochs=null",
        f"checkpoint.storage={storage}",
        "early_stopping=null",
        "train.log_every_n_steps=1000000",
        "scaling.cpus_per_worker=" + str(os.cpu_count() or 1),
    ]


def plain_loop(overrides: list[str], steps: int) -> dict:
    """The baseline: build the same model and data, then the textbook loop, nothing else."""
    t0 = time.time()
    import torch
    import torch.nn.functional as F

    from orchestrator.data import load_data
    from orchestrator.models import build_model
    from orchestrator.spec import load_spec

    spec = load_spec(JOB, overrides)
    torch.manual_seed(spec.train.seed)
    device = torch.device("cuda" if spec.scaling.use_gpu else "cpu")
    splits = load_data(spec)
    model = build_model(spec, splits.info).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.optim.lr)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.train.precision)
    lm = splits.info.task == "lm"
    done, first_step_at = 0, None
    while done < steps:
        for x, y in splits.train.batches(done, 0, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(x)
            loss = (
                F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
                if lm
                else F.cross_entropy(out.float(), y)
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first_step_at = time.time()
            if done >= steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.time()
    return {"steps_per_s": (steps - 1) / (end - first_step_at), "first_step_s": first_step_at - t0}


def orchestrated(overrides: list[str], steps: int, num_workers: int) -> dict:
    """`orchestrator run` as a user types it; timings from the run's own step clock."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [*overrides, *common(steps, tmp), f"scaling.num_workers={num_workers}"]
        t0 = time.time()
        res = subprocess.run(
            [sys.executable, "-m", "orchestrator", "run", str(JOB), *args, "--json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if res.returncode != 0:
            raise SystemExit(f"orchestrator run failed:\n{res.stderr[-3000:]}")
        summary = json.loads(res.stdout.strip().splitlines()[-1])
    first, last = summary["first_step_at"], summary["last_step_at"]
    return {"steps_per_s": (summary["steps"] - 1) / (last - first), "first_step_s": first - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    overrides = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_loop([*overrides, *common(args.steps, tmp)], args.steps)
    ray_one = orchestrated(overrides, args.steps, 1)
    local = orchestrated(overrides, args.steps, 0)
    result = {
        "preset": args.preset,
        "steps": args.steps,
        "plain": plain,
        "ray_train_1_worker": ray_one,
        "ray_train_local_mode": local,
        "ratio_1_worker": ray_one["steps_per_s"] / plain["steps_per_s"],
        "ratio_local_mode": local["steps_per_s"] / plain["steps_per_s"],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'':28}{'steps/s':>10}{'first step (s)':>16}")
    for name in ("plain", "ray_train_1_worker", "ray_train_local_mode"):
        print(f"{name:28}{result[name]['steps_per_s']:>10.2f}{result[name]['first_step_s']:>16.1f}")
    print(f"ratio orchestrator (1 worker) / plain loop: {result['ratio_1_worker']:.3f}  (goal >= 0.95)")
    print(f"ratio orchestrator (local mode) / plain loop: {result['ratio_local_mode']:.3f}")


if __name__ == "__main__":
    main()
