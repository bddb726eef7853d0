"""A bring-your-own loop (`entrypoint:`) through `orchestrator run`: its reports are the run's steps, progress lines,
metrics and committed checkpoints; a restart resumes from them; the summary, `checkpoints` and the report agree."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from commands import run_command

ROOT = Path(__file__).resolve().parents[1]

# A plain Ray Train loop as a user has one, on two workers: it resumes from Ray's checkpoint and reports an epoch at a
# time with a checkpoint (rank 0 its state, rank 1 a part of its own); its first attempt dies after its second report.
LOOP = """
import json
import os
import tempfile

import ray.train


def train(config):
    rank = ray.train.get_context().get_world_rank()
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = json.load(open(os.path.join(d, "state.json")))["epoch"] + 1
    for epoch in range(start, config["epochs"]):
        with tempfile.TemporaryDirectory() as tmp:
            json.dump({"epoch": epoch}, open(os.path.join(tmp, "state.json" if rank == 0 else f"part-{rank}.json"), "w"))
            metrics = {"epoch": epoch, "loss": 1.0 / (epoch + 1), "accuracy": epoch / 4}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if epoch == 1 and not os.path.exists(config["flag"]):
            open(config["flag"], "w").close()
            raise RuntimeError("the first attempt dies after its second report")
"""


def orchestrator(*args, cwd=ROOT, timeout=400):
    return run_command([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=dict(os.environ), timeout=timeout)


@pytest.mark.slow  # two attempts of a two-worker Ray Train run: a minute or two on two busy cores
def test_a_bring_your_own_loop_reports_steps_metrics_and_checkpoints_and_resumes_from_them(tmp_path):
    (tmp_path / "resumable_loop.py").write_text(LOOP)
    storage = tmp_path / "runs"
    (tmp_path / "job.yaml").write_text(
        "name: own\nentrypoint: resumable_loop:train\n"
        f"config: {{epochs: 4, flag: {tmp_path / 'flag'}}}\n"
        "scaling: {num_workers: 2}\nfailure: {max_failures: 1, retry_exceptions: true}\n"
        f"checkpoint: {{storage: {storage}}}\n"
    )
    res = orchestrator("run", str(tmp_path / "job.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    # A progress line as each report comes, the restart between, and the summary counting what it reported.
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split("  ")[:2] for s in steps] == [
        ["step 1", "epoch 0"],
        ["step 2", "epoch 1"],
        ["step 3", "epoch 2"],
        ["step 4", "epoch 3"],
    ]
    assert steps[2].endswith("committed checkpoint_00000003") and "loss 0.3333  accuracy 0.5000" in steps[2]
    assert (
        lines.index(steps[1]) < next(i for i, line in enumerate(lines) if "restart 1/1" in line) < lines.index(steps[2])
    )
    run = storage / "own"
    summary = next(line for line in lines if line.startswith("finished: own"))
    assert summary.startswith("finished: own  steps 4  epochs 4  wall ")
    assert (
        f"  checkpoint: {run}/checkpoint_00000004" in lines and "  last reported: loss 0.2500  accuracy 0.7500" in lines
    )

    # `checkpoints` lists what the summary names: each report's checkpoint, committed with its manifest.
    listed = orchestrator("checkpoints", str(run), "--json")
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout.splitlines()[-1])
    assert [(c["step"], c["epoch"], c["metrics"]["accuracy"]) for c in found] == [(i + 1, i, i / 4) for i in range(4)]
    assert found[-1]["uri"] == f"{run}/checkpoint_00000004" and all(c["size"] > 0 for c in found)
    manifest = json.loads((run / "checkpoint_00000002" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"state.json", "part-1.json"}  # both ranks' parts, committed once both are stored

    # Its metrics in metrics.jsonl, each step once (the second attempt went on from the checkpoint of step 2),
    # and in the report.
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["split"], e["loss"]) for e in entries] == [(i + 1, "train", 1.0 / (i + 1)) for i in range(4)]
    page = (run / "report.html").read_text()
    assert "No metrics were recorded" not in page and 'alt="Training and validation loss' in page
    assert 'alt="accuracy as the loop reported it, by step."' in page
    record = json.loads((run / "run.json").read_text())
    assert record["summary"]["steps"] == 4 and record["summary"]["checkpoint"] == f"{run}/checkpoint_00000004"

    # Run again: finished, nothing to do; the resumed attempt said where it went on from.
    again = orchestrator("run", str(tmp_path / "job.yaml"))
    assert again.returncode == 0 and "already finished at step 4" in again.stdout
