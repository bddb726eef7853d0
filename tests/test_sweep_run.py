"""`orchestrator sweep` end to end on a real embedded Ray: grid, ASHA, a killed driver resumed, the best job file run."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from commands import run_command

ROOT = Path(__file__).resolve().parents[1]
LR_SWEEP = "jobs/sweep_digits_lr.yaml"
# 1374 training examples in batches of 32: 43 optimizer steps an epoch.
STEPS_PER_EPOCH = 43
TINY = ["model.hidden=32", "train.log_every_n_steps=50"]


def orchestrator(*args, env=None, timeout=400):
    return run_command(
        [sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout
    )


def result_of(res) -> dict:
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def grid(*lrs: float) -> str:
    values = ", ".join(repr(lr) for lr in lrs)
    return 'sweep.parameters={"optim.lr": {type: grid, values: [' + values + "]}}"


def run_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def val_steps(run_dir: Path) -> list[int]:
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["step"] for e in entries if e["split"] == "val"]


@pytest.mark.slow  # a sweep on Ray, then a run of its best job
def test_grid_sweep_ranks_its_trials_and_the_best_job_file_runs_as_a_job(tmp_path):
    args = ["sweep", LR_SWEEP, f"checkpoint.storage={tmp_path}", *TINY, "train.epochs=2", grid(1e-4, 1e-2), "--json"]
    (tmp_path / "token").write_text(secrets.token_hex(32))
    # A token and no RAY_AUTH_MODE: where Ray 2.60 announces, starting Ray, that token authentication is on.
    res = orchestrator(*args, env={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")})
    out = result_of(res)
    assert "trials: " in res.stderr and "| best val_accuracy" in res.stderr  # the live view (stderr under --json)
    assert "Token authentication" not in res.stderr + res.stdout
    assert [t["config"] for t in out["trials"]] == [
        {"optim.lr": 1e-2},
        {"optim.lr": 1e-4},
    ]  # ranked: 10x the LR wins at 2 epochs
    assert [t["status"] for t in out["trials"]] == ["done", "done"] and out["status"] == "finished"
    assert [t["steps"] for t in out["trials"]] == [2 * STEPS_PER_EPOCH] * 2 and out[
        "total_steps"
    ] == 4 * STEPS_PER_EPOCH
    assert out["trials"][0]["metric"] > out["trials"][1]["metric"] + 0.2

    best = out["best"]
    sweep_dir = tmp_path / "digits-lr"
    assert best["config"] == {"optim.lr": 1e-2} and best["metrics"]["val_accuracy"] == out["trials"][0]["metric"]
    assert (
        best["run_uri"] == str(sweep_dir / best["trial_id"])
        and best["checkpoint"] == f"{best['run_uri']}/checkpoint_00000086"
    )
    for trial in out["trials"]:  # every trial is a run of the job under the sweep's storage
        record = run_record(sweep_dir / trial["trial_id"])
        assert record["status"] == "finished" and record["job"]["optim"]["lr"] == trial["config"]["optim.lr"]
        assert (sweep_dir / trial["trial_id"] / "checkpoint_00000086" / "manifest.json").exists()
    recorded = json.loads((sweep_dir / "sweep.json").read_text())
    assert recorded["status"] == "finished"
    # Stamped at the command's start, as the wall time is counted (not once Ray is up, seconds later).
    span = datetime.fromisoformat(recorded["ended"]) - datetime.fromisoformat(recorded["started"])
    assert abs(span.total_seconds() - out["wall_s"]) < 1.0, (recorded["started"], recorded["ended"], out["wall_s"])
    # Its report, written at its end as a cross-validation's is.
    assert (
        out["report"] == str(sweep_dir / "report.html") and "Sweep digits-lr" in (sweep_dir / "report.html").read_text()
    )

    # The best trial written out as a job file: it runs like any job and learns as the trial did.
    assert out["best_job_file"] == str(sweep_dir / "best.yaml")
    run = result_of(
        orchestrator("run", out["best_job_file"], "scaling.num_workers=0", "--json", env={"OMP_NUM_THREADS": "1"})
    )
    assert (
        run["status"] == "finished"
        and run["run"] == "digits-lr-best"
        and run["run_uri"] == str(tmp_path / "digits-lr-best")
    )
    assert run["steps"] == 2 * STEPS_PER_EPOCH and run["metrics"]["val_accuracy"] == pytest.approx(
        best["metric"], abs=0.02
    )

    # The same command again: the sweep has finished; nothing runs.
    again = orchestrator(*args)
    assert result_of(again)["already_finished"] and "already finished" in again.stderr


@pytest.mark.slow  # a sweep on Ray
def test_asha_stops_the_weak_trials_early(tmp_path):
    # Good LRs first: by the time the poor ones reach the first rung (epoch 1), the cut-off is high.
    out = result_of(
        orchestrator(
            "sweep",
            LR_SWEEP,
            f"checkpoint.storage={tmp_path}",
            *TINY,
            "train.epochs=4",
            grid(3e-2, 1e-2, 1e-4, 3e-5),
            "sweep.scheduler={name: asha, grace_period: 1, reduction_factor: 2}",
            "--json",
        )
    )
    by_lr = {t["config"]["optim.lr"]: t for t in out["trials"]}
    for lr in (1e-4, 3e-5):
        assert by_lr[lr]["status"] == "stopped" and by_lr[lr]["steps"] == STEPS_PER_EPOCH, by_lr[lr]
        assert run_record(Path(by_lr[lr]["run_uri"]))["status"] == "stopped"
    assert any(t["status"] == "done" and t["steps"] == 4 * STEPS_PER_EPOCH for t in out["trials"])
    assert out["best"]["config"]["optim.lr"] in (3e-2, 1e-2)
    assert out["total_steps"] < 0.7 * 4 * 4 * STEPS_PER_EPOCH


@pytest.mark.slow  # a sweep on Ray killed part-way, then continued
def test_a_killed_sweep_continues_without_rerunning_finished_trials(tmp_path):
    # Trials of a few seconds (small batches), checkpointed within epochs, one at a time.
    slow = [
        "model.hidden=256",
        "train.batch_size=8",
        "train.epochs=3",
        "checkpoint.every_n_steps=40",
        "checkpoint.every_n_epochs=null",
    ]
    args = [
        "sweep",
        LR_SWEEP,
        f"checkpoint.storage={tmp_path}",
        *slow,
        grid(1e-2, 3e-3, 1e-3),
        "sweep.max_concurrent_trials=1",
        "--json",
    ]
    # Tune snapshots its experiment state every second here, so that one holding a finished trial exists to restore.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sweep_dir = tmp_path / "digits-lr"
    deadline = time.time() + 240

    def ready() -> bool:
        # One trial finished (and Tune's experiment state says so), the next one part-way with a checkpoint.
        records = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/run.json")}
        finished = [t for t, r in records.items() if r["status"] == "finished"]
        states = list((sweep_dir / "tune").glob("experiment_state-*.json"))
        saved = bool(states) and "TERMINATED" in states[0].read_text()
        started = [
            t
            for t, r in records.items()
            if r["status"] == "running" and list((sweep_dir / t).glob("checkpoint_*/manifest.json"))
        ]
        return bool(finished and saved and started)

    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the sweep did not get going"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/run.json")}

    out = result_of(orchestrator(*args))
    steps_per_epoch = 172  # 1374 examples in batches of 8
    assert out["resumed"] and out["status"] == "finished" and len(out["trials"]) == 3
    assert all(t["status"] == "done" and t["steps"] == 3 * steps_per_epoch for t in out["trials"])
    for trial_id, earlier in before.items():
        record = run_record(sweep_dir / trial_id)
        if earlier["status"] == "finished":
            assert record["attempts"] == 1, trial_id  # not run again
        else:
            assert record["attempts"] == 2 and record["resumed_from"], trial_id  # continued from its checkpoint
            assert val_steps(sweep_dir / trial_id) == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]


@pytest.mark.slow
def test_pbt_hands_the_best_weights_to_the_weak_trials(tmp_path):
    # PBT compares the trials running at once: single-example batches make each last long enough for both to overlap.
    out = result_of(
        orchestrator(
            "sweep",
            LR_SWEEP,
            f"checkpoint.storage={tmp_path}",
            *TINY,
            "train.batch_size=1",
            "train.epochs=3",
            "train.log_every_n_steps=5000",
            "schedule.name=constant",
            "schedule.warmup_steps=0",
            "checkpoint.every_n_steps=500",
            grid(1e-3, 1e-6),
            "sweep.search=random",
            "sweep.scheduler={name: pbt, perturbation_interval: 1, quantile_fraction: 0.5}",
            "--json",
        )
    )
    assert out["status"] == "finished" and all(t["steps"] == 3 * 1374 for t in out["trials"])
    records = [run_record(Path(t["run_uri"])) for t in out["trials"]]
    exploited = [r for r in records if r["exploited_from"]]
    assert exploited, "no trial was exploited"
    donor = exploited[0]["exploited_from"].rsplit("/", 2)[-2]
    assert donor != exploited[0]["run"]
    assert min(t["metric"] for t in out["trials"]) > 0.5  # the 1e-6 trial alone would be near chance


@pytest.mark.slow
def test_optuna_search_and_a_trial_of_two_ray_train_workers(tmp_path):
    out = result_of(
        orchestrator(
            "sweep",
            LR_SWEEP,
            f"checkpoint.storage={tmp_path}",
            *TINY,
            "train.epochs=1",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5",
            'sweep.parameters={"optim.lr": {type: loguniform, low: 1e-3, high: 1e-1}}',
            "sweep.search=optuna",
            "sweep.num_samples=2",
            "sweep.seed=0",
            "sweep.max_concurrent_trials=1",
            "--json",
        )
    )
    assert out["status"] == "finished" and len(out["trials"]) == 2
    assert len({t["config"]["optim.lr"] for t in out["trials"]}) == 2
    # Two DDP ranks, 687 examples each: 22 steps an epoch, reported to Tune through TuneReportCallback.
    assert all(t["steps"] == 22 and t["checkpoint"].endswith("checkpoint_00000022") for t in out["trials"])


@pytest.mark.slow
def test_a_sweep_scored_by_cross_validation_ranks_its_trials_by_the_mean_of_their_folds(tmp_path):
    """sweep.cv_folds: 2 trials x 2 folds x 1 epoch; each trial's metric is the mean of its folds' own best values."""
    import io
    import statistics

    from rich.console import Console

    from orchestrator.aggregate import t_quantile_975
    from orchestrator.report import write_report
    from orchestrator.sweep import format_result

    args = ["sweep", LR_SWEEP, f"checkpoint.storage={tmp_path}", *TINY, "train.epochs=1", grid(1e-4, 1e-2)]
    res = orchestrator(*args, "sweep.cv_folds=2", "--json", env={"OMP_NUM_THREADS": "1"})

    out = result_of(res)
    sweep_dir = tmp_path / "digits-lr"
    assert out["status"] == "finished" and [t["config"] for t in out["trials"]] == [
        {"optim.lr": 1e-2},
        {"optim.lr": 1e-4},
    ]
    for trial in out["trials"]:
        bests = []
        for fold in range(2):  # every fold a finished run of its own, validating on its fold
            run = sweep_dir / trial["trial_id"] / f"fold-{fold}"
            record = run_record(run)
            assert record["status"] == "finished" and record["job"]["data"]["folds"] == 2
            assert record["job"]["data"]["fold"] == fold and record["job"]["optim"]["lr"] == trial["config"]["optim.lr"]
            entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            bests.append(max(e["val_accuracy"] for e in entries if e["split"] == "val"))
        assert trial["status"] == "done" and trial["fold_metrics"] == bests
        assert trial["metric"] == trial["best_metric"] == pytest.approx(statistics.mean(bests))
        assert trial["metric_std"] == pytest.approx(statistics.stdev(bests))
        half = t_quantile_975(1) * statistics.stdev(bests) / 2**0.5
        assert trial["metric_ci95"] == pytest.approx([statistics.mean(bests) - half, statistics.mean(bests) + half])
        assert not (sweep_dir / trial["trial_id"] / "run.json").exists()  # the trial is its folds, not a run
    # The live view: a trial is done when its folds are (it has no run.json of its own to say so).
    assert "1 done" in res.stderr and "stopped" not in res.stderr
    # The table shows the spread next to each mean; the best job keeps the folds, to cross-validate and refit it.
    table, text = format_result(out)
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    shown = console.export_text()
    assert "val_accuracy (2-fold mean)" in shown and f"± {out['trials'][0]['metric_std']:.4f} [" in shown
    assert f"train it: orchestrator cv {out['best_job_file']} --refit" in text
    assert yaml_load(out["best_job_file"])["data"]["folds"] == 2
    page = Path(write_report(str(sweep_dir))).read_text()
    assert "val_accuracy (2-fold mean)" in page and f"± {out['trials'][1]['metric_std']:.4f}" in page


def yaml_load(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())
