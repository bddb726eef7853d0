"""Leaves out the first step's and the model build's time, Ray, and a real S3's bandwidth (a local moto server stands in).

Sharded checkpoints of a GPT of 110M parameters (its weights and AdamW's moments: 1.3 GB) on a local
S3 server (moto), then on local disk, measured in one run:
- the wall time from the save to a committed checkpoint (median of 3): 2 fsdp ranks each writing
  their shards, against rank 0's full save of the same state under ddp (goal: sharded / full <= 0.6);
- the time an asynchronous sharded save blocks the training thread, against a step (goal < 5%; the
  median of a run's later saves, the first apart: it allocates the host buffers they reuse), and how
  much slower the steps run while the shards upload beside them;
- a restore of that checkpoint on 1 and on 4 ranks (each rank's wall time, and the tensor bytes all
  ranks read against those the checkpoint holds: 1.00 is each byte read once).
Usage: python bench/sharded_checkpoint.py [--layers 12] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsdp_memory import gpt_job, spawn  # noqa: E402
from local_servers import start_moto  # noqa: E402

REPEAT = 3
ASYNC_SAVES = 3  # the first one's figure apart: it allocates the buffers a run's later saves reuse
LEFT_OUT = "leaves out: the first step and the model build, Ray, a real S3's bandwidth (local moto server)"


def _setup(rank: int, world: int, port: int, spec_args: list[str], run_uri: str):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from orchestrator.loop.context import LoopContext
    from orchestrator.loop.parts import build_parts, wrap_model
    from orchestrator.loop.step import TrainStep
    from orchestrator.spec import build_spec

    spec = build_spec({}, spec_args)
    ctx = LoopContext(run_uri=run_uri, rank=rank, world_size=world, log=lambda m: None)
    parts = build_parts(spec, ctx, lambda m: None)
    step = TrainStep(wrap_model(parts.model, spec, ctx), parts, spec, ctx.device)
    x, y = next(iter(parts.splits.train.batches(0, rank, world)))

    def one_step() -> float:
        t0 = time.perf_counter()
        step.backward(x, y, 1, last=True)
        step.apply()
        return time.perf_counter() - t0

    return spec, ctx, parts, one_step


def _save_rank(rank, world, port, spec_args, run_uri, out, measure_async):
    import torch.distributed as dist

    from orchestrator.loop.checkpointer import Checkpointer
    from orchestrator.loop.sharded_checkpointer import ShardedCheckpointer
    from orchestrator.loop.state import TrainState
    from orchestrator.rundir import RunDir

    spec, ctx, parts, one_step = _setup(rank, world, port, spec_args, run_uri)
    run = RunDir.open(run_uri, spec.checkpoint.endpoint_url, spec.checkpoint.upload_timeout_s)
    sharded = spec.scaling.strategy == "fsdp"
    state = TrainState()
    one_step()
    state.stepped(False)
    result: dict = {}
    # Synchronous: the wall time from the call to the commit (rank 0 commits last under either strategy).
    sync_spec = spec.model_copy(deep=True)
    sync_spec.checkpoint.async_ = False
    saver = (ShardedCheckpointer if sharded else Checkpointer)(run, sync_spec, ctx, parts)
    commits = []
    for _ in range(REPEAT):  # the machine's load drifts: the median of a few saves, each to a new step
        dist.barrier()
        t0 = time.perf_counter()
        saver.save(state, {}, None)
        commits.append(time.perf_counter() - t0)
        state.stepped(False)
    saver.close()
    result["commit_s"] = statistics.median(commits)
    result["commits_s"] = commits
    dist.barrier()
    if measure_async:
        steps = [one_step() for _ in range(2)]
        state.stepped(False)
        asaver = ShardedCheckpointer(run, spec, ctx, parts)
        blocked, during, commits = [], [], []
        for _ in range(ASYNC_SAVES):  # the first allocates the host buffers that the next ones reuse
            dist.barrier()
            t0 = time.perf_counter()
            asaver.save(state, {}, None)
            blocked.append(time.perf_counter() - t0)
            while _any_rank_uploading(asaver):  # the ranks agree: a step is a collective
                during.append(one_step())
            commits.append(time.perf_counter() - t0)
            state.stepped(False)
        asaver.close()
        result["blocked_first_s"] = blocked[0]
        result["blocked_s"] = statistics.median(blocked[1:])
        result["blocked_all_s"] = blocked
        result["async_commit_s"] = statistics.median(commits)
        result["step_s"] = statistics.median(steps)
        result["steps_during_upload_s"] = during
    with open(os.path.join(out, f"save-{spec.scaling.strategy}-{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


def _any_rank_uploading(saver) -> bool:
    import torch
    import torch.distributed as dist

    busy = torch.tensor([int(saver.pending is not None and not saver.pending.done())])
    dist.all_reduce(busy, op=dist.ReduceOp.MAX)
    return bool(busy.item())


def _restore_rank(rank, world, port, spec_args, run_uri, out):
    import torch.distributed as dist

    from orchestrator import checkpoint as ckpt
    from orchestrator.loop.sharding import load_sharded_state
    from orchestrator.rundir import RunDir

    spec, ctx, parts, _ = _setup(rank, world, port, spec_args, run_uri)
    run = RunDir.open(run_uri, spec.checkpoint.endpoint_url, spec.checkpoint.upload_timeout_s)
    info = ckpt.list_checkpoints(run.fs, run.root)[-1]
    dist.barrier()
    t0 = time.perf_counter()
    read, stored = load_sharded_state(parts.model, parts.optimizer, run.fs, info)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, f"restore{world}-{rank}.json"), "w") as fh:
        json.dump({"wall_s": wall, "read": read, "stored": stored}, fh)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print(LEFT_OUT, flush=True)
    proc, endpoint = start_moto()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    figures = {"load_before": os.getloadavg()[0]}
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as local:
            for name, root in (("s3", "s3://bench/runs"), ("local", local)):
                figures[name] = run_all(args.layers, root, endpoint)
    finally:
        proc.terminate()
        proc.wait()
    figures["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(figures))
        return
    print(f"GPT of {args.layers} layers (110M parameters at 12), 2 CPU ranks")
    for name, what in (("s3", "a local S3 server (moto)"), ("local", "local disk")):
        f = figures[name]
        print(f" checkpoints on {what}:")
        print(f"  rank 0's full save (ddp): {f['full_commit_s']:.1f} s to the commit (median of {REPEAT})")
        print(
            f"  sharded save of 2 ranks:  {f['sharded_commit_s']:.1f} s; sharded / full = {f['ratio']:.3f} (goal <= 0.6)"
        )
        print(
            f"  async sharded save: the step blocked {f['blocked_s']:.2f} s = {100 * f['blocked_share']:.1f}% of a "
            f"{f['step_s']:.1f} s step (goal < 5%; median of saves 2-{ASYNC_SAVES}, the first "
            f"{f['blocked_first_s']:.2f} s with its buffers' allocation); {len(f['steps_during_upload_s'])} step(s) "
            f"ran during the uploads, {f['during_over_step']:.2f}x a step; committed after {f['async_commit_s']:.1f} s"
        )
        for world in (1, 4):
            r = f[f"restore{world}"]
            print(
                f"  restore on {world} rank(s): {r['wall_s']:.1f} s (slowest rank); tensor bytes read by all ranks / "
                f"stored = {r['read_over_stored']:.3f}"
            )
    print(f" load {figures['load_before']:.2f} before, {figures['load_after']:.2f} after")


def run_all(layers: int, storage: str, endpoint: str) -> dict:
    common = [*gpt_job(layers), f"checkpoint.storage={storage}", f"checkpoint.endpoint_url={endpoint}"]
    with tempfile.TemporaryDirectory() as out:
        spawn(_save_rank, 2, [*common, "scaling.strategy=ddp"], f"{storage}/full", out, False)
        spawn(_save_rank, 2, [*common, "scaling.strategy=fsdp"], f"{storage}/sharded", out, True)
        full = json.load(open(os.path.join(out, "save-ddp-0.json")))
        sharded = json.load(open(os.path.join(out, "save-fsdp-0.json")))
        restores = {}
        for world in (1, 4):
            spawn(_restore_rank, world, [*common, "scaling.strategy=fsdp"], f"{storage}/sharded", out)
            rows = [json.load(open(os.path.join(out, f"restore{world}-{r}.json"))) for r in range(world)]
            restores[f"restore{world}"] = {
                "wall_s": max(r["wall_s"] for r in rows),
                "read_over_stored": sum(r["read"] for r in rows) / rows[0]["stored"],
                "read_per_rank_mb": [r["read"] / 1e6 for r in rows],
            }
    during = sharded["steps_during_upload_s"]
    return {
        "full_commit_s": full["commit_s"],
        "sharded_commit_s": sharded["commit_s"],
        "full_commits_s": full["commits_s"],
        "sharded_commits_s": sharded["commits_s"],
        "ratio": sharded["commit_s"] / full["commit_s"],
        "blocked_s": sharded["blocked_s"],
        "blocked_first_s": sharded["blocked_first_s"],
        "blocked_all_s": sharded["blocked_all_s"],
        "step_s": sharded["step_s"],
        "blocked_share": sharded["blocked_s"] / sharded["step_s"],
        "steps_during_upload_s": during,
        "during_over_step": (statistics.mean(during) / sharded["step_s"]) if during else 0.0,
        "async_commit_s": sharded["async_commit_s"],
        **restores,
    }


if __name__ == "__main__":
    main()
