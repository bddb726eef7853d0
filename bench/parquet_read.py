"""Parquet input at two sizes: what each of 2 ranks reads per epoch, its peak memory, and its pace.

Writes a Parquet data set (random float32 features, many row groups, several files) at 1x and at
`--scale` x, then runs 2 ranks at once, each its own process, for one training epoch (a small MLP
step per batch) and two validation passes. Each rank counts what it reads through
`pyarrow.parquet.ParquetFile.read_row_group` (the stored, compressed bytes of the columns read,
from the file footer) and reports its peak RSS. Baselines, in the same run: the data set's size
(the goal: each rank reads <= 1/2 of it + one row group per epoch), the 1x run (the goal: peak RSS
at 10x <= 1.2x that at 1x), with `--baseline DIR` the same ranks running the code in DIR (another
checkout: the code before sharding), and with `--s3` the epoch read from a local S3 server (moto)
against the same rank's examples held in memory (the goal: steps/s >= 0.9), at 1x and, with
`--s3-scale`, at `--scale` x too.

The pace is measured twice. With the MLP's step on the CPU, the two ranks' steps fill both cores,
so the read-ahead's decode and, on S3, the S3 server (moto: a Python process on this machine,
~9 ms of CPU per 2.7 MB row group served from these files) take CPU from the steps: that row
measures this machine's cores, not the overlap. With `--idle-step-ms` (default 5) the step is a stand-in for an
accelerator's: the rank waits that long per batch and leaves the CPU free, as a training process
on a GPU node does while its GPU computes; that row shows whether the read-ahead keeps such a step
fed. It leaves out the step's own CPU work (there is none).

Usage: python bench/parquet_read.py [--mb 100] [--scale 10] [--baseline /work/main] [--s3] [--s3-scale]
                                    [--idle-step-ms 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_servers import start_moto

ROOT = Path(__file__).resolve().parents[1]
FEATURES = 32
ROW_BYTES = FEATURES * 4 + 8
ROW_GROUP = 20_000  # rows: about 2.7 MB stored, so 1x (100 MB) has 48 row groups (4 a file, the last short) and 10x 480
# Files of ~11 MB (4 row groups): moto answers a ranged GET by copying the whole object first (a
# 2.7 MB range cost it 29 ms of CPU from a 35 MB object, 9 ms from an 11 MB one, 7 ms from 3 MB),
# which S3 itself does not; on this machine that CPU is taken from the ranks.
FILES_PER_100MB = 12
BATCH = 512


def write_dataset(path: Path, megabytes: int, seed: int = 0) -> int:
    """Write about `megabytes` MB of Parquet under `path` (several files); its stored bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    rows = megabytes * 2**20 // ROW_BYTES
    files = max(1, megabytes * FILES_PER_100MB // 100)
    rng = np.random.default_rng(seed)
    start = 0
    for i in range(files):
        n = rows // files + (1 if i < rows % files else 0)
        # Written in slices of a row group, so that writing 1 GB never holds 1 GB.
        with pq.ParquetWriter(path / f"part-{i:04d}.parquet", _schema(pa)) as writer:
            for lo in range(0, n, ROW_GROUP):
                m = min(ROW_GROUP, n - lo)
                cols = {f"f{j}": rng.standard_normal(m, dtype=np.float32) for j in range(FEATURES)}
                cols["label"] = ((start + lo + np.arange(m)) % 2).astype(np.int64)
                writer.write_table(pa.table(cols, schema=_schema(pa)), row_group_size=ROW_GROUP)
        start += n
    return sum(f.stat().st_size for f in path.iterdir())


def _schema(pa):
    return pa.schema([(f"f{j}", pa.float32()) for j in range(FEATURES)] + [("label", pa.int64())])


def job(uri: str, endpoint: str | None) -> dict:
    data = {
        "name": "parquet",
        "task": "classification",
        "path": uri,
        "features": [f"f{j}" for j in range(FEATURES)],
        "label": "label",
    }
    if endpoint:
        data["endpoint_url"] = endpoint
    return {"data": data, "train": {"batch_size": BATCH, "seed": 0}}


# ----------------------------------------------------------------------------------------------
# One rank (a process of its own)


def run_rank(
    uri: str,
    rank: int,
    world: int,
    endpoint: str | None,
    memory: bool,
    read_ahead: int | None = None,
    idle_step_ms: float | None = None,
) -> dict:
    import pyarrow.parquet as pq
    import torch

    from orchestrator.data import load_data
    from orchestrator.spec import build_spec

    torch.set_num_threads(1)
    # pyarrow's first to_numpy imports pandas (0.45 s here), which a Ray Train worker has imported
    # already: done before the clock, as the in-memory rank does by reading its examples first.
    import pandas  # noqa: F401

    reads: list[tuple[int, int]] = []
    real = pq.ParquetFile.read_row_group

    def counted(self, i, columns=None, **kw):
        meta = self.metadata.row_group(i)
        names = set(columns or self.schema_arrow.names)
        stored = sum(
            meta.column(j).total_compressed_size
            for j in range(meta.num_columns)
            if meta.column(j).path_in_schema in names
        )
        reads.append((i, stored))
        return real(self, i, columns=columns, **kw)

    pq.ParquetFile.read_row_group = counted
    fetched = [0]  # bytes that came over the network from S3 (s3fs's ranged GETs)
    if endpoint:
        import s3fs

        real_fetch = s3fs.core.S3File._fetch_range

        def fetch(self, start, end):
            fetched[0] += end - start
            return real_fetch(self, start, end)

        s3fs.core.S3File._fetch_range = fetch
    splits = load_data(build_spec(job(uri, endpoint)))
    train = splits.train
    if read_ahead is not None:
        train.read_ahead = read_ahead
    if memory:  # the same examples of this rank, read before the clock starts and held as tensors
        from orchestrator.data.sources import TensorSource

        xs, ys = zip(*train.batches(0, rank, world), strict=True)
        train = TensorSource(torch.cat(xs), torch.cat(ys), BATCH, 0, True)
        reads.clear()
    train_rank, train_world = (0, 1) if memory else (rank, world)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t0 = time.perf_counter()
    steps = 0
    for x, y in train.batches(0, train_rank, train_world):
        if idle_step_ms is not None:  # an accelerator's step: the CPU is free while it runs
            time.sleep(idle_step_ms / 1000)
        else:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        steps += 1
    epoch_s = time.perf_counter() - t0
    train_reads, train_fetched = list(reads), fetched[0]
    train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    val_passes = []
    for _ in range(2):
        before = len(reads)
        with torch.no_grad():
            for x, _ in splits.val.batches(0, rank, world):
                model(x)
        val_passes.append(sum(b for _, b in reads[before:]))
    return {
        "steps": steps,
        "epoch_s": epoch_s,
        "steps_per_s": steps / epoch_s,
        "train_bytes": sum(b for _, b in train_reads),
        "train_row_groups": len(train_reads),
        "largest_row_group_bytes": max((b for _, b in train_reads), default=0),
        "s3_train_bytes_fetched": train_fetched,
        "val_bytes_first_pass": val_passes[0],
        "val_bytes_second_pass": val_passes[1],
        "peak_rss_train_mb": train_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----------------------------------------------------------------------------------------------
# The driver


def run_ranks(
    code: Path,
    uri: str,
    endpoint: str | None = None,
    memory: bool = False,
    world: int = 2,
    idle_step_ms: float | None = None,
) -> list[dict]:
    """`world` ranks at once, each a process running the orchestrator code under `code`."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(r), "--world", str(world), "--uri", uri]
            + (["--endpoint", endpoint] if endpoint else [])
            + (["--memory"] if memory else [])
            + (["--idle-step-ms", str(idle_step_ms)] if idle_step_ms is not None else []),
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a rank failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_bench_s3() -> tuple[subprocess.Popen, str]:
    """moto's server, with the benchmark's credentials in the environment."""
    proc, endpoint = start_moto()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    return proc, endpoint


def summarize(label: str, size: int, ranks: list[dict]) -> dict:
    worst = max(ranks, key=lambda r: r["train_bytes"])
    return {
        "run": label,
        "data_mb": size / 2**20,
        "train_mb_per_rank": [round(r["train_bytes"] / 2**20, 1) for r in ranks],
        "train_read_over_data": round(worst["train_bytes"] / size, 3),
        "bound_over_data": round((size / len(ranks) + worst["largest_row_group_bytes"]) / size, 3),
        "val_mb_per_rank_first_pass": [round(r["val_bytes_first_pass"] / 2**20, 1) for r in ranks],
        "val_mb_per_rank_second_pass": [round(r["val_bytes_second_pass"] / 2**20, 1) for r in ranks],
        "s3_train_mb_fetched_per_rank": [round(r["s3_train_bytes_fetched"] / 2**20, 1) for r in ranks],
        "steps_per_rank": [r["steps"] for r in ranks],
        "steps_per_s": round(min(r["steps_per_s"] for r in ranks), 1),
        "peak_rss_train_mb": round(max(r["peak_rss_train_mb"] for r in ranks)),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ranks)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="size of the 1x data set")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--baseline", type=Path, help="another checkout to run side by side (e.g. /work/main)")
    parser.add_argument("--s3", action="store_true", help="also read the 1x data set from a local S3 server")
    parser.add_argument("--s3-scale", action="store_true", help="with --s3: the --scale x data set too")
    parser.add_argument(
        "--idle-step-ms",
        type=float,
        help="with --s3: also pace S3 against memory with a step that waits this long and leaves the CPU free "
        "(default 5; 0: not)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="where the data sets are written and kept (reused when there; default: a temporary directory)",
    )
    parser.add_argument("--json", action="store_true")
    # One rank (internal)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--uri")
    parser.add_argument("--endpoint")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--read-ahead", type=int)
    args = parser.parse_args()
    if args.rank is None:  # the driver's default; a rank runs the CPU step unless the driver passes --idle-step-ms
        args.idle_step_ms = 5.0 if args.idle_step_ms is None else (args.idle_step_ms or None)
    if args.rank is not None:
        print(
            json.dumps(
                run_rank(
                    args.uri, args.rank, args.world, args.endpoint, args.memory, args.read_ahead, args.idle_step_ms
                )
            )
        )
        return
    idle = f", {args.idle_step_ms:g} ms idle step" if args.idle_step_ms else ""  # the idle-step rows' label
    base = args.dir or Path(tempfile.mkdtemp(prefix="parquet-bench-"))
    rows = []
    try:
        sizes = {}
        for mult in (1, args.scale):
            path = base / f"x{mult}"
            sizes[mult] = (
                sum(f.stat().st_size for f in path.iterdir()) if path.exists() else write_dataset(path, args.mb * mult)
            )
            rows.append(summarize(f"{mult}x, local disk", sizes[mult], run_ranks(ROOT, str(path))))
            if args.baseline:
                rows.append(
                    summarize(f"{mult}x, local disk, {args.baseline}", sizes[mult], run_ranks(args.baseline, str(path)))
                )
        if args.s3:
            import boto3

            proc, endpoint = start_bench_s3()
            try:
                s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
                s3.create_bucket(Bucket="bench")

                def s3_row(mult: int, label: str = "", idle_step_ms: float | None = None) -> dict:
                    """The ranks reading the mult x data set from S3, with the CPU the server spent meanwhile."""
                    before = cpu_seconds(proc.pid)
                    ranks = run_ranks(ROOT, f"s3://bench/x{mult}/", endpoint, idle_step_ms=idle_step_ms)
                    row = summarize(f"{mult}x, S3 (moto){label}", sizes[mult], ranks)
                    row["s3_server_cpu_s"] = round(cpu_seconds(proc.pid) - before, 1)
                    return row

                for mult in (1, args.scale) if args.s3_scale else (1,):
                    for f in sorted((base / f"x{mult}").iterdir()):
                        s3.upload_file(str(f), "bench", f"x{mult}/{f.name}")
                    rows.append(s3_row(mult))
                rows.append(summarize("1x, held in memory", sizes[1], run_ranks(ROOT, str(base / "x1"), memory=True)))
                if idle:
                    rows.append(s3_row(1, idle, args.idle_step_ms))
                    rows.append(
                        summarize(
                            f"1x, held in memory{idle}",
                            sizes[1],
                            run_ranks(ROOT, str(base / "x1"), memory=True, idle_step_ms=args.idle_step_ms),
                        )
                    )
            finally:
                proc.terminate()
                proc.wait()
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    one, big = (
        rows[0],
        next(r for r in rows if r["run"].startswith(f"{args.scale}x, local disk") and "/" not in r["run"]),
    )
    ratios = {
        "peak_rss_10x_over_1x": round(big["peak_rss_mb"] / one["peak_rss_mb"], 3),
        "peak_rss_train_10x_over_1x": round(big["peak_rss_train_mb"] / one["peak_rss_train_mb"], 3),
    }
    by_run = {r["run"]: r for r in rows}
    if "1x, S3 (moto)" in by_run:
        ratios["s3_steps_per_s_over_memory"] = round(
            by_run["1x, S3 (moto)"]["steps_per_s"] / by_run["1x, held in memory"]["steps_per_s"], 3
        )
    if f"{args.scale}x, S3 (moto)" in by_run:
        big_s3, one_s3 = by_run[f"{args.scale}x, S3 (moto)"], by_run["1x, S3 (moto)"]
        ratios["s3_peak_rss_10x_over_1x"] = round(big_s3["peak_rss_mb"] / one_s3["peak_rss_mb"], 3)
    if idle and f"1x, S3 (moto){idle}" in by_run:
        ratios["s3_steps_per_s_over_memory_idle_step"] = round(
            by_run[f"1x, S3 (moto){idle}"]["steps_per_s"] / by_run[f"1x, held in memory{idle}"]["steps_per_s"], 3
        )
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios}))
        return
    for r in rows:
        print(json.dumps(r))
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
