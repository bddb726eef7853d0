"""The loop's parts and the run's records, each on its own: cadence, early stopping, run.json, a run's directory."""

from __future__ import annotations

import json

import pytest

from orchestrator import checkpoint as ckpt
from orchestrator.loop.cadence import Cadence
from orchestrator.loop.early_stopping import EarlyStopping, watched_metric
from orchestrator.loop.state import TrainState
from orchestrator.rundir import RunDir
from orchestrator.runrecord import RunRecord, RunStatus, summary_from_checkpoints
from orchestrator.spec import build_spec


def spec(*overrides: str):
    return build_spec({"name": "p"}, list(overrides))


# ----------------------------------------------------------------------------------------------
# Cadence


def test_cadence_by_epochs():
    c = Cadence(spec("train.log_every_n_steps=4", "checkpoint.every_n_epochs=2"), total_steps=10)
    assert [s for s in range(1, 11) if c.log_due(s)] == [4, 8, 10]
    assert (
        not c.validation_due(3, last_of_epoch=False)
        and c.validation_due(3, last_of_epoch=True)
        and c.validation_due(10, last_of_epoch=False)
    )
    assert c.checkpoint_due(TrainState(step=5, epoch=2), last_of_epoch=True)
    assert not c.checkpoint_due(TrainState(step=3, epoch=1), last_of_epoch=True)  # every second epoch
    assert c.checkpoint_due(TrainState(step=10, epoch=3), last_of_epoch=False)  # the last step, always
    assert c.checkpoint_due(TrainState(step=4, epoch=1, stopped_early=True), last_of_epoch=False)
    assert (
        c.over(TrainState(step=10))
        and c.over(TrainState(step=2, stopped_early=True))
        and not c.over(TrainState(step=9))
    )


def test_cadence_by_steps():
    c = Cadence(
        spec("validation.every_n_steps=3", "checkpoint.every_n_steps=5", "checkpoint.every_n_epochs=null"),
        total_steps=100,
    )
    assert [s for s in range(1, 13) if c.validation_due(s, last_of_epoch=s == 7)] == [
        3,
        6,
        9,
        12,
    ]  # epoch ends do not count
    assert [s for s in range(1, 16) if c.checkpoint_due(TrainState(step=s), last_of_epoch=True)] == [5, 10, 15]


# ----------------------------------------------------------------------------------------------
# Early stopping and the best validation


def test_early_stopping_decides_the_best_and_the_stop():
    early = EarlyStopping(
        spec(
            "early_stopping.metric=val_accuracy",
            "early_stopping.mode=max",
            "early_stopping.patience=2",
            "early_stopping.min_delta=0.01",
        )
    )
    state = TrainState()
    for step, accuracy in [(1, 0.50), (2, 0.55), (3, 0.555), (4, 0.50)]:
        state.step = step
        early.observe(state, {"val_accuracy": accuracy, "val_loss": 1.0, "val_confusion_matrix": [[1]]})
    assert (
        state.best_step == 2
        and state.best_value == 0.55
        and state.best_metrics == {"val_accuracy": 0.55, "val_loss": 1.0}
    )
    assert state.bad_validations == 2 and state.stopped_early  # 0.555 is not 0.01 better
    assert "has not improved for 2 validations (best 0.5500 at step 2)" in early.stop_message(state)


def test_without_early_stopping_the_best_is_the_lowest_val_loss_and_training_never_stops():
    early = EarlyStopping(spec())
    state = TrainState()
    for step, loss in enumerate([0.9, 0.5, 0.7, 0.8, 0.95, 0.99], 1):
        state.step = step
        early.observe(state, {"val_loss": loss})
    assert state.best_step == 2 and not state.stopped_early


def test_the_watched_metric_is_early_stoppings_else_the_checkpoints_else_val_loss():
    assert watched_metric(spec("early_stopping.metric=val_f1", "early_stopping.mode=max")) == ("val_f1", "max")
    assert watched_metric(spec("checkpoint.best_metric=val_accuracy")) == ("val_accuracy", "max")
    assert watched_metric(spec()) == ("val_loss", "min")


# ----------------------------------------------------------------------------------------------
# run.json and a run's directory


def test_a_run_record_lives_from_running_to_its_end_and_counts_attempts(tmp_path):
    run = RunDir.open(str(tmp_path / "r"))
    assert RunRecord.load(run) is None
    first = RunRecord.begin("r", {"name": "r"}, None, job_file="job.yaml")
    first.save(run)
    raw = json.loads((tmp_path / "r" / "run.json").read_text())
    assert raw["status"] == "running" and raw["attempts"] == 1 and raw["ended"] is None and "sweep" not in raw
    again = RunRecord.begin("r", {"name": "r"}, RunRecord.load(run))
    assert again.attempts == 2 and again.status == RunStatus.RUNNING
    again.end(RunStatus.FAILED, None)
    again.save(run)
    loaded = RunRecord.load(run)
    assert loaded.status == RunStatus.FAILED and loaded.status == "failed" and loaded.ended and not loaded.finished


def test_metrics_log_reader_skips_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl')
    assert RunDir.open(str(tmp_path)).read_metrics() == [{"step": 1, "split": "train"}]


def test_a_summary_reads_the_manifests_counters_and_names_the_best_checkpoint(tmp_path):
    run = RunDir.open(str(tmp_path / "r"))
    counters = {
        "step": 0,
        "epoch": 0,
        "best_metric": "val_loss",
        "best_value": 0.4,
        "best_step": 10,
        "best_metrics": {"val_loss": 0.4},
        "stopped_early": False,
        "first_step_at": 1.0,
        "last_step_at": 2.0,
        "report_blocked_s": 0.0,
        "report_blocked_max_s": 0.0,
        "last_val": {"val_loss": 0.6},
    }
    for step in (10, 20):
        ckpt.commit_checkpoint(
            run.fs,
            run.root,
            step,
            step // 10,
            {"x.bin": b"x"},
            {"val_loss": 0.4},
            {**counters, "step": step, "epoch": step // 10},
        )
    summary = summary_from_checkpoints(run, RunStatus.FINISHED)
    assert summary.steps == 20 and summary.epochs == 2 and summary.metrics == {"val_loss": 0.6}
    assert (
        summary.checkpoint == f"{run.uri}/checkpoint_00000020"
        and summary.best.checkpoint == f"{run.uri}/checkpoint_00000010"
    )
    assert summary.best.value == pytest.approx(0.4) and summary.test is None
    assert summary.to_dict()["status"] == "finished" and "error" not in summary.to_dict()
