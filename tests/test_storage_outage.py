"""The S3 service goes away during uploads and comes back: retried uploads, nothing partial ever visible."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import S3Server, TcpProxy
from ports import free_port

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.loop import LoopContext, run_training
from orchestrator.spec import build_spec

JOB = {
    "name": "outage",
    "model": {"name": "mlp", "hidden": 64, "layers": 2},
    "data": {"name": "digits"},
    "train": {"epochs": 2, "batch_size": 32, "seed": 1, "log_every_n_steps": 1000},
    "checkpoint": {"every_n_steps": 3, "keep_last": 3},
}


@pytest.fixture
def s3_behind_proxy(monkeypatch):
    server = S3Server(free_port())
    server.start()
    proxy = TcpProxy(server.port)
    proxy.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server.client().create_bucket(Bucket="outage")
    yield server, proxy
    proxy.stop()
    server.stop()


def weights_of(run_uri: str, endpoint: str) -> dict:
    fs, root = storage.open_storage(run_uri, endpoint)
    _, files = ckpt.restore_latest(fs, root)
    return ckpt.deserialize_weights(files[ckpt.WEIGHTS])


class VisibilityWatcher(threading.Thread):
    """Lists and verifies every visible checkpoint, straight from the server, for as long as the run goes."""

    def __init__(self, run_uri: str, endpoint: str):
        super().__init__(daemon=True)
        self.fs, self.root = storage.open_storage(run_uri, endpoint)
        self.stop_flag = threading.Event()
        self.checked, self.partial = 0, []

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for info in ckpt.list_checkpoints(self.fs, self.root):
                try:
                    ckpt.read_verified(self.fs, info)
                    self.checked += 1
                except FileNotFoundError:
                    pass  # deleted by retention between listing and reading: not a partial checkpoint
                except ValueError as exc:
                    self.partial.append(str(exc))
            time.sleep(0.05)


def outage_after_first_checkpoint(
    run_uri: str, endpoint: str, proxy: TcpProxy, down_s: float | None
) -> threading.Thread:
    fs, root = storage.open_storage(run_uri, endpoint)

    def cut():
        while not ckpt.list_checkpoints(fs, root):
            time.sleep(0.01)
        proxy.stop()
        if down_s is not None:
            time.sleep(down_s)
            proxy.start()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # two whole runs, one through an outage
def test_outage_mid_run_is_survived_with_identical_weights(s3_behind_proxy):
    server, proxy = s3_behind_proxy
    reference = build_spec(
        JOB, ["checkpoint.storage=s3://outage/reference", f"checkpoint.endpoint_url={server.endpoint}"]
    )
    run_training(reference, LoopContext(run_uri="s3://outage/reference/outage", log=lambda m: None))

    spec = build_spec(JOB, ["checkpoint.storage=s3://outage/runs", f"checkpoint.endpoint_url={proxy.endpoint}"])
    run_uri = "s3://outage/runs/outage"
    watcher = VisibilityWatcher(run_uri, server.endpoint)
    watcher.start()
    cutter = outage_after_first_checkpoint(run_uri, server.endpoint, proxy, down_s=3.0)
    start = time.time()
    summary = run_training(spec, LoopContext(run_uri=run_uri, log=lambda m: None))
    cutter.join()
    watcher.stop_flag.set()
    watcher.join()
    assert time.time() - start > 3.0  # the run really waited out the outage
    assert summary.steps == 2 * 41 and summary.checkpoint.endswith("checkpoint_00000082")
    assert watcher.partial == [] and watcher.checked > 0
    final = weights_of(run_uri, server.endpoint)
    expected = weights_of("s3://outage/reference/outage", server.endpoint)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_long_outage_fails_clearly_and_a_rerun_resumes(s3_behind_proxy):
    server, proxy = s3_behind_proxy
    spec = build_spec(
        JOB,
        [
            "checkpoint.storage=s3://outage/runs",
            f"checkpoint.endpoint_url={proxy.endpoint}",
            "checkpoint.upload_timeout_s=3",
        ],
    )
    run_uri = "s3://outage/runs/outage"
    cutter = outage_after_first_checkpoint(run_uri, server.endpoint, proxy, down_s=None)
    # Which of the checkpointer's requests meets the outage first is a race: a file's upload, or the listing of the
    # run (seen in CI: "s3://outage/runs/outage: list still failing after 2.3 s"). Either is named, with its operation.
    with pytest.raises(
        RuntimeError, match=r"checkpoint upload failed: s3://outage/runs/outage(/\S+)?: \w+ still failing after"
    ):
        run_training(spec, LoopContext(run_uri=run_uri, log=lambda m: None))
    cutter.join()
    fs, root = storage.open_storage(run_uri, server.endpoint)
    committed = ckpt.list_checkpoints(fs, root)
    assert committed and all(ckpt.read_verified(fs, c) for c in committed)

    proxy.start()
    summary = run_training(spec, LoopContext(run_uri=run_uri, log=lambda m: None))
    assert summary.resumed_from == f"{run_uri}/checkpoint_{committed[-1].step:08d}"
    assert summary.steps == 2 * 41
