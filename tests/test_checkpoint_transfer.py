"""Checkpoint transfer: the files of a checkpoint move at once, large ones in parallel parts, the
manifest only after all of them; restore reads in parallel; a summary reads manifests only."""

from __future__ import annotations

import logging
import os

import pytest
from conftest import FaultyProxy

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.rundir import RunDir
from orchestrator.runrecord import RunStatus, summary_from_checkpoints
from orchestrator.storage import StorageError

MiB = 2**20


def test_large_files_go_up_in_parallel_parts_and_come_back_verified(bucket, s3_server, monkeypatch):
    monkeypatch.setattr(storage, "PART_SIZE", 5 * MiB)  # S3's smallest part: a test-sized multipart upload
    monkeypatch.setattr(storage, "READ_PART_SIZE", 4 * MiB)  # and reads in ranges
    files = {ckpt.WEIGHTS: os.urandom(16 * MiB), "state.pt": os.urandom(11 * MiB), "rng.pt": b"r" * 100}
    fs, root = storage.open_storage(f"s3://{bucket}/runs/r")
    ckpt.commit_checkpoint(fs, root, 1, 0, files, {})
    s3 = s3_server.client()
    etag = {n: s3.head_object(Bucket=bucket, Key=f"runs/r/checkpoint_00000001/{n}")["ETag"] for n in files}
    # A multipart object's ETag ends in -<parts>: 16 MiB in 5 MiB parts is 4 parts, 11 MiB 3.
    assert etag[ckpt.WEIGHTS].endswith('-4"') and etag["state.pt"].endswith('-3"') and "-" not in etag["rng.pt"]
    info = ckpt.list_checkpoints(fs, root)[-1]
    assert ckpt.read_verified(fs, info) == files


def through_proxy(s3_server, fn):
    """Run fn(fs) on a fresh filesystem whose every connection goes through a new proxy; return the proxy's peak."""
    proxy = FaultyProxy(s3_server.port)
    proxy.start()
    try:
        fn(storage.open_storage("s3://any", proxy.endpoint)[0])
        return proxy.peak
    finally:
        proxy.stop()


def test_the_files_of_a_checkpoint_go_up_and_come_back_at_once(bucket, s3_server):
    files = {f"part{i}.bin": os.urandom(6 * MiB) for i in range(3)}
    root = f"{bucket}/runs/r"

    def commit(fs):
        ckpt.commit_checkpoint(fs, root, 1, 0, files, {})

    def restore(fs):
        assert ckpt.read_verified(fs, ckpt.list_checkpoints(fs, root)[-1]) == files

    # One after another would have used one connection throughout.
    assert through_proxy(s3_server, commit) >= 2
    assert through_proxy(s3_server, restore) >= 2


def test_a_failed_file_leaves_no_commit_and_no_write_in_flight(tmp_path):
    fs, root = storage.open_storage(str(tmp_path / "run"))
    (tmp_path / "run" / "checkpoint_00000001" / "state.pt").mkdir(parents=True)  # this file cannot be written
    files = {ckpt.WEIGHTS: os.urandom(8 * MiB), "state.pt": b"s" * 100, "rng.pt": b"r" * 100}
    with pytest.raises(IsADirectoryError):
        ckpt.commit_checkpoint(fs, root, 1, 0, files, {})
    assert ckpt.list_checkpoints(fs, root) == []
    # The other files were finished before the failure was raised: nothing writes behind the caller's back.
    assert (tmp_path / "run" / "checkpoint_00000001" / ckpt.WEIGHTS).stat().st_size == 8 * MiB
    assert not (tmp_path / "run" / "checkpoint_00000001" / ckpt.MANIFEST).exists()


def test_a_summary_reads_only_the_manifests(bucket, s3_server):
    run = RunDir.open(f"s3://{bucket}/runs/r")
    counters = {
        "step": 7,
        "epoch": 1,
        "best_metric": "val_loss",
        "best_value": 0.3,
        "best_step": 7,
        "best_metrics": {"val_loss": 0.3},
        "stopped_early": False,
        "last_val": {"val_loss": 0.3},
    }
    files = {ckpt.WEIGHTS: os.urandom(MiB), "state.pt": os.urandom(MiB)}
    ckpt.commit_checkpoint(run.fs, run.root, 7, 1, files, {"val_loss": 0.3}, counters)
    s3 = s3_server.client()
    for name in files:  # were the summary to read either, it would find nothing and say nothing
        s3.delete_object(Bucket=bucket, Key=f"runs/r/checkpoint_00000007/{name}")
    summary = summary_from_checkpoints(run, RunStatus.FINISHED)
    assert summary.steps == 7 and summary.epochs == 1 and summary.metrics == {"val_loss": 0.3}
    assert summary.best.checkpoint == f"s3://{bucket}/runs/r/checkpoint_00000007"


def test_a_large_upload_heals_after_resets_and_fails_at_once_on_a_missing_bucket(
    bucket, s3_server, monkeypatch, caplog
):
    monkeypatch.setattr(storage, "PART_SIZE", 5 * MiB)
    data = os.urandom(12 * MiB)
    proxy = FaultyProxy(s3_server.port)
    proxy.start()
    try:
        fs, root = storage.open_storage(f"s3://{bucket}/runs/r", proxy.endpoint, timeout_s=30)
        proxy.inject("reset", 2)
        with caplog.at_level(logging.WARNING):
            storage.write_bytes(fs, f"{root}/big", data)
        assert proxy.faulted == 2 and any("retry" in r.getMessage() for r in caplog.records)
        assert storage.read_large(fs, f"{root}/big") == data
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match="the bucket does not exist"):
            storage.write_bytes(fs, "no-such-bucket-transfer/big", data)
        assert not any("retry" in r.getMessage() for r in caplog.records)
    finally:
        proxy.stop()
