"""Checkpoints: commit marker written last, verification, retention, async writer, on local disk and real S3."""

import json
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from orchestrator import checkpoint as ckpt
from orchestrator import storage, weights
from orchestrator.errors import BadInput


def files_for(step: int) -> dict[str, bytes]:
    return {
        ckpt.WEIGHTS: ckpt.serialize_weights({"w": torch.full((4, 4), float(step))}),
        "state.pt": ckpt.serialize_state({"step": step, "t": torch.arange(3)}),
    }


@pytest.fixture(params=["local", "s3"])
def run_store(request, tmp_path):
    if request.param == "local":
        uri = str(tmp_path / "run")
    else:
        s3 = request.getfixturevalue("s3_server")
        name = f"ckpt-{int(time.time() * 1e6) % 10**9}"
        s3.client().create_bucket(Bucket=name)
        uri = f"s3://{name}/runs/run"
    fs, root = storage.open_storage(uri)
    return uri, fs, root


def test_commit_list_restore(run_store):
    uri, fs, root = run_store
    for step in (10, 20):
        ckpt.commit_checkpoint(fs, root, step, step // 10, files_for(step), {"val_loss": 1.0 / step})
    found = ckpt.list_checkpoints(fs, root, uri_prefix=uri)
    assert [c.step for c in found] == [10, 20]
    assert found[-1].uri == f"{uri}/checkpoint_00000020"
    info, files = ckpt.restore_latest(fs, root)
    assert info.step == 20 and set(files) == {ckpt.WEIGHTS, "state.pt"}
    assert torch.equal(ckpt.deserialize_weights(files[ckpt.WEIGHTS])["w"], torch.full((4, 4), 20.0))
    manifest = json.loads(fs.cat_file(f"{root}/checkpoint_00000020/manifest.json"))
    assert (
        manifest["files"][ckpt.WEIGHTS]["size"] == len(files[ckpt.WEIGHTS])
        and len(manifest["files"]["state.pt"]["sha256"]) == 64
    )
    assert manifest["run_record"] == "../run.json"


def test_directory_without_manifest_is_invisible(run_store):
    uri, fs, root = run_store
    ckpt.commit_checkpoint(fs, root, 5, 0, files_for(5), {})
    # A crash mid-write leaves files but no manifest.
    storage.write_bytes(fs, f"{root}/checkpoint_00000009/model.safetensors", b"partial")
    assert [c.step for c in ckpt.list_checkpoints(fs, root)] == [5]
    assert ckpt.restore_latest(fs, root)[0].step == 5


def test_truncated_file_is_skipped_for_the_previous_checkpoint(run_store, caplog):
    uri, fs, root = run_store
    ckpt.commit_checkpoint(fs, root, 1, 0, files_for(1), {})
    ckpt.commit_checkpoint(fs, root, 2, 0, files_for(2), {})
    path = f"{root}/checkpoint_00000002/model.safetensors"
    storage.write_bytes(fs, path, fs.cat_file(path)[:-7])
    with caplog.at_level("WARNING"):
        info, _ = ckpt.restore_latest(fs, root)
    assert info.step == 1
    assert "does not match its manifest" in caplog.text


def test_corrupt_same_size_file_is_detected(run_store):
    uri, fs, root = run_store
    ckpt.commit_checkpoint(fs, root, 3, 0, files_for(3), {})
    path = f"{root}/checkpoint_00000003/state.pt"
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    storage.write_bytes(fs, path, bytes(data))
    assert ckpt.restore_latest(fs, root) is None


def test_recommit_at_a_step_removes_the_stale_manifest_first(run_store):
    uri, fs, root = run_store
    ckpt.commit_checkpoint(fs, root, 4, 0, files_for(4), {"a": 1})
    ckpt.commit_checkpoint(fs, root, 4, 0, files_for(40), {"a": 2})
    info, files = ckpt.restore_latest(fs, root)
    assert info.metrics == {"a": 2}
    assert ckpt.deserialize_weights(files[ckpt.WEIGHTS])["w"][0, 0] == 40.0


def test_retention_keeps_last_and_best(run_store):
    uri, fs, root = run_store
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3, 5: 0.35}
    for step, loss in losses.items():
        ckpt.commit_checkpoint(fs, root, step, 0, files_for(step), {"val_loss": loss})
    deleted = ckpt.apply_retention(fs, root, keep_last=2, keep_best=1, best_metric="val_loss", best_mode="min")
    assert [c.step for c in ckpt.list_checkpoints(fs, root)] == [2, 4, 5]
    assert len(deleted) == 2 and not fs.exists(f"{root}/checkpoint_00000001")


def test_async_writer_has_one_upload_in_flight_and_commits_before_close(tmp_path):
    fs, root = storage.open_storage(str(tmp_path / "run"))
    in_flight, peak, lock = 0, 0, threading.Lock()
    started, release = threading.Event(), threading.Event()

    def slow_files(step):
        def build():
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            started.set()
            release.wait(timeout=60)
            with lock:
                in_flight -= 1
            return files_for(step)

        return build

    writer = ckpt.CheckpointWriter(fs, root, asynchronous=True)
    writer.save(1, 0, slow_files(1), {})
    # The caller is not blocked by the upload: save returned while the upload is held.
    assert started.wait(timeout=60) and not release.is_set() and not ckpt.list_checkpoints(fs, root)
    second = threading.Thread(target=writer.save, args=(2, 0, slow_files(2), {}))
    second.start()  # waits for the first: at most one in flight
    time.sleep(0.5)  # room for a second upload to start, were two allowed at once
    assert peak == 1 and second.is_alive()
    release.set()
    second.join(timeout=60)
    writer.close()
    assert peak == 1
    assert [c.step for c in ckpt.list_checkpoints(fs, root)] == [1, 2]
    assert writer.last_committed.endswith("checkpoint_00000002")


def test_async_writer_surfaces_upload_errors(tmp_path):
    fs, root = storage.open_storage(str(tmp_path / "run"))
    writer = ckpt.CheckpointWriter(fs, root, asynchronous=True)

    def broken():
        raise OSError("disk full")

    writer.save(1, 0, broken, {})
    with pytest.raises(RuntimeError, match="checkpoint upload failed: disk full"):
        writer.close()
    assert ckpt.list_checkpoints(fs, root) == []


def test_export_and_load_weights(run_store, tmp_path):
    uri, fs, root = run_store
    ckpt.commit_checkpoint(fs, root, 7, 1, files_for(7), {})
    out = tmp_path / "out.safetensors"
    _, info = ckpt.resolve_checkpoint(uri)  # a run URI resolves to its latest checkpoint
    size = weights.export_weights(fs, info, str(out), {"step": "7"})
    assert size == out.stat().st_size
    assert torch.equal(load_file(str(out))["w"], torch.full((4, 4), 7.0))
    with safe_open(str(out), "pt") as exported:  # the header's metadata, read as any safetensors reader does
        assert exported.metadata() == {"step": "7"}
    assert torch.equal(weights.load_weights(f"{uri}/checkpoint_00000007")["w"], torch.full((4, 4), 7.0))
    with pytest.raises(BadInput, match="no committed checkpoint"):
        ckpt.resolve_checkpoint(f"{uri}-missing")


def test_load_weights_from_plain_files(tmp_path):
    sd = {"layer.weight": torch.randn(2, 3)}
    torch.save(sd, tmp_path / "sd.pt")
    assert torch.equal(weights.load_weights(str(tmp_path / "sd.pt"))["layer.weight"], sd["layer.weight"])


def test_loading_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('pwned').touch()",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(BadInput, match="not a safetensors or weights-only"):
        weights.load_weights(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()


def test_preflight_errors_name_the_uri_not_the_secret(s3_server, monkeypatch, tmp_path):
    with pytest.raises(BadInput, match=r"s3://no-such-bucket-xyz/runs: the bucket does not exist"):
        storage.preflight("s3://no-such-bucket-xyz/runs")
    with pytest.raises(BadInput, match="cannot reach the storage endpoint") as err:
        # A refused connection fails each attempt at once; the deadline leaves a busy machine the time to make one.
        storage.preflight("s3://b/runs", endpoint_url="http://127.0.0.1:9", timeout_s=4)
    assert "testing" not in str(err.value)
    storage.preflight(str(tmp_path / "fine"))
    # The probe went to the nearest directory that exists and is removed; the storage itself is made by the run.
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "made").mkdir()
    storage.preflight(str(tmp_path / "made"))
    assert list((tmp_path / "made").iterdir()) == []
