"""`orchestrator export` and `report --out` through the CLI: the best checkpoint by default, the step said, the
header saying where the weights came from, and every target that must not be written refused with one line.

One real run (local mode, 30 steps) whose best checkpoint is not its latest: the best is judged by the highest
validation loss, which a model that learns has at its first validation.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from commands import run_command
from safetensors import safe_open
from safetensors.torch import load_file

from orchestrator import checkpoint as ckpt
from orchestrator import storage

ROOT = Path(__file__).resolve().parents[1]


def orchestrator(*args, cwd=ROOT, env=None, timeout=300):
    return run_command(
        [sys.executable, "-m", "orchestrator", *args], cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run with checkpoints at steps 10, 20, 30, its best (and tested) one at step 10; its summary."""
    store = tmp_path_factory.mktemp("export-runs")
    res = orchestrator(
        "run",
        "jobs/digits_mlp.yaml",
        "scaling.num_workers=0",
        f"checkpoint.storage={store}",
        "train.max_steps=30",
        "validation.every_n_steps=10",
        "checkpoint.every_n_steps=10",
        "checkpoint.every_n_epochs=null",
        "checkpoint.keep_last=5",
        "early_stopping.metric=val_loss",
        "early_stopping.mode=max",
        "--json",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["best"]["step"] == 10 and summary["test"]["step"] == 10 and summary["steps"] == 30, summary
    return Path(summary["run_uri"]), summary


def weights_at(run: Path, step: int) -> dict:
    fs, root = storage.open_storage(str(run))
    info = next(c for c in ckpt.list_checkpoints(fs, root) if c.step == step)
    return ckpt.deserialize_weights(ckpt.read_verified(fs, info, [ckpt.WEIGHTS])[ckpt.WEIGHTS])


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_error(res, starts: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: {starts}"), res.stderr


def test_a_run_exports_its_best_checkpoint_and_says_which_with_a_header_that_traces_it(trained, tmp_path):
    run, summary = trained
    out = tmp_path / "model.safetensors"
    res = orchestrator("export", str(run), "--out", str(out))
    assert res.returncode == 0, res.stderr
    # The step the summary names as best, and the test split was evaluated on: not the latest (30).
    assert res.stdout.startswith(f"wrote {out}: step 10 (the best, val_loss "), res.stdout
    assert same_weights(load_file(str(out)), weights_at(run, 10))
    assert not same_weights(load_file(str(out)), weights_at(run, 30))
    with safe_open(str(out), "pt") as f:
        header = f.metadata()
    record = json.loads((run / "run.json").read_text())
    assert header["format"] == "pt" and header["job"] == summary["run"] == "digits-mlp"
    assert header["step"] == "10" and header["model"] == "mlp"
    assert json.loads(header["model_config"]) == record["job"]["model"]
    assert header["checkpoint"] == f"{run}/checkpoint_00000010"
    assert header["fingerprint"] == record.get("fingerprint", record["provenance"]["job_hash"])


def test_latest_and_a_step_are_chosen_by_name_and_a_missing_step_is_refused(trained, tmp_path):
    run, _ = trained
    latest = orchestrator("export", str(run), "--checkpoint", "latest", "--out", str(tmp_path / "l.st"), "--json")
    assert latest.returncode == 0, latest.stderr
    done = json.loads(latest.stdout)
    assert done["step"] == 30 and done["chosen"] == "the latest" and done["metadata"]["step"] == "30"
    assert same_weights(load_file(str(tmp_path / "l.st")), weights_at(run, 30))
    step = orchestrator("export", str(run), "--checkpoint", "20", "--out", str(tmp_path / "s.st"))
    assert step.returncode == 0 and "step 20 (as asked)" in step.stdout, step.stderr
    one_error(
        orchestrator("export", str(run), "--checkpoint", "25", "--out", str(tmp_path / "x.st")),
        f"--checkpoint 25: {run} has no committed checkpoint at that step (it has 10, 20, 30)",
    )
    one_error(
        orchestrator("export", str(run), "--checkpoint", "best-ish", "--out", str(tmp_path / "x.st")),
        "--checkpoint best-ish: give best, latest or a step number",
    )
    # A checkpoint's own URI exports that checkpoint; a choice on top of it is refused.
    named = orchestrator("export", f"{run}/checkpoint_00000020", "--out", str(tmp_path / "n.st"))
    assert named.returncode == 0 and "step 20 (as named)" in named.stdout, named.stderr
    one_error(
        orchestrator("export", f"{run}/checkpoint_00000020", "--checkpoint", "latest", "--out", str(tmp_path / "x.st")),
        "--checkpoint: ",
    )
    assert not (tmp_path / "x.st").exists()


def test_an_existing_target_is_replaced_only_with_force(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"a file of the user's")
    one_error(orchestrator("export", str(run), "--out", str(out)), f"--out {out}: already exists; --force replaces it")
    assert out.read_bytes() == b"a file of the user's"
    forced = orchestrator("export", str(run), "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert same_weights(load_file(str(out)), weights_at(run, 10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left beside it


def test_a_run_own_files_are_never_a_target_even_with_force(trained, tmp_path):
    run, _ = trained
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.log"}
    for target, whose in (
        (run / "run.json", f"a run's directory {run}"),
        (run / "checkpoint_00000010" / "manifest.json", f"a checkpoint's directory {run}/checkpoint_00000010"),
        (run / "model.safetensors", f"a run's directory {run}"),  # a new file inside a run: still its directory
    ):
        one_error(
            orchestrator("export", str(run), "--out", str(target), "--force"), f"--out {target}: lies inside {whose}"
        )
    # A link elsewhere that leads into the run counts as the run.
    (tmp_path / "into-run").symlink_to(run)
    one_error(
        orchestrator("export", str(run), "--out", str(tmp_path / "into-run" / "m.st")),
        f"--out {tmp_path / 'into-run' / 'm.st'}: lies inside a run's directory {run}",
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.log"} == before
    listed = orchestrator("checkpoints", str(run), "--json")
    assert [c["step"] for c in json.loads(listed.stdout)] == [10, 20, 30]


def test_what_is_not_a_regular_file_is_never_a_target(trained, tmp_path):
    run, _ = trained
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me")
    (tmp_path / "link.st").symlink_to(elsewhere)
    for target, why in (
        ("/dev/null", "is not a regular file (a device, a pipe or a socket)"),
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "link.st"), f"is a symbolic link (to {elsewhere})"),
    ):
        one_error(orchestrator("export", str(run), "--out", target, "--force"), f"--out {target}: {why}")
    assert elsewhere.read_text() == "keep me" and (tmp_path / "link.st").is_symlink()
    assert Path("/dev/null").is_char_device()


def test_report_out_is_checked_as_export_out_is(trained, tmp_path):
    run, _ = trained
    before = (run / "run.json").read_bytes()
    one_error(
        orchestrator("report", str(run), "--out", str(run / "run.json"), "--force"),
        f"--out {run / 'run.json'}: lies inside a run's directory {run}",
    )
    assert (run / "run.json").read_bytes() == before
    out = tmp_path / "r.html"
    out.write_text("mine")
    one_error(orchestrator("report", str(run), "--out", str(out)), f"--out {out}: already exists; --force replaces it")
    assert out.read_text() == "mine"
    forced = orchestrator("report", str(run), "--out", str(out), "--force")
    assert forced.returncode == 0 and out.read_text().startswith("<!DOCTYPE html>"), forced.stderr


def test_checkpoints_and_export_read_s3_at_the_endpoint_given(trained, s3_server, bucket, tmp_path):
    """--endpoint-url wherever storage is read: with no AWS_ENDPOINT_URL, the option is what finds the server."""
    run, _ = trained
    client = s3_server.client()
    for path in run.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"runs/digits-mlp/{path.relative_to(run)}")
    uri = f"s3://{bucket}/runs/digits-mlp"
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    endpoint = ["--endpoint-url", s3_server.endpoint]
    listed = run_command(
        [sys.executable, "-m", "orchestrator", "checkpoints", uri, *endpoint, "--json"], cwd=ROOT, env=env, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert [c["step"] for c in json.loads(listed.stdout)] == [10, 20, 30]
    out = tmp_path / "m.safetensors"
    exported = run_command(
        [sys.executable, "-m", "orchestrator", "export", uri, "--out", str(out), *endpoint],
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert exported.returncode == 0 and "step 10 (the best, val_loss" in exported.stdout, exported.stderr
    assert same_weights(load_file(str(out)), weights_at(run, 10))
