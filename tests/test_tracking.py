"""Run records and trackers against the real things: an `mlflow server` (SQLite backend) read back with
MLflow's client, TensorBoard event files read back with TensorBoard's event reader, real git checkouts."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from commands import run_command
from mlflow.tracking import MlflowClient
from ports import free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from orchestrator import tracking
from orchestrator.checkpoint import CheckpointManifest, list_checkpoints
from orchestrator.errors import BadInput
from orchestrator.launch import run_job
from orchestrator.loop import LoopContext, run_training
from orchestrator.provenance import collect_provenance, git_state, job_hash
from orchestrator.spec import build_spec, load_spec
from orchestrator.storage import open_storage, redact

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "jobs" / "digits_mlp.yaml")
BRIEF = ["train.max_steps=30", "validation.every_n_steps=10", "train.log_every_n_steps=5"]


def orchestrator(*args, cwd=ROOT, env=None, timeout=300):
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return run_command([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=full_env, timeout=timeout)


def summary_of(res) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def history_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# MLflow and TensorBoard from a real run


@pytest.mark.xdist_group("mlflow")  # the MLflow server starts once, in the worker that runs every test of it
def test_run_feeds_mlflow_and_tensorboard_and_records_its_provenance(mlflow_server, tmp_path):
    # Local mode: the loop runs in this process (the driver executor), with the tracker rank 0 opens anywhere.
    out = summary_of(
        orchestrator(
            "run",
            DIGITS,
            "scaling.num_workers=0",
            f"checkpoint.storage={tmp_path}",
            *BRIEF,
            f"tracking.mlflow.tracking_uri={mlflow_server.uri}",
            "tracking.tensorboard={}",
            "--json",
        )
    )
    run_dir = tmp_path / "digits-mlp"
    record = json.loads((run_dir / "run.json").read_text())
    history = history_of(run_dir)
    assert out["report"] == str(run_dir / "report.html") and (run_dir / "report.html").stat().st_size > 10_000
    assert out["test"]["uri"] == str(run_dir / "test.json")

    # The run record: provenance and placement as the worker reported it.
    prov = record["provenance"]
    commit = prov["git"]["commit"]
    # Others may commit while the run goes: the recorded commit is HEAD or one of its ancestors.
    assert subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit, "HEAD"]).returncode == 0
    assert prov["git"]["root"] == str(ROOT) and isinstance(prov["git"]["dirty"], bool)
    assert prov["world_size"] == 1 and prov["hosts"] == 1 and prov["seed"] == 0
    assert prov["job_hash"] == job_hash(record["job"])
    assert prov["data"]["source"] == "digits" and prov["data"]["package"] == "scikit-learn" and prov["data"]["version"]
    fs, root = open_storage(str(run_dir))
    for info in list_checkpoints(fs, root):
        manifest = CheckpointManifest.from_json((Path(info.path) / "manifest.json").read_bytes())
        assert (Path(info.path) / manifest.run_record).resolve() == run_dir / "run.json"

    # MLflow, read back with its own client.
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(record["tracking"]["mlflow"]["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "digits-mlp"
    assert run.info.status == "FINISHED"
    assert (
        run.data.params["optim.lr"] == "0.003"
        and run.data.params["train.max_steps"] == "30"
        and run.data.params["model.name"] == "mlp"
    )
    assert (
        run.data.tags["orchestrator.job_hash"] == prov["job_hash"]
        and run.data.tags["orchestrator.torch"] == prov["torch"]
    )
    assert run.data.tags["mlflow.source.git.commit"] == commit
    val = [(e["step"], e["val_loss"]) for e in history if e["split"] == "val"]
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert [s for s, _ in logged] == [s for s, _ in val] == [10, 20, 30]
    assert [v for _, v in logged] == pytest.approx([v for _, v in val])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [5, 10, 15, 20, 25, 30]
    assert {"lr", "samples_per_s", "val_accuracy"} <= set(run.data.metrics)
    assert run.data.metrics["test_accuracy"] == pytest.approx(out["test"]["metrics"]["test_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "run.json", "model"} <= artifacts
    weights = client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path))
    assert Path(weights).read_bytes() == (Path(out["checkpoint"]) / "model.safetensors").read_bytes()

    # TensorBoard, read back with its own event reader.
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("val_loss")] == [(s, pytest.approx(v)) for s, v in val]
    assert [s.step for s in events.Scalars("train_loss")] == [5, 10, 15, 20, 25, 30]
    hparams = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert (
        start.hparams["optim.lr"].number_value == pytest.approx(0.003)
        and start.hparams["model.name"].string_value == "mlp"
    )
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert "test_accuracy" in {m.name.tag for m in experiment.metric_infos}
    assert events.Scalars("test_accuracy")[0].value == pytest.approx(out["test"]["metrics"]["test_accuracy"])


@pytest.mark.slow  # a run, then its resumption, each with MLflow
def test_sqlite_uri_on_the_command_line_turns_mlflow_on_and_a_resumed_run_continues_its_mlflow_run(tmp_path):
    storage = tmp_path / "runs"
    args = [
        "run",
        DIGITS,
        "scaling.num_workers=0",
        f"checkpoint.storage={storage}",
        "validation.every_n_steps=10",
        "train.log_every_n_steps=5",
        "tracking.mlflow.tracking_uri=sqlite:///m.db",
        "tracking.mlflow.experiment=digits-exp",
        "--json",
    ]
    summary_of(
        orchestrator(*args, "train.max_steps=10", cwd=tmp_path)
    )  # a relative SQLite path: the job's directory is elsewhere
    record_path = storage / "digits-mlp" / "run.json"
    first = json.loads(record_path.read_text())
    record = dict(first, status="failed")  # as after a crash: the rerun resumes
    record_path.write_text(json.dumps(record))
    summary_of(orchestrator(*args, "train.max_steps=20", "--extend", cwd=tmp_path))  # a longer horizon: named
    second = json.loads(record_path.read_text())
    run_id = first["tracking"]["mlflow"]["run_id"]
    assert second["tracking"]["mlflow"]["run_id"] == run_id and second["attempts"] == 2

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "digits-exp" and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [5, 10, 15, 20]  # no step twice
    assert run.data.params["train.max_steps"] == "10"  # MLflow params cannot change; run.json has the new value
    assert second["job"]["train"]["max_steps"] == 20


@pytest.mark.xdist_group("mlflow")  # the MLflow server starts once, in the worker that runs every test of it
def test_sweep_trials_are_child_runs_of_the_sweep_run(mlflow_server, tmp_path):
    spec = build_spec(
        {"name": "sw"},
        [
            f"checkpoint.storage={tmp_path}",
            f"tracking.mlflow.tracking_uri={mlflow_server.uri}",
            "tracking.mlflow.experiment=sweeps",
        ],
    )
    prov = collect_provenance(spec)
    parent = tracking.TrackingSession.start(spec, f"{tmp_path}/sw", "sw", prov)
    children = [
        tracking.TrackingSession.start(spec, f"{tmp_path}/sw/t{i}", f"t{i}", prov, parent_run_id=parent.mlflow_run_id)
        for i in range(2)
    ]
    client = MlflowClient(mlflow_server.uri)
    found = client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.mlflow_run_id}'"
    )
    assert sorted(r.info.run_id for r in found) == sorted(c.mlflow_run_id for c in children)


# ----------------------------------------------------------------------------------------------
# Failures: at start a preflight error, in the middle a warning that never slows training


@pytest.mark.parametrize(
    "overrides, env, message",
    [
        (
            ["tracking.mlflow.tracking_url=http://x"],
            {},
            "error: tracking.mlflow.tracking_url: unknown field (did you mean 'tracking_uri'?)",
        ),
        (["tracking.wandb.project=x"], {}, "error: tracking.wandb: unknown field"),
        (
            ["tracking.tensorboard.logdir=x"],
            {},
            "error: tracking.tensorboard.logdir: unknown field (did you mean 'log_dir'?)",
        ),
        (
            ["tracking.mlflow.experiment=x"],
            {},
            "error: tracking.mlflow.tracking_uri: not set, and $MLFLOW_TRACKING_URI is empty",
        ),
        (
            [],
            {"MLFLOW_TRACKING_URI": "http://alice:s3cret@127.0.0.1:{port}"},
            "error: tracking.mlflow.tracking_uri: cannot reach the MLflow tracking server at http://127.0.0.1:{port}",
        ),
        (
            ["tracking.mlflow.tracking_uri=sqlite:///no/such/dir/m.db"],
            {},
            "error: tracking.mlflow.tracking_uri: sqlite:///{cwd}/no/such/dir/m.db: the directory",
        ),
    ],
    ids=[
        "misspelt-option",
        "unknown-tracker",
        "misspelt-tensorboard-option",
        "no-uri",
        "unreachable-server",
        "missing-sqlite-dir",
    ],
)
def test_bad_tracking_input_is_one_line_exit_2_and_nothing_written(overrides, env, message, tmp_path):
    port = free_port()
    env = {k: v.format(port=port) for k, v in env.items()}
    if env:
        overrides = ["tracking.mlflow={}"]  # on, with the URI from the environment
    storage = tmp_path / "runs"
    res = orchestrator(
        "run", DIGITS, "scaling.num_workers=0", f"checkpoint.storage={storage}", *overrides, env=env, cwd=tmp_path
    )
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(port=port, cwd=tmp_path)), lines
    assert "s3cret" not in res.stderr and "alice" not in res.stderr
    assert not storage.exists() or not any(storage.iterdir())


class RecordingSink:
    name = "recording"

    def __init__(self, fail: bool = False, block: threading.Event | None = None):
        self.entries, self.fail, self.block, self.closed = [], fail, block, False

    def log(self, entries):
        if self.block is not None:
            self.block.wait()
        if self.fail:
            raise ConnectionError("tracking server went away")
        self.entries.extend(entries)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tracker_queues_and_never_blocks_or_raises(caplog):
    gate = threading.Event()
    slow, failing = RecordingSink(block=gate), RecordingSink(fail=True)
    slow.name, failing.name = "slow", "failing"
    tracker = tracking.Tracker([slow, failing])
    total = tracking.QUEUE_SIZE + 2000  # the thread holds up to 1000 in its blocked batch; the rest overflows the queue

    def caller():
        for step in range(total):
            tracker({"step": step, "split": "train", "loss": 1.0, "time": time.time()})

    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        # A blocked sink costs the caller nothing: every call returns while the sink is still held. (A tracker
        # that waited for room in its queue would still be calling when the bound runs out: the gate opens only
        # after it.) No clock on the caller's speed: on a loaded machine 12,000 calls may take more than a second.
        training = threading.Thread(target=caller, daemon=True)
        training.start()
        training.join(timeout=120)
        assert not training.is_alive() and not gate.is_set() and not slow.entries
        assert tracker.dropped > 0 and "dropping metrics entries" in caplog.text
        gate.set()
        assert tracker.close(timeout=30)
    assert slow.closed and len(slow.entries) == total - tracker.dropped
    assert (
        caplog.text.count("failing tracking failed (ConnectionError: tracking server went away)") == 1
    )  # once per outage, not per entry


@pytest.mark.xdist_group("mlflow")  # the MLflow server starts once, in the worker that runs every test of it
def test_tracking_server_failing_mid_run_is_a_warning_and_does_not_slow_training(
    mlflow_server, tmp_path, caplog, monkeypatch
):
    spec = load_spec(
        DIGITS,
        [
            "scaling.num_workers=0",
            f"checkpoint.storage={tmp_path}",
            "train.max_steps=60",
            "validation.every_n_steps=10",
            "train.log_every_n_steps=1",
            "checkpoint.every_n_epochs=null",
            f"tracking.mlflow.tracking_uri={mlflow_server.uri}",
        ],
    )
    start = time.perf_counter()
    run_training(spec, LoopContext(run_uri=str(tmp_path / "baseline"), log=lambda msg: None))
    baseline = time.perf_counter() - start

    session = tracking.TrackingSession.start(spec, str(tmp_path / "tracked"), "tracked", collect_provenance(spec))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = tracking.create_tracker(session.worker_config())
    mlflow_server.signal(signal.SIGSTOP)  # the server hangs: every request waits for its timeout
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
            start = time.perf_counter()
            out = run_training(
                spec, LoopContext(run_uri=str(tmp_path / "tracked"), log=lambda msg: None, track=tracker)
            )
            tracked = time.perf_counter() - start
            assert out.steps == 60
            # 66 entries, each a request the hung server holds for 2 s: synchronous tracking would add minutes.
            assert tracked < baseline + 5, (tracked, baseline)
            tracker.close(timeout=10)
    finally:
        mlflow_server.signal(signal.SIGCONT)
    assert "mlflow tracking failed" in caplog.text and "training goes on" in caplog.text


def test_loop_hands_every_recorded_entry_to_track(tmp_path):
    seen = []
    spec = load_spec(
        DIGITS,
        [
            f"checkpoint.storage={tmp_path}",
            "train.max_steps=12",
            "validation.every_n_steps=6",
            "train.log_every_n_steps=3",
        ],
    )
    run_training(spec, LoopContext(run_uri=str(tmp_path / "r"), log=lambda msg: None, track=seen.append))
    assert seen == history_of(tmp_path / "r")
    assert [e["split"] for e in seen] == ["train", "train", "val", "train", "train", "val"]


def test_loop_ignores_a_track_callable_that_raises(tmp_path):
    def broken(entry):
        raise RuntimeError("user tracker bug")

    spec = load_spec(DIGITS, [f"checkpoint.storage={tmp_path}", "train.max_steps=6", "validation.every_n_steps=6"])
    assert run_training(spec, LoopContext(run_uri=str(tmp_path / "r"), log=lambda msg: None, track=broken)).steps == 6


# ----------------------------------------------------------------------------------------------
# Provenance pieces


def test_git_state_of_a_checkout_and_of_a_plain_directory(tmp_path):
    repo = tmp_path / "code"
    repo.mkdir()

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "model.py").write_text("x = 1\n")
    git("add", "model.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    state = git_state(str(repo))
    assert state == {"commit": git("rev-parse", "HEAD"), "dirty": False, "root": str(repo)}
    (repo / "model.py").write_text("x = 2\n")
    assert git_state(str(repo))["dirty"] is True
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_state(str(plain)) is None


def test_job_hash_ignores_key_order_and_sees_every_value():
    a = {"optim": {"lr": 0.1, "name": "sgd"}, "name": "x"}
    b = {"name": "x", "optim": {"name": "sgd", "lr": 0.1}}
    assert job_hash(a) == job_hash(b)
    assert job_hash(a) != job_hash({**a, "optim": {"lr": 0.2, "name": "sgd"}})


def test_parquet_run_records_its_files_with_sizes_and_times(tmp_path):
    spec = load_spec(
        ROOT / "jobs" / "diabetes_parquet.yaml",
        ["scaling.num_workers=0", f"checkpoint.storage={tmp_path}", "train.max_steps=4"],
    )
    out = run_job(spec, job_file=str(ROOT / "jobs" / "diabetes_parquet.yaml"), quiet=True)
    data = json.loads((tmp_path / "diabetes-parquet" / "run.json").read_text())["provenance"]["data"]
    parquet = ROOT / "jobs" / "data" / "diabetes.parquet"
    assert data["source"] == "parquet" and data["files"][0]["path"] == str(parquet)
    assert data["files"][0]["size"] == parquet.stat().st_size and data["files"][0]["mtime"]
    assert out.test.metrics["test_mse"] > 0


def test_redact_hides_credentials_in_uris():
    assert redact("https://bob:pw@mlflow.example:5000/x?token=abc&b=1") == "https://mlflow.example:5000/x?token=***&b=1"
    assert redact("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_a_preflight_error_names_the_field():
    spec = build_spec({}, ["tracking.mlflow.tracking_uri=http://127.0.0.1:9"])
    with pytest.raises(
        BadInput, match=r"^tracking.mlflow.tracking_uri: cannot reach the MLflow tracking server at http://127.0.0.1:9$"
    ):
        tracking.preflight(spec)
