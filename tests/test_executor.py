"""The executors' contract: the same job through every executor (the driver, one Ray task, Ray Train's worker
group) trains the same steps to the same metrics and the same weights, and is recorded the same way."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from commands import run_command

from orchestrator import checkpoint as ckpt
from orchestrator import storage

ROOT = Path(__file__).resolve().parents[1]

# Each executor hosts the job through a run session of its own, on one embedded Ray, in a process of its own
# (an embedded Ray dies with it); the summaries come back as JSON lines.
THROUGH_EVERY_EXECUTOR = r"""
import json, sys
from orchestrator.executor import Executor, GroupHooks
from orchestrator.ray_runtime import start_ray, stop_ray
from orchestrator.rundir import RunDir
from orchestrator.session import RunPlan, RunSession
from orchestrator.spec import build_spec

storage = sys.argv[1]
job = {"name": "contract", "data": {"name": "digits"}, "model": {"hidden": 32},
       "train": {"max_steps": 6, "batch_size": 32}, "validation": {"every_n_steps": 3},
       "scaling": {"num_workers": 1}, "checkpoint": {"storage": storage}}
start_ray(None)
try:
    for executor in Executor:
        spec = build_spec({**job, "name": f"contract-{executor}"})
        run = RunDir.open(f"{storage}/{spec.name}")
        session = RunSession(RunPlan(spec, run, executor, base_dir="."), say=print)
        session.begin()
        hooks = GroupHooks(embedded=True, run_name=spec.name)
        summary = session.end(session.host(lambda: session.execute(session.loop_config(), group=hooks)))
        print("SUMMARY " + json.dumps({"executor": str(executor), **summary.to_dict()}), flush=True)
finally:
    stop_ray()
"""


def weights(run_uri: str) -> dict:
    fs, root = storage.open_storage(run_uri)
    _, files = ckpt.restore_latest(fs, root)
    return ckpt.deserialize_weights(files[ckpt.WEIGHTS])


@pytest.mark.slow  # an embedded Ray, a task and a Ray Train group
def test_every_executor_trains_the_same_job_to_the_same_metrics(tmp_path):
    res = run_command([sys.executable, "-c", THROUGH_EVERY_EXECUTOR, str(tmp_path)], cwd=ROOT, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    found = [json.loads(line[8:]) for line in res.stdout.splitlines() if line.startswith("SUMMARY ")]
    by_executor = {s["executor"]: s for s in found}
    assert sorted(by_executor) == ["driver", "group", "task"], res.stdout[-3000:]
    reference = by_executor["driver"]
    assert reference["status"] == "finished" and reference["steps"] == 6 and reference["metrics"]["val_loss"] > 0
    first = weights(reference["run_uri"])
    for executor in ("task", "group"):
        s = by_executor[executor]
        assert s["status"] == "finished" and s["steps"] == reference["steps"], s
        assert s["metrics"] == reference["metrics"] and s["best"]["value"] == reference["best"]["value"], executor
        assert s["test"]["metrics"] == reference["test"]["metrics"], executor
        other = weights(s["run_uri"])
        assert all(torch.equal(first[k], other[k]) for k in first), f"{executor}: other weights"
        record = json.loads((tmp_path / f"contract-{executor}" / "run.json").read_text())
        assert record["executor"]["kind"] == executor and record["status"] == "finished"
