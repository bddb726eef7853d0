"""Checkpoint transfer: commit and restore of a ~300 MB checkpoint to a local S3 server (moto), against
boto3's transfer manager (`upload_file` / `download_file`, default TransferConfig: 8 MB parts, 10 threads)
moving the same bytes to and from the same server, measured in one run, rounds interleaved.

Also measured, for the record of the choice: the commit and restore as they were (each file after the
other, s3fs's defaults), s3fs's own multipart upload with the same parts, and pyarrow's S3 filesystem. And how fast a failure that cannot heal is decided
at upload: a missing bucket, an AccessDenied (moto with IAM checks on), and an endpoint that accepts and
never answers under `checkpoint.upload_timeout_s=5`.

Usage: python bench/checkpoint_transfer.py [--mb 300] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from local_servers import start_moto

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import checkpoint as ckpt  # noqa: E402
from orchestrator import storage  # noqa: E402

MiB = 2**20


def client(endpoint: str, key: str = "testing", secret: str = "testing"):
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret
    )


def checkpoint_files(total_mb: int) -> dict[str, bytes]:
    """A checkpoint's shape: weights a third, optimizer state two thirds (AdamW's moments), small rest."""
    weights = total_mb * MiB // 3
    return {
        ckpt.WEIGHTS: os.urandom(weights),
        "state.pt": os.urandom(total_mb * MiB - weights),
        "rng.pt": os.urandom(20_000),
        "job.yaml": b"name: bench\n" * 100,
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def transfer(endpoint: str, total_mb: int, rounds: int) -> dict:
    from boto3.s3.transfer import TransferConfig

    s3 = client(endpoint)
    s3.create_bucket(Bucket="bench")
    files = checkpoint_files(total_mb)
    nbytes = sum(len(v) for v in files.values())
    tmp = Path(tempfile.mkdtemp())
    blob = tmp / "checkpoint.bin"
    with blob.open("wb") as fh:
        for data in files.values():
            fh.write(data)
    fs, root = storage.open_storage("s3://bench/runs/r", endpoint)
    config = TransferConfig()
    pa = None
    try:
        import pyarrow.fs as pafs

        pa = pafs.S3FileSystem(
            endpoint_override=endpoint, scheme="http", region="us-east-1", access_key="testing", secret_key="testing"
        )
    except ImportError:
        pass

    def before_commit(step: int) -> None:
        # The commit as it was: each file after the other, one write each with s3fs's defaults.
        path = f"{root}/before_{step}"
        for name, data in files.items():
            fs.pipe_file(f"{path}/{name}", data)
            ckpt.sha256(data)
        fs.pipe_file(f"{path}/{ckpt.MANIFEST}", b"{}")

    def before_restore(step: int) -> None:
        for name in files:
            ckpt.sha256(fs.cat_file(f"{root}/before_{step}/{name}"))

    def s3fs_parts(step: int) -> None:
        # The alternative to boto3 for large objects: s3fs's async multipart, same part size and files at once.
        fs.pipe(
            {f"{root}/s3fs_{step}/{name}": data for name, data in files.items()},
            chunksize=storage.PART_SIZE,
            max_concurrency=storage.PARTS_IN_FLIGHT,
        )

    def pyarrow_write(step: int) -> None:
        for name, data in files.items():
            with pa.open_output_stream(f"bench/runs/pa_{step}/{name}") as out:
                out.write(data)

    def pyarrow_read(step: int) -> None:
        for name in files:
            with pa.open_input_file(f"bench/runs/pa_{step}/{name}") as src:
                src.readall()

    times: dict[str, list[float]] = {}
    for r in range(rounds):
        step = r + 1
        row = {
            "boto3 upload_file": lambda r=r: s3.upload_file(str(blob), "bench", f"boto/{r}", Config=config),
            "commit (this)": lambda step=step: ckpt.commit_checkpoint(fs, root, step, 0, files, {}),
            "commit (before)": lambda step=step: before_commit(step),
            "s3fs multipart write": lambda step=step: s3fs_parts(step),
        }
        if pa is not None:
            row["pyarrow write"] = lambda step=step: pyarrow_write(step)
        for name, fn in row.items():
            times.setdefault(name, []).append(timed(fn))
        info = next(c for c in ckpt.list_checkpoints(fs, root) if c.step == step)
        row = {
            "boto3 download_file": lambda r=r: s3.download_file(
                "bench", f"boto/{r}", str(tmp / "down.bin"), Config=config
            ),
            "restore (this)": lambda info=info: ckpt.read_verified(fs, info),
            "restore (before)": lambda step=step: before_restore(step),
        }
        if pa is not None:
            row["pyarrow read"] = lambda step=step: pyarrow_read(step)
        for name, fn in row.items():
            times.setdefault(name, []).append(timed(fn))
        print(f"round {r + 1}: " + ", ".join(f"{k} {nbytes / MiB / v[-1]:.0f}" for k, v in times.items()), flush=True)
    rates = {k: nbytes / MiB / statistics.median(v) for k, v in times.items()}

    def ratio(name: str, baseline: str) -> float:
        # Paired by round (each round's transfers ran back to back), then the median: the load of
        # a shared machine moves both sides of a round together.
        return statistics.median(b / t for t, b in zip(times[name], times[baseline], strict=True))

    return {
        "checkpoint_MiB": nbytes / MiB,
        "MiB_per_s": rates,
        "commit_ratio": ratio("commit (this)", "boto3 upload_file"),
        "restore_ratio": ratio("restore (this)", "boto3 download_file"),
        "commit_ratio_before": ratio("commit (before)", "boto3 upload_file"),
        "restore_ratio_before": ratio("restore (before)", "boto3 download_file"),
        "commit_ratio_per_round": [
            b / t for t, b in zip(times["commit (this)"], times["boto3 upload_file"], strict=True)
        ],
    }


def time_to_failure(fs, root: str) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        ckpt.commit_checkpoint(fs, root, 1, 0, {ckpt.WEIGHTS: os.urandom(20 * MiB)}, {})
    except storage.StorageError as exc:
        return time.perf_counter() - start, str(exc)
    raise AssertionError("the upload did not fail")


def failures(endpoint: str) -> dict:
    out = {}
    fs, root = storage.open_storage("s3://no-such-bucket/runs/r", endpoint)
    out["missing bucket"] = time_to_failure(fs, root)

    proc, guarded = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        import boto3

        iam = boto3.client(
            "iam", endpoint_url=guarded, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        client(guarded).create_bucket(Bucket="guarded")
        saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        try:
            fs, root = storage.open_storage("s3://guarded/runs/r", guarded)
            out["AccessDenied"] = time_to_failure(fs, root)
        finally:
            os.environ.update({k: v for k, v in saved.items() if v is not None})
    finally:
        proc.terminate()
        proc.wait()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        fs, root = storage.open_storage(
            "s3://bench/runs/r", f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=5
        )
        out["blackhole, upload_timeout_s=5"] = time_to_failure(fs, root)
    finally:
        listener.close()
    return {k: {"seconds": t, "error": e} for k, (t, e) in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="checkpoint size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    load = os.getloadavg()[0]
    proc, endpoint = start_moto()
    try:
        result = {"load_before": load, "transfer": transfer(endpoint, args.mb, args.rounds)}
        result["failures"] = failures(endpoint)
    finally:
        proc.terminate()
        proc.wait()
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    t = result["transfer"]
    print(f"\ncheckpoint of {t['checkpoint_MiB']:.0f} MiB, median of {args.rounds} rounds (MiB/s):")
    for name, rate in t["MiB_per_s"].items():
        print(f"  {name:22s} {rate:7.1f}")
    print(
        f"commit / boto3 upload_file: {t['commit_ratio']:.2f} (before: {t['commit_ratio_before']:.2f}); "
        f"restore / boto3 download_file: {t['restore_ratio']:.2f} (before: {t['restore_ratio_before']:.2f})"
    )
    print("commit / boto3 upload_file by round: " + ", ".join(f"{r:.2f}" for r in t["commit_ratio_per_round"]))
    for name, f in result["failures"].items():
        print(f"{name}: failed in {f['seconds']:.2f} s: {f['error']}")
    print(f"load average {result['load_before']:.1f} before, {result['load_after']:.1f} after")


if __name__ == "__main__":
    main()
