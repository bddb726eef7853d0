"""Reports and run listings from tiny real runs and a real sweep, opened in a real headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse
from xml.etree import ElementTree

import numpy as np
import pytest
from commands import run_command

from orchestrator.launch import run_job
from orchestrator.report import list_runs, load_run, write_report
from orchestrator.spec import build_spec, load_spec

# One xdist worker for the module: its tests share the runs and sweep they report on.
pytestmark = pytest.mark.xdist_group("report")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "jobs" / "digits_mlp.yaml")
# Debian's Chromium (make setup installs it); Playwright drives it, its own browser download is not used.
CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
)


def orchestrator(*args, cwd=ROOT, timeout=300):
    return run_command([sys.executable, "-m", "orchestrator", *args], cwd=cwd, timeout=timeout)


def summary_of(res) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# The tests of the module's real runs and sweep (`runs`, `sweep_uri`: a minute of setup on two cores) are marked slow.
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny real runs (classification, regression, language model) in one storage."""
    storage = tmp_path_factory.mktemp("runs")
    # Every validation after the first misses min_delta: early stopping ends the run at step 10 while the best is step 5
    # (both checkpoints kept, so the test split must see step 5's, not the latest).
    digits = load_spec(
        DIGITS,
        [
            "scaling.num_workers=0",
            f"checkpoint.storage={storage}",
            "train.max_steps=40",
            "validation.every_n_steps=5",
            "train.log_every_n_steps=1",
            "early_stopping.patience=1",
            "early_stopping.min_delta=0.5",
            "checkpoint.every_n_steps=5",
            "checkpoint.keep_last=2",
        ],
    )
    regression = build_spec(
        {"name": "synthetic-regression"},
        [
            "scaling.num_workers=0",
            f"checkpoint.storage={storage}",
            "data.name=synthetic",
            "data.task=regression",
            "data.samples=600",
            "train.max_steps=30",
            "validation.every_n_steps=10",
            "train.log_every_n_steps=5",
            "optim.lr=0.01",
        ],
    )
    lm = build_spec(
        {"name": "tiny-lm"},
        [
            "scaling.num_workers=0",
            f"checkpoint.storage={storage}",
            "data.name=synthetic",
            "data.task=lm",
            "data.samples=200",
            "data.vocab_size=32",
            "data.seq_len=16",
            "model.name=gpt",
            "model.hidden=32",
            "model.heads=2",
            "model.layers=1",
            "model.context=16",
            "train.max_steps=20",
            "validation.every_n_steps=5",
            "train.log_every_n_steps=5",
        ],
    )
    out = {
        "classification": run_job(digits, job_file=DIGITS, quiet=True),
        "regression": run_job(regression, quiet=True),
        "lm": run_job(lm, quiet=True),
    }
    return storage, out


@pytest.fixture(scope="module")
def sweep_uri(tmp_path_factory):
    """A real ASHA sweep of three short trials on a log-scaled learning rate."""
    storage = tmp_path_factory.mktemp("sweeps")
    res = orchestrator(
        "sweep",
        "jobs/sweep_digits_asha.yaml",
        f"checkpoint.storage={storage}",
        "scaling.num_workers=0",
        "sweep.num_samples=3",
        "train.epochs=3",
        "sweep.scheduler.grace_period=1",
        "checkpoint.every_n_epochs=1",
        "sweep.max_concurrent_trials=2",
        "--json",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return str(storage / "digits-asha")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_in_browser(browser, path: Path) -> dict:
    """Console errors, page errors, dialogs, requests (all, and those that left the file) and every figure's size, of a report opened offline."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors, requests, dialogs = [], [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(path.as_uri(), wait_until="load")
    figures = page.eval_on_selector_all(
        "figure.plot img",
        "els => els.map(e => ({alt: e.alt, natural: e.naturalWidth, w: e.getBoundingClientRect().width, h: e.getBoundingClientRect().height}))",
    )
    text = page.inner_text("body")
    links = page.eval_on_selector_all("a", "els => els.map(e => ({href: e.href, text: e.textContent}))")
    cells = page.eval_on_selector_all("td.num", "els => els.map(e => e.textContent)")
    page.close()
    return {
        "errors": errors,
        "external": [u for u in requests if not u.startswith(("file:", "data:"))],
        "figures": figures,
        "text": text,
        "dialogs": dialogs,
        "requests": requests,
        "links": links,
        "numbers": cells,
    }


EXPECTED = {
    "classification": [
        "Training and validation loss",
        "learning-rate schedule",
        "throughput",
        "val_accuracy at each validation",
        "val_f1",
        "val_roc_auc",
        "Confusion matrix",
        "ROC curves",
        "Precision-recall curves",
    ],
    "regression": [
        "Training and validation loss",
        "learning-rate schedule",
        "throughput",
        "val_r2",
        "val_mae",
        "Predictions of the best checkpoint against the true values",
        "Residuals",
    ],
    "lm": [
        "Training and validation loss",
        "learning-rate schedule",
        "throughput",
        "val_perplexity",
        "exp(training loss)",
    ],
    "sweep": [
        "val_accuracy against optim.lr on a log axis",
        "val_accuracy against model.hidden",
        "val_accuracy of every trial",
        "Parallel coordinates",
    ],
}


@pytest.mark.parametrize("kind", ["classification", "regression", "lm", "sweep"])
@pytest.mark.slow
def test_each_kind_of_report_opens_offline_in_chromium_with_every_figure_drawn(
    kind, runs, sweep_uri, browser, tmp_path
):
    if kind == "sweep":
        res = orchestrator("report", sweep_uri, "--json")
        report = Path(summary_of(res)["report"])
        assert report == Path(sweep_uri) / "report.html"
    else:
        report = Path(runs[1][kind].report)  # written by the run itself, at its end
    seen = open_in_browser(browser, report)
    assert seen["errors"] == [] and seen["external"] == [] and seen["dialogs"] == []
    assert seen["figures"] and all(f["natural"] > 0 and f["w"] > 0 and f["h"] > 0 for f in seen["figures"]), seen[
        "figures"
    ]
    alts = " | ".join(f["alt"] for f in seen["figures"])
    for expected in EXPECTED[kind]:
        assert expected in alts, f"{expected!r} not among the figures: {alts}"
    if kind != "sweep":
        assert "Provenance" in seen["text"] and "job_hash" in seen["text"] and "optim" in seen["text"]


@pytest.mark.slow
def test_classification_run_evaluates_its_best_checkpoint_on_the_test_split(runs):
    storage, out = runs
    summary = out["classification"]
    assert summary.stopped_early and summary.steps == 10 and summary.best.step == 5
    test = json.loads((storage / "digits-mlp" / "test.json").read_text())
    assert test["step"] == test["best_step"] == 5 and test["checkpoint"].endswith("checkpoint_00000005")
    assert summary.test.step == 5 and summary.test.uri == str(storage / "digits-mlp" / "test.json")
    assert test["examples"] == len(test["labels"]) == len(test["scores"]) == 180 and test["num_classes"] == 10
    assert all(abs(sum(row) - 1) < 1e-4 for row in test["scores"])
    cm = test["metrics"]["test_confusion_matrix"]
    assert sum(map(sum, cm)) == 180 and test["metrics"]["test_accuracy"] == pytest.approx(
        sum(cm[i][i] for i in range(10)) / 180
    )
    html = (storage / "digits-mlp" / "report.html").read_text()
    assert "early stop at step" in html and "best step" in html


@pytest.mark.slow
def test_regression_and_lm_test_records_hold_what_their_plots_need(runs):
    storage, _ = runs
    reg = json.loads((storage / "synthetic-regression" / "test.json").read_text())
    assert reg["task"] == "regression" and len(reg["predictions"]) == len(reg["targets"]) == reg["examples"] > 0
    assert {"test_mse", "test_mae", "test_r2"} <= set(reg["metrics"])
    lm = json.loads((storage / "tiny-lm" / "test.json").read_text())
    assert lm["task"] == "lm" and lm["metrics"]["test_perplexity"] == pytest.approx(
        2.718281828 ** lm["metrics"]["test_loss"]
    )
    assert "scores" not in lm and "predictions" not in lm


def test_best_checkpoint_gone_means_the_latest_is_evaluated(tmp_path):
    spec = load_spec(
        DIGITS,
        [
            "scaling.num_workers=0",
            f"checkpoint.storage={tmp_path}",
            "train.max_steps=40",
            "validation.every_n_steps=5",
            "early_stopping.patience=1",
            "early_stopping.min_delta=0.5",
            "checkpoint.every_n_steps=5",
            "checkpoint.keep_last=1",
            "checkpoint.keep_best=0",
        ],
    )
    out = run_job(spec, quiet=True)
    assert out.best.step == 5 and out.test.step == 10  # keep_best=0: the best was deleted by retention
    assert "the best one was not kept" in (tmp_path / "digits-mlp" / "report.html").read_text()


@pytest.mark.slow
def test_sweep_report_marks_the_trials_the_scheduler_stopped(sweep_uri):
    from orchestrator.report import load_sweep
    from orchestrator.report.sweep_page import _stopped_by_scheduler

    sweep = load_sweep(sweep_uri)
    assert len(sweep.trials) == 3 and all(t["run"] is not None for t in sweep.trials)
    assert sweep.metric == "val_accuracy" and sweep.mode == "max"
    steps = [t["run"].history[-1]["step"] for t in sweep.trials]
    stopped = [_stopped_by_scheduler(sweep, t, s, max(steps)) for t, s in zip(sweep.trials, steps, strict=False)]
    assert stopped == [s < max(steps) for s in steps]


@pytest.mark.slow
def test_report_to_a_local_file_and_run_listing_newest_first(runs, tmp_path):
    storage, out = runs
    target = tmp_path / "out" / "digits.html"
    res = orchestrator("report", str(storage / "digits-mlp"), "--out", str(target))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {target}" and target.read_text().startswith("<!DOCTYPE html>")
    listed = summary_of(orchestrator("runs", str(storage), "--json"))
    assert [r["name"] for r in listed] == ["tiny-lm", "synthetic-regression", "digits-mlp"]
    by_name = {r["name"]: r for r in listed}
    assert by_name["digits-mlp"]["status"] == "finished" and by_name["digits-mlp"]["steps"] == 10
    assert by_name["digits-mlp"]["best_metric"] == "val_accuracy" and by_name["digits-mlp"][
        "best_value"
    ] == pytest.approx(out["classification"].best.value)
    assert all(r["kind"] == "run" and r["wall_s"] > 0 for r in listed)
    table = orchestrator("runs", str(storage))
    assert table.returncode == 0 and table.stdout.index("tiny-lm") < table.stdout.index("digits-mlp")


@pytest.mark.slow
def test_runs_lists_sweeps_beside_runs(sweep_uri):
    listed = list_runs(str(Path(sweep_uri).parent))
    assert [(r["name"], r["kind"], r["status"]) for r in listed] == [("digits-asha", "sweep", "finished")]


@pytest.mark.parametrize("what", ["missing", "empty", "checkpoints-only"])
@pytest.mark.slow
def test_report_of_a_uri_without_a_run_is_one_line_exit_2_and_writes_nothing(what, runs, tmp_path):
    target = tmp_path / what
    if what != "missing":
        target.mkdir()
    if what == "checkpoints-only":
        shutil.copytree(next((runs[0] / "digits-mlp").glob("checkpoint_*")), target / "checkpoint_00000005")
    out = tmp_path / "report.html"
    for args in (["report", str(target), "--out", str(out)], ["report", str(target)]):
        res = orchestrator(*args)
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            f"error: {target}: holds no run or sweep (no run.json or sweep.json)"
        ]
    assert not out.exists() and not (target / "report.html").exists()
    res = orchestrator("runs", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such storage"


def test_run_on_s3_keeps_its_test_record_report_and_tensorboard_there(s3_server, bucket, tmp_path):
    spec = load_spec(
        DIGITS,
        [
            "scaling.num_workers=0",
            f"checkpoint.storage=s3://{bucket}/runs",
            "train.max_steps=10",
            "validation.every_n_steps=5",
            "train.log_every_n_steps=5",
            "tracking.tensorboard={}",
        ],
    )
    out = run_job(spec, quiet=True)
    run_uri = f"s3://{bucket}/runs/digits-mlp"
    assert out.report == f"{run_uri}/report.html" and out.test.uri == f"{run_uri}/test.json"
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="runs/digits-mlp/")["Contents"]}
    assert {
        "runs/digits-mlp/report.html",
        "runs/digits-mlp/test.json",
        "runs/digits-mlp/run.json",
        "runs/digits-mlp/metrics.jsonl",
    } <= keys
    assert any(k.startswith("runs/digits-mlp/tensorboard/events.out.tfevents.") for k in keys)
    run = load_run(run_uri)
    assert run.test["step"] == out.test.step and len(run.history) == 4
    local = write_report(run_uri, out=str(tmp_path / "r.html"))
    assert Path(local).read_text().count('<figure class="plot">') >= 8


# ----------------------------------------------------------------------------------------------
# Records written by hand: hostile strings in every field the report shows, and a large test split

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']


class TagCheck(HTMLParser):
    """Every start tag of a page and every attribute name, as a browser's parser sees them."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.srcs, self.hrefs = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]
        self.srcs += [value for name, value in attrs if name == "src"]
        self.hrefs += [value for name, value in attrs if name == "href"]


def assert_only_the_reports_own_markup(page: str) -> None:
    """No script, no event handler, no image but the report's SVG figures, in the page or in any of its SVGs."""
    check = TagCheck()
    check.feed(page)
    assert "script" not in check.tags and not [a for a in check.attrs if a.startswith("on")], (
        set(check.tags),
        set(check.attrs),
    )
    assert set(check.tags) <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "header",
        "h1",
        "h2",
        "h3",
        "div",
        "main",
        "p",
        "b",
        "span",
        "code",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "figure",
        "img",
        "figcaption",
        "a",
    }, set(check.tags)
    # Links only to files beside the page (a path, never a scheme a name could smuggle in) or to a run's URI.
    assert all(href.startswith(("./", "file:///", "s3://")) for href in check.hrefs), check.hrefs
    assert check.srcs and all(src.startswith("data:image/svg+xml;base64,") for src in check.srcs)
    for src in check.srcs:
        svg = ElementTree.fromstring(base64.b64decode(src.split(",", 1)[1]))  # well-formed, or this raises
        tags = {e.tag.rsplit("}", 1)[-1] for e in svg.iter()}
        assert tags <= {
            "svg",
            "rect",
            "path",
            "polyline",
            "polygon",
            "circle",
            "text",
            "g",
            "clipPath",
            "linearGradient",
            "stop",
        }, tags
        assert not [a for e in svg.iter() for a in e.attrib if a.lower().startswith("on")]


def write_records(folder: Path, records: dict[str, object]) -> Path:
    """A run or sweep written by hand: each value a JSON file (metrics.jsonl: a list of lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in records.items():
        text = "".join(json.dumps(v) + "\n" for v in value) if name.endswith(".jsonl") else json.dumps(value)
        (folder / name).write_text(text)
    return folder


def history(steps: int, extra_val: dict[str, float] | None = None) -> list[dict]:
    lines = [
        {"step": s, "epoch": 0, "split": "train", "loss": 2.0 / s, "lr": 0.01, "samples_per_s": 1000.0 + s}
        for s in range(1, steps + 1)
    ]
    lines += [
        {"step": s, "epoch": 0, "split": "val", "val_loss": 1.0 / s, "val_accuracy": 0.5 + s / 100, **(extra_val or {})}
        for s in range(5, steps + 1, 5)
    ]
    return lines


def test_runs_lists_a_sweeps_best_as_the_sweep_says_it_and_a_cvs_as_its_mean(tmp_path):
    """Seen: the sweep said best 0.9630 (its best trial's best value), `runs` listed 0.9588 (that trial's last)."""
    from orchestrator.sweep import format_result

    best = {"trial_id": "a_00000", "config": {"optim.lr": 0.003}, "metric": 0.9588, "best_metric": 0.9630}
    trial = {**best, "status": "done", "steps": 10, "epochs": 1}
    result = {"status": "finished", "sweep": "digits-lr", "metric": "val_accuracy", "mode": "max", "trials": [trial]}
    result.update(best=best, total_steps=10, wall_s=1.0, best_job_file="best.yaml")
    started = "2026-12-06T11:00:00+00:00"
    write_records(tmp_path / "digits-lr", {"sweep.json": {"status": "finished", "started": started, "result": result}})
    # A sweep.json from before best_metric: its best trial's metric is all there is.
    old = {**result, "best": {k: v for k, v in best.items() if k != "best_metric"}}
    write_records(tmp_path / "old-lr", {"sweep.json": {"status": "finished", "started": started, "result": old}})
    # A cross-validation also has a sweep.json, whose best is one fold's: its row is cv.json's mean of the folds' bests.
    cv = {"status": "finished", "metric": "val_accuracy", "metrics": {"val_accuracy": {"mean": 0.9512, "std": 0.01}}}
    cv_sweep = {"status": "finished", "started": started, "result": {**result, "metric": "val_accuracy"}}
    write_records(tmp_path / "digits-cv", {"cv.json": cv, "sweep.json": cv_sweep})

    listed = {r["name"]: (r["kind"], r["best_metric"], r["best_value"]) for r in list_runs(str(tmp_path))}
    assert listed == {
        "digits-lr": ("sweep", "val_accuracy", 0.9630),
        "old-lr": ("sweep", "val_accuracy", 0.9588),
        "digits-cv": ("cv", "mean val_accuracy", 0.9512),
    }
    _, text = format_result(result)
    assert f"best val_accuracy {listed['digits-lr'][2]:.4f}: a_00000" in text


def test_hostile_strings_in_a_run_record_are_shown_as_text(tmp_path, browser):
    bad = " ".join(HOSTILE)
    run = tmp_path / HOSTILE[1]  # the run's own URI is shown too
    labels = [0, 1, 2] * 10
    scores = [[0.8 if c == label else 0.1 for c in range(3)] for label in labels]
    write_records(
        run,
        {
            "run.json": {
                "run": bad,
                "status": HOSTILE[0],
                "started": HOSTILE[1],
                "ended": None,
                "command": ["orchestrator", "run", *HOSTILE],
                "job": {
                    "name": bad,
                    "data": {"name": HOSTILE[0], "task": "classification"},
                    "optim": {"name": HOSTILE[1]},
                    HOSTILE[0]: {HOSTILE[1]: 1},
                },
                "provenance": {"job_hash": HOSTILE[1], "git": {"branch": HOSTILE[0]}},
                "tracking": {"mlflow": HOSTILE[1]},
                "summary": {
                    "steps": 20,
                    "error": bad,
                    "best": {"metric": f"val_{HOSTILE[1]}", "value": 0.7, "step": 10},
                },
            },
            "metrics.jsonl": history(20, {f"val_{HOSTILE[0]}": 0.5}),
            "test.json": {
                "task": "classification",
                "step": 10,
                "best_step": 10,
                "checkpoint": HOSTILE[1],
                "examples": 30,
                "labels": labels,
                "scores": scores,
                "metrics": {
                    "test_accuracy": 1.0,
                    f"test_{HOSTILE[0]}": 0.5,
                    "test_confusion_matrix": [[10, 0, 0], [0, 10, 0], [0, 0, 10]],
                },
            },
        },
    )
    report = Path(write_report(str(run)))
    page = report.read_text()
    assert_only_the_reports_own_markup(page)
    assert 'class="status status-idle"' in page  # an unknown status: escaped, in the neutral colour
    seen = open_in_browser(browser, report)
    assert (
        seen["errors"] == []
        and seen["dialogs"] == []
        and set(seen["requests"]) <= {report.as_uri()} | {u for u in seen["requests"] if u.startswith("data:")}
    )
    for hostile in HOSTILE:
        assert seen["text"].count(hostile) >= 5  # shown as the text it is: name, status, command, error, settings...
    assert len(seen["figures"]) == 8 and all(f["natural"] > 0 and f["h"] > 0 for f in seen["figures"])
    assert any(f"val_{HOSTILE[0]} at each validation" in f["alt"] for f in seen["figures"])


def test_hostile_choice_values_and_trial_ids_in_a_sweep_are_shown_as_text(tmp_path, browser):
    sweep = tmp_path / "sweep"
    trials = [
        (HOSTILE[1], HOSTILE[0], 0.01, 0.9, "done"),
        ("t2", HOSTILE[1], 0.001, 0.8, HOSTILE[0]),
        ("t3", "relu", 0.0001, 0.7, "stopped"),
        ("javascript:alert(1)", "tanh", 0.003, 0.6, "running"),
    ]
    rows = []
    for trial_id, act, lr, best, status in trials:
        write_records(
            sweep / trial_id,
            {
                "run.json": {"run": trial_id, "status": "finished", "config": {"model.act": act, "optim.lr": lr}},
                "metrics.jsonl": history(10 if status != "stopped" else 5),
                "report.html": "",  # each trial's own report, which the table links to
            },
        )
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "config": {"model.act": act, "optim.lr": lr},
                "metric": best,
                "best_metric": best,
                "steps": 10,
            }
        )
    write_records(
        sweep,
        {
            "sweep.json": {
                "sweep": HOSTILE[0],
                "status": "finished",
                "started": HOSTILE[1],
                "job": {"name": HOSTILE[0]},
                "spec": {
                    "metric": "val_accuracy",
                    "mode": "max",
                    "scheduler": {"name": "asha"},
                    "parameters": {
                        "model.act": {"type": "choice", "values": [HOSTILE[0], HOSTILE[1], "relu"]},
                        "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 0.1},
                    },
                },
                "result": {"metric": "val_accuracy", "mode": "max", "trials": rows, "wall_s": 1.0},
            }
        },
    )
    report = Path(write_report(str(sweep)))
    page = report.read_text()
    assert_only_the_reports_own_markup(page)
    assert page.count('class="status status-ok">done<') == 1 and page.count('class="status status-warn">stopped<') == 1
    assert (
        f'class="status status-idle">{html.escape(HOSTILE[0])}<' in page
    )  # a status outside the known set: escaped, no colour
    seen = open_in_browser(browser, report)
    assert (
        seen["errors"] == []
        and seen["dialogs"] == []
        and set(seen["requests"]) <= {report.as_uri()} | {u for u in seen["requests"] if u.startswith("data:")}
    )
    assert all(h in seen["text"] for h in HOSTILE)
    assert len(seen["figures"]) == 4 and all(f["natural"] > 0 and f["h"] > 0 for f in seen["figures"])
    # Each trial's name links to its own report, a path under the sweep whatever the name holds.
    linked = {a["text"]: a["href"] for a in seen["links"]}
    for trial_id, *_ in trials:
        assert Path(unquote(urlparse(linked[trial_id]).path)) == sweep / trial_id / "report.html", linked


def test_report_imports_neither_matplotlib_nor_scikit_learn(tmp_path):
    """Both cost seconds to import at the end of every run and sweep trial; the figures need neither."""
    labels = list(range(4)) * 25
    run = write_records(
        tmp_path / "run",
        {
            "run.json": {
                "run": "r",
                "status": "finished",
                "job": {"data": {"task": "classification"}},
                "summary": {"steps": 20},
            },
            "metrics.jsonl": history(20),
            "test.json": {
                "task": "classification",
                "step": 20,
                "best_step": 20,
                "labels": labels,
                "scores": [[0.25] * 4] * 100,
                "metrics": {"test_confusion_matrix": [[25, 0, 0, 0]] * 4},
            },
        },
    )
    code = (
        "import sys; from orchestrator.report import write_report; write_report(sys.argv[1]); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'sklearn', 'scipy'}))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]"
    assert (run / "report.html").read_text().count('<figure class="plot">') == 7


def test_a_large_test_split_keeps_the_report_small(tmp_path):
    """20,000 examples of 50 classes (what a test record keeps at most) and 20,000 regression examples: figures stay light."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 50, 20_000)
    scores = rng.dirichlet(np.ones(50), 20_000).round(4)
    cm = np.zeros((50, 50), dtype=int)
    np.add.at(cm, (labels, scores.argmax(axis=1)), 1)
    write_records(
        tmp_path / "cls",
        {
            "run.json": {"run": "cls", "status": "finished", "summary": {"steps": 2000}},
            "metrics.jsonl": history(2000),
            "test.json": {
                "task": "classification",
                "step": 2000,
                "best_step": 2000,
                "labels": labels.tolist(),
                "scores": scores.tolist(),
                "metrics": {"test_confusion_matrix": cm.tolist()},
            },
        },
    )
    true = rng.normal(size=20_000)
    write_records(
        tmp_path / "reg",
        {
            "run.json": {"run": "reg", "status": "finished", "summary": {"steps": 10}},
            "metrics.jsonl": history(10),
            "test.json": {
                "task": "regression",
                "step": 10,
                "best_step": 10,
                "targets": true.tolist(),
                "predictions": (true + rng.normal(size=20_000)).tolist(),
                "metrics": {"test_mse": 1.0},
            },
        },
    )
    for name in ("cls", "reg"):
        page = Path(write_report(str(tmp_path / name))).read_text()
        assert_only_the_reports_own_markup(page)
        assert len(page) < 1_500_000, (name, len(page))
    assert (
        "micro-average (AUC"
        in base64.b64decode(
            re.search(
                r'alt="ROC[^"]*" src="data:image/svg\+xml;base64,([^"]+)"',
                (tmp_path / "cls" / "report.html").read_text(),
            ).group(1)
        ).decode()
    )


def test_degenerate_records_still_make_a_report_with_well_formed_figures(tmp_path):
    """One point, constant series, NaN and inf, one class, constant regression, a sweep of mixed-type choices: no crash."""
    flat = [
        {"step": 1, "split": "train", "loss": 0.5, "lr": 0.0, "samples_per_s": float("nan")},
        {"step": 1, "split": "val", "val_loss": float("inf"), "val_accuracy": 1.0, "val_perplexity": 0.0},
    ]
    cases = {
        "empty": {"run.json": {"run": "empty", "status": "running"}, "metrics.jsonl": []},
        "flat": {
            "run.json": {"run": "flat", "status": "finished", "summary": {"steps": 1, "stopped_early": True}},
            "metrics.jsonl": flat,
            "test.json": {
                "task": "classification",
                "step": 1,
                "labels": [2, 2],
                "scores": [[0, 0, 1], [0, 0, 1]],
                "metrics": {"test_confusion_matrix": [[0, 0, 0], [0, 0, 0], [0, 0, 2]]},
            },
        },
        "constant": {
            "run.json": {"run": "constant", "status": "failed"},
            "metrics.jsonl": history(3),
            "test.json": {"task": "regression", "step": 3, "targets": [1.0] * 5, "predictions": [1.0] * 5},
        },
    }
    for name, records in cases.items():
        page = Path(write_report(str(write_records(tmp_path / name, records)))).read_text()
        assert_only_the_reports_own_markup(page) if name != "empty" else None
    assert "No metrics were recorded" in (tmp_path / "empty" / "report.html").read_text()
    choices = ["relu", None, [1, 2], 3, "a much longer choice value than fits"]
    rows = [
        {
            "trial_id": f"t{i:02d}",
            "status": "done",
            "config": {"act": choices[i % 5], "lr": 10.0 ** -(i % 4), "flat": 1},
            "metric": i / 10,
            "best_metric": i / 10 if i != 3 else None,
            "steps": 5,
        }
        for i in range(15)
    ]
    for row in rows[:13]:
        write_records(
            tmp_path / "sweep" / row["trial_id"],
            {"run.json": {"run": row["trial_id"], "status": "finished"}, "metrics.jsonl": history(5)},
        )
    write_records(
        tmp_path / "sweep",
        {
            "sweep.json": {
                "sweep": "s",
                "status": "failed",
                "spec": {"metric": "val_loss", "mode": "min"},
                "result": {"trials": rows},
            }
        },
    )
    page = Path(write_report(str(tmp_path / "sweep"))).read_text()
    assert_only_the_reports_own_markup(page)
    assert page.count('<figure class="plot">') == 5


# ----------------------------------------------------------------------------------------------
# Pages people can read: times, captions, trial names and colours, legends, numbers, links, settings


def figure_svg(page: str, alt_part: str) -> ElementTree.Element:
    """The SVG of the page's figure whose caption holds `alt_part`."""
    found = re.search(
        r'alt="([^"]*)" src="data:image/svg\+xml;base64,([^"]+)"', page[page.index(html.escape(alt_part)) - 400 :]
    )
    assert found and alt_part in html.unescape(found.group(1)), alt_part
    return ElementTree.fromstring(base64.b64decode(found.group(2)))


def svg_texts(svg: ElementTree.Element) -> list[str]:
    return ["".join(e.itertext()) for e in svg.iter() if e.tag.endswith("text")]


def run_record(job: dict, **summary) -> dict:
    """run.json of a finished run of `job` (a resolved job), started and ended at known times."""
    return {
        "run": "readable",
        "status": "finished",
        "started": "2026-12-06T11:00:11.142926+00:00",
        "ended": "2026-12-06T11:00:45.067477+00:00",
        "command": ["orchestrator", "run", "job.yaml"],
        "job": job,
        "summary": {"steps": 20, "best": {"metric": "val_accuracy", "value": 0.7, "step": 20}, **summary},
    }


def test_run_page_times_captions_links_and_settings_read_as_people_read_them(tmp_path, browser):
    mlp = build_spec({"name": "readable", "model": {"name": "mlp"}, "data": {"name": "digits"}}).to_dict()
    run = write_records(
        tmp_path / "runs" / "readable",
        {"run.json": run_record(mlp), "metrics.jsonl": history(20), "run.log": ["a line"]},
    )
    report = Path(write_report(str(run)))
    page = report.read_text()
    assert_only_the_reports_own_markup(page)
    seen = open_in_browser(browser, report)
    assert seen["errors"] == [] and seen["external"] == []
    # Times to the second, in words: no ISO 'T', no microseconds; how long it took.
    assert re.search(
        r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ · ended \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ \(34 s\)", seen["text"]
    )
    assert "T11:00" not in seen["text"] and ".142926" not in seen["text"] and "067477" not in seen["text"]
    # No early stop: no caption speaks of one.
    alts = [f["alt"] for f in seen["figures"]]
    assert not [a for a in alts if "early stop" in a], alts
    assert "val_accuracy at each validation, with the best checkpoint marked." in alts
    # The run's own files, linked beside the page.
    linked = {a["text"]: Path(unquote(urlparse(a["href"]).path)) for a in seen["links"]}
    assert linked == {name: run / name for name in ("run.json", "metrics.jsonl", "run.log")}
    # An MLP on digits with AdamW and a constant schedule: what does not apply to it is not listed.
    settings = seen["text"][seen["text"].index("Settings") : seen["text"].index("Provenance")]
    for absent in (
        "vocab_size",
        "heads",
        "context",
        "num_classes",
        "samples",
        "momentum",
        "alpha",
        "step_size",
        "gamma",
    ):
        assert f"{absent}\t" not in settings and f"\n{absent}" not in settings, absent
    for present in ("hidden", "layers", "lr", "betas", "epochs", "storage"):
        assert present in settings, present

    # Early stopping: now the captions say so. A report written elsewhere links the files by their URIs.
    stopped = write_records(
        tmp_path / "stopped", {"run.json": run_record(mlp, stopped_early=True), "metrics.jsonl": history(20)}
    )
    out = tmp_path / "elsewhere" / "stopped.html"
    write_report(str(stopped), out=str(out))
    seen = open_in_browser(browser, out)
    assert "val_accuracy at each validation, with the best checkpoint and the early stop marked." in [
        f["alt"] for f in seen["figures"]
    ]
    assert {a["href"] for a in seen["links"]} == {(stopped / n).as_uri() for n in ("run.json", "metrics.jsonl")}


def test_settings_list_what_the_model_the_data_and_the_loop_use():
    from orchestrator.report.settings import applied_settings

    gpt = build_spec(
        {"name": "lm", "model": {"name": "gpt"}, "data": {"name": "synthetic", "task": "lm"}, "optim": {"name": "sgd"}}
    ).to_dict()
    shown = applied_settings(gpt)
    assert {"heads", "context", "hidden"} <= set(shown["model"]) and "options" not in shown["model"]
    assert {"vocab_size", "seq_len", "samples"} <= set(shown["data"]) and "num_classes" not in shown["data"]
    assert set(shown["optim"]) == {"name", "lr", "weight_decay", "momentum", "nesterov"}
    own = build_spec({"name": "byo", "entrypoint": "loop:train", "config": {"lr": 0.1}}).to_dict()
    shown = applied_settings(own)
    assert set(shown) == {"name", "entrypoint", "config", "scaling", "checkpoint", "failure"}, shown
    assert set(shown["checkpoint"]) == {"storage"}
    folds = build_spec({"name": "cv", "data": {"name": "digits", "folds": 5}}).to_dict()
    shown = applied_settings(folds)
    assert {"folds", "fold"} <= set(shown["data"]) and "split" not in shown.get("validation", {})
    assert "fold" not in applied_settings(mlp_job())["data"]
    assert "fsdp" not in applied_settings(mlp_job())["scaling"]  # ddp, the default: FSDP's options did nothing
    sharded = build_spec({"name": "s", "scaling": {"strategy": "fsdp", "num_workers": 2}}).to_dict()
    assert applied_settings(sharded)["scaling"]["fsdp"]["reshard_after_forward"] is True


def mlp_job() -> dict:
    return build_spec({"name": "m", "model": {"name": "mlp"}, "data": {"name": "digits"}}).to_dict()


def sweep_records(folder: Path, scheduler: str, trials: list[tuple[str, dict, float, str, int]]) -> Path:
    """A sweep written by hand: (trial id, config, its best accuracy, status, steps) each, the metric val_accuracy."""
    rows = []
    for trial_id, config, best, status, steps in trials:
        lines = [{"step": s, "split": "val", "val_accuracy": best * s / steps} for s in range(5, steps + 1, 5)]
        write_records(folder / trial_id, {"run.json": {"run": trial_id, "status": "finished"}, "metrics.jsonl": lines})
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "config": config,
                "metric": best,
                "best_metric": best,
                "steps": steps,
            }
        )
    spec = {"metric": "val_accuracy", "mode": "max", "scheduler": {"name": scheduler}, "parameters": {}}
    write_records(
        folder,
        {
            "sweep.json": {
                "sweep": folder.name,
                "status": "finished",
                "started": "2026-12-06T11:02:55.857634+00:00",
                "ended": "2026-12-06T11:03:23.100000+00:00",
                "spec": spec,
                "result": {"metric": "val_accuracy", "mode": "max", "trials": rows},
            }
        },
    )
    return folder


def test_sweep_page_names_trials_by_their_settings_in_colours_apart(tmp_path, browser):
    trials = [
        (
            f"60afa_{i:05d}",
            {"optim.lr": 10.0 ** -(1 + i % 4), "model.act": ["relu", "tanh"][i % 2]},
            0.5 + i / 40,
            "done",
            20,
        )
        for i in range(9)
    ]
    sweep = sweep_records(tmp_path / "asha", "asha", trials[:8] + [("60afa_00008", trials[8][1], 0.4, "stopped", 10)])
    report = Path(write_report(str(sweep)))
    page = report.read_text()
    seen = open_in_browser(browser, report)
    assert (
        seen["errors"] == []
        and "T11:02" not in seen["text"]
        and re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", seen["text"])
    )
    svg = figure_svg(page, "val_accuracy of every trial")
    texts = svg_texts(svg)
    assert not [t for t in texts if "60afa" in t], texts  # no Tune ids, the settings instead
    best = max(trials[:8], key=lambda t: t[2])
    assert f"1. lr={best[1]['optim.lr']:g} act={best[1]['model.act']}" in texts, texts
    assert "3 other trials" in texts and "stopped by the scheduler" in texts
    colours = [e.get("stroke") for e in svg.iter() if e.tag.endswith("polyline")]
    named = [c for c in colours if c != "#b8b8b8"]
    assert len(named) == len(set(named)) == 6 and colours.count("#b8b8b8") == 3, colours
    assert "an X marks where the scheduler stopped a trial" in " ".join(f["alt"] for f in seen["figures"])
    assert {a["text"] for a in seen["links"]} == {"sweep.json"}

    # FIFO stops no trial: neither an X nor a word of stopped trials, even for one that ended short.
    fifo = sweep_records(tmp_path / "fifo", "fifo", [trials[0], ("60afa_00009", trials[1][1], 0.4, "stopped", 5)])
    page = Path(write_report(str(fifo))).read_text()
    assert "stopped by the scheduler" not in svg_texts(figure_svg(page, "val_accuracy of every trial"))
    assert "an X marks" not in page


def cv_records(folder: Path) -> Path:
    """A 3-fold cross-validation written by hand, its numbers of different magnitudes."""
    folds = []
    for i, (acc, loss) in enumerate([(0.05049, 0.0212), (0.0612, 0.0198), (0.0577, 0.02301)]):
        write_records(
            folder / f"fold-{i}",
            {
                "run.json": {"run": f"fold-{i}", "status": "finished"},
                "metrics.jsonl": [{"step": 10, "split": "val", "val_accuracy": acc, "val_loss": loss}],
                "report.html": "",
            },
        )
        folds.append(
            {
                "fold": i,
                "run_uri": str(folder / f"fold-{i}"),
                "status": "finished",
                "steps": 10,
                "metrics": {"val_accuracy": {"best": acc, "step": 10}, "val_loss": {"best": loss, "step": 10}},
                "test": {},
            }
        )
    metrics = {
        "val_accuracy": {"mean": 0.05646, "std": 0.005383, "ci95": [0.04309, 0.06983]},
        "val_loss": {"mean": 0.0212, "std": 0.00162, "ci95": [0.0172, 0.0252]},
    }
    return write_records(
        folder,
        {
            "cv.json": {
                "cv": folder.name,
                "status": "finished",
                "folds_count": 3,
                "metric": "val_loss",
                "folds": folds,
                "metrics": metrics,
                "test": {},
            }
        },
    )


def test_cv_page_strip_plots_have_a_legend_and_every_number_four_significant_digits(tmp_path, browser):
    cv = cv_records(tmp_path / "digits-cv")
    report = Path(write_report(str(cv)))
    page = report.read_text()
    assert_only_the_reports_own_markup(page)
    seen = open_in_browser(browser, report)
    assert seen["errors"] == []
    for metric in ("val_accuracy", "val_loss"):
        texts = svg_texts(figure_svg(page, f"{metric} of each fold as a point"))
        assert {"fold 0", "fold 1", "fold 2", "mean, 95% CI"} <= set(texts), texts
    # 0.0212 beside 0.05049: both with four significant digits.
    assert (
        "0.05049 @ step 10" in seen["text"]
        and "0.02120 @ step 10" in seen["text"]
        and "[0.01720, 0.02520]" in seen["text"]
    )
    assert seen["numbers"] and all(re.fullmatch(r"\d+|0\.0*[1-9]\d{3}|[1-9][\d.]{4}", n) for n in seen["numbers"]), (
        seen["numbers"]
    )
    linked = {a["text"]: Path(unquote(urlparse(a["href"]).path)) for a in seen["links"]}
    assert linked["cv.json"] == cv / "cv.json" and linked[str(cv / "fold-1")] == cv / "fold-1" / "report.html"


def test_numbers_have_four_significant_digits_whatever_their_size():
    from orchestrator.report.html import num

    assert [num(v) for v in (0.05049, 0.0212, 1.0679, 33.0, 1234.56, 9.99996, 123456.7, 3.2e-6, 2.5e7, 0.0, 7)] == [
        "0.05049",
        "0.02120",
        "1.068",
        "33.00",
        "1235",
        "10.00",
        "123500",
        "3.200e-06",
        "2.500e+07",
        "0",
        "7",
    ]


def test_durations_are_rounded_to_the_second_and_written_one_way_on_every_page():
    """Seen: a 6.435 s run's page said "(5 s)": its stamps were cut to the second, and not its wall time."""
    from orchestrator.report.html import duration, took

    seconds = (6.435, 6.5, 59.6, 65.2, 3569.6, 3599.6, 3600 + 2 * 60 + 29, 3600 + 2 * 60 + 31, 0.4, float("nan"), None)
    assert [duration(s) for s in seconds] == [
        "6 s",
        "7 s",
        "1 min 00 s",
        "1 min 05 s",
        "59 min 30 s",
        "1 h 00 min",
        "1 h 02 min",
        "1 h 03 min",
        "0 s",
        None,
        None,
    ]
    stamps = {"started": "2026-12-06T11:00:11.142926+00:00", "ended": "2026-12-06T11:00:17.067477+00:00"}
    # The wall time the command printed and the facts show, when recorded; else the stamps' difference, rounded.
    assert (took(stamps, 6.435), took(stamps, None), took({"ended": stamps["ended"]}, None)) == ("6 s", "6 s", None)


def test_a_run_pages_header_and_facts_say_the_wall_time_the_command_printed(tmp_path):
    """run.json's stamps are 5.9 s apart, its wall time (what `run` printed: wall 6.4s) 6.435 s: the page says 6 s twice."""
    record = {**run_record({"name": "readable"}, wall_s=6.435), "ended": "2026-12-06T11:00:17.067477+00:00"}
    page = Path(write_report(str(write_records(tmp_path / "readable", {"run.json": record})))).read_text()
    assert re.search(r"ended [^<]* \(6 s\)", page) and "<b>6 s</b><span>wall</span>" in page
    assert "6.435" not in page and "(5 s)" not in page
