"""A sweep in MLflow against a real `mlflow server`: the sweep is a parent run, each trial a child run with its provenance."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from commands import run_command
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from orchestrator.provenance import job_hash

# One xdist worker for the module: its test uses the MLflow server the other tracking tests use.
pytestmark = pytest.mark.xdist_group("mlflow")

ROOT = Path(__file__).resolve().parents[1]
LR_SWEEP = "jobs/sweep_digits_lr.yaml"
TINY = ["model.hidden=16", "train.log_every_n_steps=10", "sweep.max_concurrent_trials=1"]


def orchestrator(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return run_command([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env=env, timeout=timeout)


def result_of(res) -> dict:
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def grid(*lrs: float) -> str:
    values = ", ".join(repr(lr) for lr in lrs)
    return 'sweep.parameters={"optim.lr": {type: grid, values: [' + values + "]}}"


@pytest.mark.slow  # a sweep on Ray, tracked
def test_sweep_is_a_parent_run_and_each_trial_a_child_run_with_its_provenance(mlflow_server, tmp_path):
    # ASHA, one trial at a time, the good LR first: the poor one is below it at epoch 1 and is stopped there.
    out = result_of(
        orchestrator(
            "sweep",
            LR_SWEEP,
            f"checkpoint.storage={tmp_path}",
            *TINY,
            "train.epochs=2",
            grid(1e-2, 1e-5),
            "sweep.scheduler={name: asha, grace_period: 1, reduction_factor: 2}",
            f"tracking.mlflow.tracking_uri={mlflow_server.uri}",
            "tracking.tensorboard={}",
            "--json",
        )
    )
    assert out["status"] == "finished" and sorted(t["status"] for t in out["trials"]) == ["done", "stopped"]
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(out["tracking"]["mlflow"]["run_id"])
    experiment = client.get_experiment(parent.info.experiment_id)
    # The job's experiment holds the sweep's run and its trials' runs, nothing else.
    assert experiment.name == "sweep-digits-lr" and len(client.search_runs([experiment.experiment_id])) == 3
    children = {
        c.info.run_id: c
        for c in client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
    }
    sweep_dir = tmp_path / "digits-lr"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["tracking"]["mlflow"]["run_id"] == parent.info.run_id
    assert (
        parent.info.run_name == "digits-lr"
        and parent.info.status == "FINISHED"
        and "mlflow.parentRunId" not in parent.data.tags
    )
    assert (
        parent.data.params["sweep.metric"] == "val_accuracy"
        and parent.data.tags["orchestrator.job_hash"] == record["provenance"]["job_hash"]
    )
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"sweep.json", "best.yaml"}

    assert len(children) == 2
    for trial in out["trials"]:
        run_dir = sweep_dir / trial["trial_id"]
        trial_record = json.loads((run_dir / "run.json").read_text())
        child = children[trial_record["tracking"]["mlflow"]["run_id"]]
        assert trial_record["tracking"]["mlflow"]["parent_run_id"] == parent.info.run_id
        # A trial stopped by the scheduler ended as planned: its run is FINISHED too, its tag says stopped.
        assert child.info.status == "FINISHED" and child.data.tags["orchestrator.status"] == trial_record["status"]
        assert trial_record["status"] == {"done": "finished", "stopped": "stopped"}[trial["status"]]
        assert child.info.run_name == f"digits-lr-{trial['trial_id']}"
        assert (
            float(child.data.params["optim.lr"]) == trial["config"]["optim.lr"]
            and child.data.params["model.hidden"] == "16"
        )
        # Provenance like an ordinary run's: in run.json and as the child's tags.
        prov = trial_record["provenance"]
        assert prov["job_hash"] == job_hash(trial_record["job"]) == child.data.tags["orchestrator.job_hash"]
        assert (
            prov["world_size"] == 1
            and prov["hosts"] == 1
            and prov["data"]["source"] == "digits"
            and prov["git"]["commit"]
        )
        assert child.data.tags["mlflow.source.git.commit"] == prov["git"]["commit"]
        # The trial's metric history, step by step as in its metrics.jsonl.
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = [(e["step"], e["val_accuracy"]) for e in history if e["split"] == "val"]
        logged = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "val_accuracy"))
        assert logged == [(s, pytest.approx(v)) for s, v in val] and val[-1][0] == trial["steps"]
        train_steps = [e["step"] for e in history if e["split"] == "train"]
        assert (
            sorted(m.step for m in client.get_metric_history(child.info.run_id, "train_loss")) == train_steps
            and train_steps
        )
        assert "run.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
        # TensorBoard: each trial's events under its own run.
        events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        assert [s.step for s in events.Scalars("val_accuracy")] == [s for s, _ in val]
    assert {c.data.params["optim.lr"] for c in children.values()} == {"0.01", "1e-05"}
    assert not (sweep_dir / "tensorboard").exists()

    # The sweep's run closes with its best trial's results.
    best = json.loads((Path(out["best"]["run_uri"]) / "run.json").read_text())["summary"]
    assert out["best"]["config"] == {"optim.lr": 1e-2}
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["best"]["metrics"]["val_accuracy"])
    assert parent.data.metrics["test_accuracy"] == pytest.approx(best["test"]["metrics"]["test_accuracy"])
