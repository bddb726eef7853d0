"""`orchestrator cv`: k-fold cross-validation on a real embedded Ray; the aggregate against the fold runs' own records,
a killed cross-validation continued, bad input refused before anything starts, the report in Chromium."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from commands import run_command

# The report tests' Chromium (Debian's, driven by Playwright) and how they open a page offline.
from ray_cluster import MARKER, kill_marked, pids_with_marker
from test_report import CHROMIUM, open_in_browser

from orchestrator.aggregate import T_975, aggregate, t_quantile_975

# One xdist worker for the module: its tests share a finished cross-validation and the MLflow server.
pytestmark = pytest.mark.xdist_group("mlflow")

ROOT = Path(__file__).resolve().parents[1]
JOB = "jobs/cv_digits.yaml"
# Three folds of the 1617 non-test digits: 1078 training examples a fold, 17 steps an epoch in batches of 64.
TINY = [
    "data.folds=3",
    "model.hidden=16",
    "train.epochs=2",
    "train.batch_size=64",
    "optim.lr=0.02",
    "schedule.warmup_steps=0",
    "train.log_every_n_steps=50",
]


def orchestrator(*args, env=None, timeout=400):
    return run_command(
        [sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout
    )


def result_of(res) -> dict:
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_t_table_is_students_t_and_the_aggregate_is_mean_std_and_interval():
    from scipy.stats import t

    assert [round(v, 4) for v in T_975] == [round(float(t.ppf(0.975, df)), 4) for df in range(1, 31)]
    assert t_quantile_975(40) == pytest.approx(float(t.ppf(0.975, 40)))
    values = [0.91, 0.95, 0.93, 0.96, 0.90]
    agg = aggregate(values)
    half = float(t.ppf(0.975, 4)) * np.std(values, ddof=1) / np.sqrt(5)
    assert agg["mean"] == pytest.approx(np.mean(values)) and agg["std"] == pytest.approx(np.std(values, ddof=1))
    assert agg["ci95"] == pytest.approx([np.mean(values) - half, np.mean(values) + half], abs=1e-4)
    assert aggregate([0.5]) == {"n": 1, "mean": 0.5, "std": None, "ci95": None, "values": [0.5]}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.folds=null"], "error: data.folds: cv needs the number of folds"),
        (["data.folds=1"], "error: data.folds: Input should be greater than or equal to 2"),
        # The smallest digit class has 161 examples outside the test split.
        (["data.folds=200"], "error: data.folds: 200 is more than the smallest class has examples outside the test"),
        # A dashboard address submits the cross-validation: checked, and refused here, when no cluster answers there.
        (["--address", "http://127.0.0.1:1"], "error: --address http://127.0.0.1:1: no Ray dashboard answers there"),
        (
            ["--address", "http://127.0.0.1:1", "--verbose"],
            "error: --verbose and --ray-address apply to a cross-validation run from",
        ),
        (
            ["data={name: synthetic, task: regression, folds: 3, stratify: true}"],
            "error: data.stratify: stratified folds need class labels, and regression data has none",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(overrides, message, tmp_path):
    res = orchestrator("cv", JOB, f"checkpoint.storage={tmp_path}", *overrides, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.startswith(message) and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert list(tmp_path.iterdir()) == []  # no fold, no record: nothing started


def test_a_submitted_cv_runs_orchestrator_cv_on_the_cluster_with_the_jobs_package():
    from orchestrator.cv import load_cv
    from orchestrator.sweep import build_sweep_submission

    overrides = ["checkpoint.storage=/shared/runs", "data.folds=3"]
    submission = build_sweep_submission(load_cv(JOB, overrides), overrides, "cv", ("--refit",))
    assert submission["entrypoint"] == (
        "python -m orchestrator cv cv_digits.yaml checkpoint.storage=/shared/runs data.folds=3 --refit --ray-address auto "
        "--result-line"
    )
    assert submission["runtime_env"]["working_dir"] == str(ROOT / "jobs")
    assert submission["metadata"]["orchestrator_run"] == "cv-digits-cv"


@pytest.fixture(scope="module")
def finished_cv(tmp_path_factory, mlflow_server):
    """A real 3-fold cross-validation of the digits MLP, two epochs a fold, tracked in MLflow: (its storage, its --json result)."""
    storage = tmp_path_factory.mktemp("cv")
    args = ["cv", JOB, f"checkpoint.storage={storage}", *TINY, f"tracking.mlflow.tracking_uri={mlflow_server.uri}"]
    return storage, args, result_of(orchestrator(*args, "--json", env={"OMP_NUM_THREADS": "1"}))


@pytest.mark.slow  # on the module's whole cross-validation (3 folds on Ray, MLflow)
def test_the_cv_is_an_mlflow_run_with_its_aggregate_and_each_fold_a_child_run(finished_cv, mlflow_server):
    from mlflow.tracking import MlflowClient

    storage, _, out = finished_cv
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(out["tracking"]["mlflow"]["run_id"])
    assert parent.info.run_name == "cv-digits-cv" and parent.info.status == "FINISHED"
    for name, agg in out["metrics"].items():
        assert parent.data.metrics[f"cv_{name}_mean"] == pytest.approx(agg["mean"])
        assert parent.data.metrics[f"cv_{name}_std"] == pytest.approx(agg["std"])
        assert parent.data.metrics[f"cv_{name}_ci95_low"] == pytest.approx(agg["ci95"][0])
    assert parent.data.metrics["cv_test_accuracy_mean"] == pytest.approx(out["test"]["test_accuracy"]["mean"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"sweep.json", "cv.json"}
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == [f"cv-digits-cv-fold-{i}" for i in range(3)]
    for child in children:
        fold = int(child.data.params["data.fold"])
        record = json.loads((storage / "cv-digits-cv" / f"fold-{fold}" / "run.json").read_text())
        assert record["tracking"]["mlflow"]["run_id"] == child.info.run_id and child.info.status == "FINISHED"


@pytest.mark.slow  # on the module's whole cross-validation (3 folds on Ray, MLflow)
def test_every_fold_is_a_run_and_the_aggregate_is_that_of_the_fold_runs_own_records(finished_cv):
    storage, _, out = finished_cv
    cv_dir = storage / "cv-digits-cv"
    assert out["status"] == "finished" and out["folds_count"] == 3 and out["cv_uri"] == str(cv_dir)
    assert json.loads((cv_dir / "cv.json").read_text()) == out
    for i, fold in enumerate(out["folds"]):
        run_dir = cv_dir / f"fold-{i}"
        record = json.loads((run_dir / "run.json").read_text())
        assert (
            fold["fold"] == i and fold["run_uri"] == str(run_dir) and fold["status"] == record["status"] == "finished"
        )
        assert record["job"]["data"]["fold"] == i and record["job"]["data"]["folds"] == 3
        assert fold["steps"] == 34 and (run_dir / "checkpoint_00000034" / "manifest.json").exists()
        assert (run_dir / "test.json").exists()  # each fold's best checkpoint evaluated on the (same) test split
    for metric in ("val_loss", "val_accuracy", "val_f1"):
        pick = min if metric == "val_loss" else max
        best = []
        for i in range(3):
            vals = [(e[metric], e["step"]) for e in history(cv_dir / f"fold-{i}") if e["split"] == "val"]
            value = pick(v for v, _ in vals)
            best.append(value)
            assert out["folds"][i]["metrics"][metric] == {
                "best": value,
                "step": next(s for v, s in vals if v == value),
                "epoch": out["folds"][i]["metrics"][metric]["epoch"],
            }
        agg = out["metrics"][metric]
        assert agg["n"] == 3 and agg["values"] == best
        assert agg["mean"] == pytest.approx(np.mean(best)) and agg["std"] == pytest.approx(np.std(best, ddof=1))
        half = 4.3027 * np.std(best, ddof=1) / np.sqrt(3)
        assert agg["ci95"] == pytest.approx([np.mean(best) - half, np.mean(best) + half], rel=1e-4)
    tests = [json.loads((cv_dir / f"fold-{i}" / "test.json").read_text())["metrics"]["test_accuracy"] for i in range(3)]
    assert out["test"]["test_accuracy"]["mean"] == pytest.approx(np.mean(tests))
    assert out["metrics"]["val_accuracy"]["mean"] > 0.5  # the folds learned: ten classes, chance is 0.1


@pytest.mark.slow  # on the module's whole cross-validation (3 folds on Ray, MLflow)
def test_the_table_and_a_rerun_of_a_finished_cv(finished_cv):
    storage, args, out = finished_cv
    res = orchestrator(*args, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already finished" in res.stdout
    assert "fold 0" in res.stdout and "fold 2" in res.stdout and "95% CI" in res.stdout
    acc = out["metrics"]["val_accuracy"]
    row = next(line for line in res.stdout.splitlines() if "val_accuracy" in line)
    assert f"{acc['mean']:.4f}" in row and f"{acc['ci95'][0]:.4f}" in row
    assert f"{out['folds'][1]['metrics']['val_accuracy']['best']:.4f} @" in row
    for i in range(3):  # nothing trained again
        assert json.loads((storage / "cv-digits-cv" / f"fold-{i}" / "run.json").read_text())["attempts"] == 1
    changed = orchestrator(*args, "model.hidden=32", timeout=200)  # another job under the same name: refused
    assert changed.returncode == 2 and changed.stderr.strip() == (
        f"error: {storage}/cv-digits-cv: holds a finished cross-validation with other settings: model.hidden 16 -> 32; "
        "use --fresh for a new cross-validation, or another name"
    )

    from orchestrator.report import list_runs

    (listed,) = list_runs(str(storage))  # `orchestrator runs`: one row, the cv (its folds are inside it)
    assert listed["kind"] == "cv" and listed["status"] == "finished" and listed["steps"] == out["total_steps"]
    assert listed["best_metric"] == "mean val_loss" and listed["best_value"] == out["metrics"]["val_loss"]["mean"]


@pytest.mark.slow  # two starts of Ray and a fold trained part-way: about a minute on two cores
def test_a_killed_cv_trains_only_its_unfinished_folds_when_run_again(tmp_path):
    # Folds of several seconds (batches of 8), checkpointed within epochs; two at a time on this machine's CPUs.
    slow = [
        "data.folds=3",
        "model.hidden=64",
        "train.epochs=1",
        "train.batch_size=8",
        "train.log_every_n_steps=500",
        "checkpoint.every_n_steps=40",
        "checkpoint.every_n_epochs=null",
    ]
    args = ["cv", JOB, f"checkpoint.storage={tmp_path}", *slow, "--json"]
    # Its Ray and the fold trials inherit this marker: the test can tell when the last of them is gone.
    marker = f"cv-killed-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARKER: marker}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cv_dir = tmp_path / "cv-digits-cv"
    deadline = time.time() + 300

    def ready() -> bool:
        # One fold finished, another part-way with a checkpoint. Whatever Tune's own state then holds (a kill may
        # tear it mid-write), the fold runs' records are what the rerun goes by.
        records = {p.parent.name: json.loads(p.read_text()) for p in cv_dir.glob("fold-*/run.json")}
        finished = [f for f, r in records.items() if r["status"] == "finished"]
        started = [
            f
            for f, r in records.items()
            if r["status"] == "running" and list((cv_dir / f).glob("checkpoint_*/manifest.json"))
        ]
        return bool(finished and started)

    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the cross-validation did not get going"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # The fold trials are Ray's worker processes, not the driver's: they would outlive it for a moment and
    # could still commit a checkpoint or finish after the test has looked. Killed with it, as when the
    # machine goes away, what the rerun finds is what is on disk now.
    kill_marked(marker, passes=50)
    assert not pids_with_marker(marker), "the killed cross-validation's Ray processes are still there"
    before = {p.parent.name: json.loads(p.read_text()) for p in cv_dir.glob("fold-*/run.json")}
    # Which unfinished folds had a committed checkpoint when killed: only those have something to resume from
    # (on a busy machine the third fold may have started and not yet reached its first one).
    committed = {f for f in before if list((cv_dir / f).glob("checkpoint_*/manifest.json"))}
    lines_before = {f: len(history(cv_dir / f)) for f, r in before.items() if r["status"] == "finished"}
    assert not (cv_dir / "cv.json").exists()

    out = result_of(orchestrator(*args, env={"OMP_NUM_THREADS": "1"}))
    steps = 135  # 1078 training examples a fold in batches of 8
    assert out["status"] == "finished" and out["resumed"] and [f["steps"] for f in out["folds"]] == [steps] * 3
    for fold, earlier in before.items():
        record = json.loads((cv_dir / fold / "run.json").read_text())
        if earlier["status"] == "finished":
            assert record["attempts"] == 1 and len(history(cv_dir / fold)) == lines_before[fold], fold  # not again
        else:
            assert record["attempts"] == 2, fold
            if fold in committed:
                assert record["resumed_from"], fold  # continued from its checkpoint
            else:
                assert not record["resumed_from"], fold  # nothing committed yet: trained from the start
    assert all(f["metrics"]["val_accuracy"]["best"] > 0.5 for f in out["folds"])


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.mark.slow  # on the module's whole cross-validation (3 folds on Ray, MLflow)
def test_the_cv_report_opens_offline_in_chromium_with_its_curves_strips_and_table(finished_cv, browser, tmp_path):
    storage, _, out = finished_cv
    cv_dir = storage / "cv-digits-cv"
    assert out["report"] == str(cv_dir / "report.html") and (cv_dir / "report.html").exists()  # written at the end
    res = orchestrator("report", str(cv_dir), "--out", str(tmp_path / "cv.html"), "--json", timeout=120)
    report = Path(result_of(res)["report"])
    seen = open_in_browser(browser, report)
    assert seen["errors"] == [] and seen["external"] == [] and seen["dialogs"] == []
    figures = seen["figures"]
    assert all(f["natural"] > 0 and f["w"] > 0 and f["h"] > 0 for f in figures), figures
    alts = [f["alt"] for f in figures]
    for metric in ("val_loss", "val_accuracy", "val_f1"):  # the job's validation metrics
        assert any(a.startswith(f"{metric} of every fold by step") for a in alts), alts
        assert any(a.startswith(f"{metric} of each fold as a point") for a in alts), alts
    assert any(a.startswith("test_accuracy of each fold as a point") for a in alts), alts
    text = seen["text"]
    acc = out["metrics"]["val_accuracy"]
    assert "Cross-validation cv-digits-cv" in text and "95% CI" in text
    assert f"[{acc['ci95'][0]:.4f}, {acc['ci95'][1]:.4f}]" in text
    assert all(f"{cv_dir}/fold-{i}" in text for i in range(3))


@pytest.mark.slow  # on the module's whole cross-validation (3 folds on Ray, MLflow)
def test_refit_trains_on_all_non_test_data_for_the_mean_best_epoch_and_names_its_checkpoint(finished_cv):
    # Last in this module: it adds the refit to the finished cv's record.
    storage, args, out = finished_cv
    cv_dir = storage / "cv-digits-cv"
    refit = result_of(orchestrator(*args, "--refit", "--json", env={"OMP_NUM_THREADS": "1"}))["refit"]
    epochs = [f["metrics"]["val_loss"]["epoch"] for f in out["folds"]]
    assert refit["epochs"] == max(1, round(sum(epochs) / 3)) and refit["status"] == "finished"
    record = json.loads((cv_dir / "refit" / "run.json").read_text())
    job = record["job"]
    assert (
        job["data"]["folds"] is None and job["validation"]["split"] == 0.0 and job["train"]["epochs"] == refit["epochs"]
    )
    # Every non-test digit (1617) in batches of 64: 26 steps an epoch, no validation in between.
    assert refit["steps"] == 26 * refit["epochs"] and refit["run_uri"] == str(cv_dir / "refit")
    assert not [e for e in history(cv_dir / "refit") if e["split"] == "val"]
    test = json.loads((cv_dir / "refit" / "test.json").read_text())
    assert refit["checkpoint"] == test["checkpoint"] == str(cv_dir / "refit" / f"checkpoint_{refit['steps']:08d}")
    assert refit["test"]["test_accuracy"] == test["metrics"]["test_accuracy"] > 0.5
    assert json.loads((cv_dir / "cv.json").read_text())["refit"] == refit
    assert "Refit on all non-test data" in (cv_dir / "report.html").read_text()
