"""Validation metrics across ranks: metric states all-reduced (now) against every rank gathering every
output with all_gather_object (before), on real gloo process groups, measured in one run.

Each rank holds its shard of a classification split's logits (N examples, C classes, dealt like the
data sources deal them) and computes loss, accuracy, macro-F1, ROC-AUC and the confusion matrix.
Prints, per world size, the seconds of the metrics step (median of --repeat, slowest rank) and the
bytes a rank receives, for both, and their ratio; plus the binned ROC-AUC's distance from the exact.
Usage: python bench/metrics_reduce.py [--examples N] [--classes C] [--worlds 1,2,4] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

from local_servers import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from orchestrator.loop.evaluate import all_reduce  # noqa: E402
from orchestrator.metrics import SplitState, compute_metrics  # noqa: E402

NAMES = ["loss", "accuracy", "f1", "roc_auc", "confusion_matrix"]


def split(n: int, c: int):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), y] += 1.5
    return logits, y


def gathered(logits, y, loss_sum, world):
    # What evaluate did before: every rank gets every rank's outputs, then the exact metrics.
    out = [None] * world
    dist.all_gather_object(out, (loss_sum, len(y), [logits], [y])) if world > 1 else out.__setitem__(
        0, (loss_sum, len(y), [logits], [y])
    )
    total = sum(g[1] for g in out)
    outs = torch.cat([o for g in out for o in g[2]])
    tgts = torch.cat([t for g in out for t in g[3]])
    return compute_metrics("classification", NAMES, outs, tgts, sum(g[0] for g in out) / total)


def reduced(logits, y, loss_sum, world, sent: list[int]):
    state = SplitState("classification", NAMES)
    for i in range(0, len(y), 256):
        state.update(
            logits[i : i + 256], y[i : i + 256], loss_sum * len(y[i : i + 256]) / max(1, len(y)), len(y[i : i + 256])
        )

    def counted(t, op):
        sent.append(t.numel() * t.element_size())
        return all_reduce(t, op) if world > 1 else t

    return state.compute(counted)


def rank_main(rank, world, port, n, c, repeat, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    logits, y = split(n, c)
    # Own copies: a strided view would pickle (and gather) the whole storage.
    logits, y = logits[rank::world].clone(), y[rank::world].clone()
    loss_sum = float(torch.nn.functional.cross_entropy(logits, y, reduction="sum")) if len(y) else 0.0
    times = {"gather": [], "reduce": []}
    values = {}
    for _ in range(repeat):
        for how in ("gather", "reduce"):
            dist.barrier()
            t0 = time.perf_counter()
            sent: list[int] = []
            values[how] = (
                gathered(logits, y, loss_sum, world) if how == "gather" else reduced(logits, y, loss_sum, world, sent)
            )
            times[how].append(time.perf_counter() - t0)
    own = len(pickle.dumps((loss_sum, len(y), [logits], [y])))
    torch.save(
        {
            "times": times,
            "values": values,
            "gather_bytes": own * (world - 1),
            "reduce_bytes": sum(sent) if world > 1 else 0,
        },
        os.path.join(out_dir, f"r{rank}.pt"),
    )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(
                rank_main,
                args=(world, free_port(), args.examples, args.classes, args.repeat, tmp),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
            ranks = [torch.load(Path(tmp) / f"r{r}.pt", weights_only=False) for r in range(world)]
        slowest = {
            h: statistics.median(max(r["times"][h][i] for r in ranks) for i in range(args.repeat))
            for h in ("gather", "reduce")
        }
        g, r = ranks[0]["values"]["gather"], ranks[0]["values"]["reduce"]
        rows.append(
            {
                "world": world,
                "gather_s": slowest["gather"],
                "reduce_s": slowest["reduce"],
                "ratio": slowest["reduce"] / slowest["gather"],
                "gather_bytes_in": ranks[0]["gather_bytes"],
                "reduce_bytes": ranks[0]["reduce_bytes"],
                "auc_error": abs(g["roc_auc"] - r["roc_auc"]),
                "exact_equal": all(g[k] == r[k] for k in ("accuracy", "confusion_matrix"))
                and abs(g["f1"] - r["f1"]) < 1e-12
                and abs(g["loss"] - r["loss"]) < 1e-9,
            }
        )
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.examples} examples x {args.classes} classes; metrics step, slowest rank, median of {args.repeat}")
    print(
        "world  all_gather_object  states all_reduce  reduce/gather  bytes in (gather)  bytes all-reduced  |AUC diff|  others equal"
    )
    for row in rows:
        print(
            f"{row['world']:>5}  {row['gather_s']:>15.3f} s  {row['reduce_s']:>16.3f} s  {row['ratio']:>13.2f}  "
            f"{row['gather_bytes_in']:>17,}  {row['reduce_bytes']:>17,}  {row['auc_error']:.1e}  {row['exact_equal']}"
        )


if __name__ == "__main__":
    main()
