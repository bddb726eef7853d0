"""Checkpoint cost: a model of 100+ MB checkpointed every few steps to local disk and to a local S3
server (moto), async against sync, measured in one run.

Prints, for each storage and mode, the fraction of training time lost to checkpointing: how much
slower than the same run without checkpoints, and the share of it the training thread spent blocked
in checkpointing (goal: async under 5% where sync is far above); the commit throughput
against a plain copy of the same bytes; and the time from a SIGKILLed Ray Train worker to the next
training step. Usage: python bench/checkpoint.py [--steps N] [--every N] [--skip-kill] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_servers import start_moto

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# About 26M parameters: 105 MB of fp32 weights, 316 MB with AdamW's two moments.
MODEL = [
    "model.name=mlp",
    "model.hidden=2560",
    "model.layers=5",
    "data.name=digits",
    "optim.name=adamw",
    "schedule.name=constant",
    "train.batch_size=32",
    "train.epochs=1000",
    "early_stopping=null",
    "validation.every_n_steps=1000000",
    "train.log_every_n_steps=1000000",
    "checkpoint.every_n_epochs=null",
    "checkpoint.keep_last=2",
    "name=bench-ckpt",
]


def start_bench_s3() -> tuple[subprocess.Popen, str]:
    """moto's server with the benchmark's credentials and its bucket."""
    proc, endpoint = start_moto()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return proc, endpoint


def train_seconds(storage: str, endpoint: str | None, steps: int, every: int | None, asynchronous: bool) -> dict:
    """Run the loop in-process; seconds from the first to the last step, and to the end (last upload committed)."""
    from orchestrator.loop import LoopContext, run_training
    from orchestrator.spec import build_spec

    overrides = [
        *MODEL,
        f"train.max_steps={steps}",
        f"checkpoint.storage={storage}",
        f"checkpoint.async={str(asynchronous).lower()}",
    ]
    if endpoint:
        overrides.append(f"checkpoint.endpoint_url={endpoint}")
    if every:
        overrides.append(f"checkpoint.every_n_steps={every}")
    spec = build_spec({}, overrides)
    run_uri = f"{storage.rstrip('/')}/run-{time.time_ns()}"
    t0 = time.time()
    run_training(spec, LoopContext(run_uri=run_uri, log=lambda m: None))
    end = time.time()
    from orchestrator import checkpoint as ckpt
    from orchestrator import storage as st

    fs, root = st.open_storage(run_uri, endpoint)
    info, files = ckpt.restore_latest(fs, root)
    state = ckpt.deserialize_state(files["state.pt"])["train"]
    return {
        "steps_s": state["last_step_at"] - state["first_step_at"],
        "wall_s": end - t0,
        "checkpoint_bytes": info.size,
        "blocked_s": state["checkpoint_blocked_s"],
    }


def best_of(repeats: int, *args) -> dict:
    """The fastest of a few identical runs: on a shared 2-core machine the noise is all one-sided."""
    return min((train_seconds(*args) for _ in range(repeats)), key=lambda r: r["steps_s"])


def copy_throughput(storage: str, endpoint: str | None, nbytes: int) -> dict:
    """A plain copy of the same number of bytes, against a full checkpoint commit (serialize, hash, write, manifest)."""
    import torch

    from orchestrator import checkpoint as ckpt
    from orchestrator import storage as st

    fs, root = st.open_storage(storage, endpoint)
    blob = os.urandom(nbytes)
    t0 = time.time()
    st.write_bytes(fs, st.join(root, "plain-copy.bin"), blob)
    plain = time.time() - t0
    weights = {f"w{i}": torch.randn(nbytes // 4 // 8) for i in range(8)}
    t0 = time.time()
    ckpt.commit_checkpoint(fs, st.join(root, "commit-probe"), 1, 0, {ckpt.WEIGHTS: ckpt.serialize_weights(weights)}, {})
    commit = time.time() - t0
    return {
        "bytes": nbytes,
        "plain_copy_MBps": nbytes / plain / 1e6,
        "checkpoint_commit_MBps": nbytes / commit / 1e6,
        "ratio": plain / commit,
    }


def kill_to_next_step(steps: int) -> float:
    """SIGKILL the Ray Train worker after its first checkpoint; seconds until the restarted worker's next step."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            str(ROOT / "jobs" / "digits_mlp.yaml"),
            "model.hidden=512",
            "model.layers=3",
            "train.batch_size=16",
            "train.epochs=50",
            f"train.max_steps={steps}",
            "early_stopping=null",
            "checkpoint.every_n_steps=20",
            "train.log_every_n_steps=1",
            "scaling.num_workers=1",
            "failure.max_failures=2",
            f"checkpoint.storage={tmp}",
            "--json",
        ]
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        run_dir = Path(tmp) / "digits-mlp"
        while not list(run_dir.glob("checkpoint_*/manifest.json")):
            if proc.poll() is not None:
                raise SystemExit("the run ended before its first checkpoint")
            time.sleep(0.01)
        workers = [p for p in _descendants(proc.pid) if b"RayTrainWorker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        killed_at = time.time()
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=600)
        entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        after = [e["time"] for e in entries if e.get("split") == "train" and e["time"] > killed_at]
        return min(after) - killed_at


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-kill", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    moto, endpoint = start_bench_s3()
    results: dict = {"steps": args.steps, "every_n_steps": args.every, "storage": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_seconds(tmp, None, 20, None, True)  # warm-up: first-touch allocations, thread pools
            for name, storage, ep in (("local", tmp, None), ("s3", "s3://bench/runs", endpoint)):
                base = best_of(args.repeats, storage, ep, args.steps, None, True)
                row = {"no_checkpoints_s": base["steps_s"]}
                for mode in ("sync", "async"):
                    timed = best_of(args.repeats, storage, ep, args.steps, args.every, mode == "async")
                    row[mode] = {
                        "train_s": timed["steps_s"],
                        "wall_s": timed["wall_s"],
                        "lost_fraction": timed["steps_s"] / base["steps_s"] - 1,
                        "blocked_fraction": timed["blocked_s"] / timed["steps_s"],
                    }
                    row["checkpoint_MB"] = timed["checkpoint_bytes"] / 1e6
                row["throughput"] = copy_throughput(storage, ep, int(row["checkpoint_MB"] * 1e6) // 3)
                results["storage"][name] = row
        if not args.skip_kill:
            results["worker_kill_to_next_step_s"] = kill_to_next_step(400)
    finally:
        moto.terminate()
    if args.json:
        print(json.dumps(results))
        return
    print(f"{args.steps} steps, a checkpoint every {args.every} steps")
    for name, row in results["storage"].items():
        print(
            f"[{name}] checkpoint {row['checkpoint_MB']:.0f} MB; training without checkpoints {row['no_checkpoints_s']:.1f}s"
        )
        for mode in ("sync", "async"):
            r = row[mode]
            print(
                f"  {mode:5}: training {r['train_s']:.1f}s  slower by {100 * r['lost_fraction']:5.1f}%  training thread blocked {100 * r['blocked_fraction']:5.1f}%"
                f"  (wall incl. last upload {r['wall_s']:.1f}s)"
            )
        t = row["throughput"]
        print(
            f"  commit {t['checkpoint_commit_MBps']:.0f} MB/s against a plain copy at {t['plain_copy_MBps']:.0f} MB/s (ratio {t['ratio']:.2f})"
        )
    if "worker_kill_to_next_step_s" in results:
        print(f"SIGKILLed Ray Train worker to the next training step: {results['worker_kill_to_next_step_s']:.1f}s")


if __name__ == "__main__":
    main()
