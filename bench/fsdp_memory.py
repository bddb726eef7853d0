"""Leaves out activations, temporaries, DDP's gradient buckets and the whole model each rank builds once before sharding it.

Per-rank memory of a GPT of 110M parameters on 2 CPU ranks (gloo), fsdp against ddp: the peak, over
one training step (forward, backward, AdamW step), of the bytes held in parameters, gradients and
optimizer state, tracked tensor by tensor (torch.distributed._tools' MemTracker / FSDPMemTracker:
every op updates the count). Under fsdp that is the rank's shards plus the blocks gathered for
compute and their gradients before the reduce-scatter (the all-gather and reduce-scatter buffers
counted too); under ddp the whole model, its gradients and AdamW's two moments. Goal: fsdp / ddp <= 0.6
(0.5 is perfect sharding). The step runs through the orchestrator's own parts (build_parts,
wrap_model, TrainStep); an untracked step of each is timed too. Usage: python bench/fsdp_memory.py [--layers 12] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_servers import free_port  # noqa: E402

LEFT_OUT = (
    "leaves out: activations, temporaries, DDP's gradient buckets, each rank's one-time whole model before sharding"
)


def gpt_job(layers: int) -> list[str]:
    """A GPT-2-small-like model: 768 wide, 12 heads, a 16k vocabulary (110M parameters at 12 layers)."""
    return [
        "model.name=gpt",
        "model.hidden=768",
        f"model.layers={layers}",
        "model.heads=12",
        "model.context=128",
        "data.name=synthetic",
        "data.task=lm",
        "data.vocab_size=16384",
        "data.seq_len=128",
        "data.samples=64",
        "optim.name=adamw",
        "train.batch_size=2",
    ]


def _categories(strategy: str) -> list[str]:
    if strategy == "ddp":
        return ["Parameter", "Gradient", "Optstate"]
    return [
        "Sharded Param",
        "Unsharded Param",
        "Sharded Grad",
        "Unsharded Grad",
        "All Gather",
        "Reduce Scatter",
        "OptState",
    ]


def _rank(rank: int, world: int, port: int, strategy: str, layers: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from orchestrator.loop.context import LoopContext
    from orchestrator.loop.parts import build_parts, wrap_model
    from orchestrator.loop.step import TrainStep
    from orchestrator.spec import build_spec

    spec = build_spec({}, [*gpt_job(layers), f"scaling.strategy={strategy}", "checkpoint.storage=/tmp"])
    ctx = LoopContext(run_uri="/tmp/unused", rank=rank, world_size=world)
    parts = build_parts(spec, ctx, lambda m: None)
    model = wrap_model(parts.model, spec, ctx)
    step = TrainStep(model, parts, spec, ctx.device)
    x, y = next(iter(parts.splits.train.batches(0, rank, world)))

    def one_step() -> None:
        step.backward(x, y, 1, last=True)
        step.apply()

    one_step()  # AdamW's moments exist from here on, as in every later step
    t0 = time.perf_counter()
    one_step()
    step_s = time.perf_counter() - t0  # untracked: what a step costs under this strategy
    wanted = _categories(strategy)
    peak = {"bytes": 0, "at": {}}

    def watch(tracker_class):
        class Watched(tracker_class):
            def _update_peak_stats(self, peak_state) -> None:
                super()._update_peak_stats(peak_state)
                for snap in self._curr_mem_snap.values():
                    held = {str(k.value if hasattr(k, "value") else k): v for k, v in snap.items()}
                    total = sum(held.get(c, 0) for c in wanted)
                    if total > peak["bytes"]:
                        peak["bytes"], peak["at"] = total, {c: held.get(c, 0) for c in wanted}

        return Watched

    if strategy == "fsdp":
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        tracker = watch(FSDPMemTracker)(parts.model, parts.optimizer)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = watch(MemTracker)()
        tracker.track_external(model, parts.optimizer)
    with tracker:
        one_step()
    result = {"rank": rank, "strategy": strategy, "peak_bytes": peak["bytes"], "at_peak": peak["at"], "step_s": step_s}
    with open(os.path.join(out, f"{strategy}-{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """`fn(rank, world, port, *args)` in `world` fresh processes, a free port for their process group."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="spawn")


def measure(strategy: str, layers: int, out: str) -> list[dict]:
    spawn(_rank, 2, strategy, layers, out)
    return [json.load(open(os.path.join(out, f"{strategy}-{r}.json"))) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print(LEFT_OUT, flush=True)
    import tempfile

    from orchestrator.models import GPT

    total = sum(p.numel() for p in GPT(16384, 128, 768, args.layers, 12, 0.0).parameters())
    with tempfile.TemporaryDirectory() as out:
        rows = {s: measure(s, args.layers, out) for s in ("ddp", "fsdp")}
    peak = {s: max(r["peak_bytes"] for r in rows[s]) for s in rows}
    ratio = peak["fsdp"] / peak["ddp"]
    figures = {
        "params": total,
        "ddp_peak_mb": peak["ddp"] / 1e6,
        "fsdp_peak_mb": peak["fsdp"] / 1e6,
        "fsdp_over_ddp": ratio,
        "at_peak": {s: rows[s][0]["at_peak"] for s in rows},
        "step_s": {s: max(r["step_s"] for r in rows[s]) for s in rows},
        "load": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(
        f"GPT of {total / 1e6:.1f}M parameters, 2 CPU ranks, the peak per rank of parameters+gradients+optimizer state"
    )
    for s in ("ddp", "fsdp"):
        parts = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in figures["at_peak"][s].items() if v)
        print(f"  {s:5s} {peak[s] / 1e6:8.0f} MB  ({parts} MB at the peak; step {figures['step_s'][s]:.1f} s)")
    print(f"  fsdp / ddp = {ratio:.3f} (goal <= 0.6; 0.5 is perfect sharding)   load {figures['load']:.2f}")
    print(
        f"  a step (untracked, slowest rank): fsdp / ddp = {figures['step_s']['fsdp'] / figures['step_s']['ddp']:.2f}"
    )


if __name__ == "__main__":
    main()
