"""`orchestrator run` end to end: every example job, bad input, rerun/resume, and real process kills."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from commands import cmdline, descendants, run_command
from run_output import assert_ends_in_order

from orchestrator import checkpoint as ckpt
from orchestrator import storage

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def orchestrator(*args, cwd=ROOT, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return run_command([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=full_env, timeout=timeout)


def summary_of(res) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def final_weights(run_uri: str) -> dict:
    fs, root = storage.open_storage(run_uri)
    info, files = ckpt.restore_latest(fs, root)
    return ckpt.deserialize_weights(files[ckpt.WEIGHTS])


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


# ----------------------------------------------------------------------------------------------
# Every example job runs (briefly, in local mode: the loop in the driver process)


@pytest.mark.parametrize(
    "job",
    [
        # A transformer's twelve steps, validations and test pass: half a minute on two busy cores.
        pytest.param(j, id=j.name, marks=pytest.mark.slow) if j.name == "tiny_gpt.yaml" else pytest.param(j, id=j.name)
        for j in JOBS
        if j.name != "transfer_finetune.yaml"
    ],
)
def test_every_example_job_runs(job, tmp_path):
    brief = ["scaling.num_workers=0", f"checkpoint.storage={tmp_path}"]
    if "entrypoint" not in job.read_text():
        brief += ["train.max_steps=12", "validation.every_n_steps=6"]
    res = orchestrator("run", str(job), *brief, "--json")
    out = summary_of(res)
    assert out["status"] == "finished" and out["run"] == job.stem.replace("_", "-")
    own_loop = "entrypoint" in job.read_text()
    if out.get("test") and not own_loop:
        # Local mode, piped (the console's lines on stderr with --json): the ending in order, before the summary.
        assert_ends_in_order(res.stderr, 12)
        assert_ends_in_order((tmp_path / out["run"] / "run.log").read_text(), 12)
    if own_loop:  # its three reports, one an epoch, each with a checkpoint
        assert out["steps"] == 3 and out["epochs"] == 3 and out["checkpoint"].endswith("checkpoint_00000003")
    else:
        assert out["steps"] == 12 and out["checkpoint"].endswith("checkpoint_00000012")
        assert out["metrics"]["val_loss"] > 0 and out["best"]["step"] in (6, 12)
        record = json.loads((tmp_path / out["run"] / "run.json").read_text())
        assert record["status"] == "finished" and record["job"]["train"]["max_steps"] == 12
        assert record["provenance"]["torch"] and record["provenance"]["ray"]


@pytest.mark.slow  # two whole trainings (source, then fine-tuned to >0.9)
def test_transfer_learning_example_pair(tmp_path):
    storage_arg = f"checkpoint.storage={tmp_path}"
    summary_of(orchestrator("run", "jobs/transfer_source.yaml", "scaling.num_workers=0", storage_arg, "--json"))
    out = summary_of(
        orchestrator(
            "run",
            "jobs/transfer_finetune.yaml",
            "scaling.num_workers=0",
            storage_arg,
            f"model.init_from={tmp_path}/transfer-source",
            "--json",
        )
    )
    assert out["metrics"]["val_accuracy"] > 0.9  # digits 5-9, from features learnt on 0-4
    source, tuned = final_weights(str(tmp_path / "transfer-source")), final_weights(str(tmp_path / "transfer-finetune"))
    assert torch.equal(source["net.1.weight"], tuned["net.1.weight"])  # frozen
    assert not torch.equal(source["net.7.weight"], tuned["net.7.weight"])  # fine-tuned


@pytest.mark.slow
def test_main_example_reaches_its_accuracy_in_local_mode(tmp_path):
    # The README promises >= 0.95 validation accuracy for jobs/digits_mlp.yaml (its time is bench/end_to_end.py's).
    out = summary_of(
        orchestrator("run", "jobs/digits_mlp.yaml", "scaling.num_workers=0", f"checkpoint.storage={tmp_path}", "--json")
    )
    assert out["best"]["metrics"]["val_accuracy"] >= 0.95


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before Ray starts, nothing written


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=transformer"], "error: model.name: unknown model 'transformer'"),
        (["optim.lr=0"], "error: optim.lr: Input should be greater than 0"),
        (["data.name=nope:fn"], "error: data.name: cannot import 'nope"),
        (["model.name=nope:fn"], "error: model.name: cannot import 'nope"),
        (["data.path=missing/*.parquet"], "error: data.path:"),
        (["data.features=[age, height]"], "error: data.features: column 'height'"),
        (["data.label=price"], "error: data.label: column 'price'"),
        (["scaling.num_workers=64"], "error: scaling.num_workers: 64 worker(s) x 1 CPU need 64 CPUs"),
        (["scaling.use_gpu=true"], "error: scaling.use_gpu: no CUDA GPU on this machine"),
        (["model.init_from=/no/such/run"], "error: /no/such/run: no committed checkpoint here"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(overrides, message, tmp_path):
    job = (
        "jobs/diabetes_parquet.yaml"
        if overrides[0].startswith("data.") and "nope" not in overrides[0]
        else "jobs/digits_mlp.yaml"
    )
    res = orchestrator("run", job, f"checkpoint.storage={tmp_path}/runs", *overrides)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written, no Ray started
    assert "Started a local Ray instance" not in res.stderr


def test_missing_bucket_is_caught_before_ray(s3_server, tmp_path):
    res = orchestrator("run", "jobs/digits_mlp.yaml", "checkpoint.storage=s3://does-not-exist/runs")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: s3://does-not-exist/runs: the bucket does not exist"


# ----------------------------------------------------------------------------------------------
# Reruns: resume, already finished, --fresh


@pytest.mark.slow
def test_rerun_of_a_finished_run_says_so_and_fresh_starts_anew(tmp_path):
    args = [
        "run",
        "jobs/digits_mlp.yaml",
        "scaling.num_workers=0",
        f"checkpoint.storage={tmp_path}",
        "train.max_steps=10",
        "--json",
    ]
    first = summary_of(orchestrator(*args))
    again = orchestrator(*args)
    second = summary_of(again)
    assert second["already_finished"] and second["steps"] == 10 and "already finished" in again.stderr
    fresh = summary_of(orchestrator(*args, "--fresh"))
    assert fresh["run"].startswith("digits-mlp-") and fresh["resumed_from"] is None and fresh["steps"] == 10
    assert (tmp_path / first["run"] / "run.json").exists() and (tmp_path / fresh["run"] / "run.json").exists()


@pytest.mark.slow  # two whole runs of the example job
def test_longer_rerun_resumes_from_the_last_checkpoint(tmp_path):
    base = [
        "run",
        "jobs/digits_mlp.yaml",
        "scaling.num_workers=0",
        f"checkpoint.storage={tmp_path}",
        "--json",
        "train.epochs=2",
        "early_stopping=null",
    ]
    summary_of(orchestrator(*base))
    # A run that crashed leaves run.json "running": simulate by flipping the status.
    record_path = tmp_path / "digits-mlp" / "run.json"
    record = json.loads(record_path.read_text())
    record["status"] = "failed"
    record_path.write_text(json.dumps(record))
    out = summary_of(orchestrator(*base))
    assert out["resumed_from"].endswith("checkpoint_00000086") and out["steps"] == 86


# ----------------------------------------------------------------------------------------------
# Real failures: a killed driver, a killed Ray Train worker. Both end with the weights of a run
# that was never interrupted.

KILL_JOB = [
    "model.hidden=256",
    "model.layers=3",
    "train.batch_size=16",
    "train.epochs=3",
    "early_stopping=null",
    "checkpoint.every_n_steps=10",
    "checkpoint.every_n_epochs=null",
    "checkpoint.keep_last=3",
    "train.log_every_n_steps=50",
]
SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}  # Ray gives a 1-CPU worker one thread; the reference must match


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(run_dir.glob("checkpoint_*/manifest.json")):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    summary_of(
        orchestrator(
            "run",
            "jobs/digits_mlp.yaml",
            "scaling.num_workers=0",
            f"checkpoint.storage={tmp}",
            *KILL_JOB,
            "--json",
            env=SINGLE_THREAD,
        )
    )
    return final_weights(str(tmp / "digits-mlp"))


@pytest.mark.slow  # a reference run, a run killed part-way and its rerun
@pytest.mark.xdist_group("reference_weights")  # one worker computes the reference once for both tests
def test_killed_driver_then_rerun_ends_with_identical_weights(tmp_path, reference_weights):
    args = [
        "run",
        "jobs/digits_mlp.yaml",
        "scaling.num_workers=0",
        f"checkpoint.storage={tmp_path}",
        *KILL_JOB,
        "--json",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        env={**os.environ, **SINGLE_THREAD},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_checkpoint(tmp_path / "digits-mlp", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    record = json.loads((tmp_path / "digits-mlp" / "run.json").read_text())
    assert record["status"] == "running"  # killed: nobody recorded an end
    out = summary_of(orchestrator(*args, env=SINGLE_THREAD))
    assert out["resumed_from"] and out["steps"] == 3 * 86
    assert_same_weights(final_weights(str(tmp_path / "digits-mlp")), reference_weights)


@pytest.mark.slow
@pytest.mark.xdist_group("reference_weights")  # one worker computes the reference once for both tests
def test_sigkilled_ray_worker_is_restarted_and_ends_with_identical_weights(tmp_path, reference_weights):
    args = [
        "run",
        "jobs/digits_mlp.yaml",
        "scaling.num_workers=1",
        "failure.max_failures=2",
        f"checkpoint.storage={tmp_path}",
        *KILL_JOB,
        "--json",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_checkpoint(tmp_path / "digits-mlp", proc)
    # The run's one worker is a plain Ray task (the task executor): Ray titles its process after the function.
    workers = [p for p in descendants(proc.pid) if "ray::one_task_worker" in cmdline(p)]
    assert workers, "no Ray worker process running the loop found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["status"] == "finished" and out["steps"] == 3 * 86
    assert "resumed from" in stderr  # the restarted worker continued from a checkpoint
    assert_same_weights(final_weights(str(tmp_path / "digits-mlp")), reference_weights)


@pytest.mark.slow
def test_two_ddp_workers_on_embedded_ray(tmp_path):
    res = orchestrator(
        "run",
        "jobs/digits_mlp.yaml",
        "scaling.num_workers=2",
        "train.epochs=2",
        "early_stopping=null",
        f"checkpoint.storage={tmp_path}",
        "--json",
    )
    out = summary_of(res)
    assert (
        out["status"] == "finished" and out["steps"] == 2 * 22
    )  # 1374 training examples: 687 a rank, 22 batches of 32
    fs, root = storage.open_storage(str(tmp_path / "digits-mlp"))
    _, files = ckpt.restore_latest(fs, root)
    assert len(ckpt.deserialize_state(files["rng.pt"])) == 2
    assert out["metrics"]["val_accuracy"] > 0.8  # 44 steps of DDP: learning, not yet converged
    # Rank 0's events came through the driver's mailbox actor: all of them, in order, before the summary.
    assert_ends_in_order(res.stderr, 44)
    assert_ends_in_order((tmp_path / "digits-mlp" / "run.log").read_text(), 44)


@pytest.mark.slow
def test_checkpoints_and_export_commands(tmp_path, s3_server, bucket):
    storage_arg = f"checkpoint.storage=s3://{bucket}/runs"
    out = summary_of(
        orchestrator(
            "run",
            "jobs/digits_mlp.yaml",
            "scaling.num_workers=0",
            storage_arg,
            "train.max_steps=20",
            "checkpoint.every_n_steps=10",
            "--json",
        )
    )
    run_uri = f"s3://{bucket}/runs/digits-mlp"
    assert out["run_uri"] == run_uri
    listed = json.loads(orchestrator("checkpoints", run_uri, "--json").stdout)
    assert [c["step"] for c in listed] == [10, 20] and listed[-1]["uri"] == f"{run_uri}/checkpoint_00000020"
    assert listed[-1]["size"] > 0 and "val_loss" in listed[-1]["metrics"]
    table = orchestrator("checkpoints", run_uri)
    assert table.returncode == 0 and "checkpoint_00000010" in table.stdout
    target = tmp_path / "model.safetensors"
    res = orchestrator("export", listed[0]["uri"], "--out", str(target))
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    exported = load_file(str(target))
    assert set(exported) == set(final_weights(run_uri))
    bad = orchestrator("export", f"{run_uri}/checkpoint_00000015", "--out", str(tmp_path / "x.safetensors"))
    assert (
        bad.returncode == 2 and "not a committed checkpoint" in bad.stderr and not (tmp_path / "x.safetensors").exists()
    )
    empty = orchestrator("checkpoints", str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "no committed checkpoint" in empty.stderr


# ----------------------------------------------------------------------------------------------
# What a person sees: one progress display, no Ray-internal lines; everything in <run>/run.log

RAY_NOISE = ("TrainingReport(", "pid=", "INFO ", "core_worker", "raylet", "PreemptionWatcher", "Token authentication")


def assert_no_ray_lines(text: str) -> None:
    noisy = [line for line in text.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noisy, noisy


@pytest.mark.slow
def test_the_default_job_piped_shows_plain_progress_and_logs_everything(tmp_path):
    res = orchestrator("run", "jobs/digits_mlp.yaml", "train.epochs=2", f"checkpoint.storage={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_no_ray_lines(res.stdout + res.stderr)
    shown = res.stdout.splitlines()
    assert any(line.startswith("step ") and "samples/s" in line for line in shown)
    assert any(line.startswith("  validation: ") for line in shown) and any(
        line.startswith("finished: digits-mlp") for line in shown
    )
    log = (tmp_path / "digits-mlp" / "run.log").read_text()
    assert "(one_task_worker pid=" in log and "rank 0 of 1 on " in log  # the worker's own lines are kept, not shown
    # The worker's events came on their own channel: all of them, in order, before the summary.
    assert_ends_in_order(res.stdout, 86)
    assert_ends_in_order(log, 86)


@pytest.mark.slow
def test_the_default_job_in_a_terminal_draws_one_progress_display(tmp_path):
    if not shutil.which("tmux"):
        pytest.fail("tmux is needed for this test (make setup installs it)")
    server, session = f"orch-test-{os.getpid()}", "run"
    command = f"cd {ROOT} && {sys.executable} -m orchestrator run jobs/digits_mlp.yaml train.epochs=2 checkpoint.storage={tmp_path}; echo EXIT=$?; sleep 600"
    subprocess.run(
        ["tmux", "-L", server, "new-session", "-d", "-s", session, "-x", "160", "-y", "50", command], check=True
    )
    try:
        deadline, screen = time.time() + 240, ""
        while time.time() < deadline and "EXIT=" not in screen:
            time.sleep(1)
            screen = subprocess.run(
                ["tmux", "-L", server, "capture-pane", "-p", "-t", session, "-S", "-"], capture_output=True, text=True
            ).stdout
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True)
    assert "EXIT=0" in screen, screen
    assert_no_ray_lines(screen)
    assert "━" in screen and "86/86" in screen  # the progress bar, finished (2 epochs of 43 steps)
    assert "  validation: " in screen and "finished: digits-mlp" in screen
    bars = [line for line in screen.splitlines() if "━" in line]
    assert len(bars) == 1 and "86/86" in bars[0], screen  # one display: none left behind, none drawn anew
    lines = screen.splitlines()
    above_summary = lines[: next(i for i, line in enumerate(lines) if line.startswith("finished: "))]
    # Both validations and the test line, in order, above the summary.
    shown = [line[:13] for line in above_summary if line.startswith(("  validation:", "  test (step"))]
    assert shown == ["  validation:", "  validation:", "  test (step "], screen
    assert not any(line.startswith("step ") for line in screen.splitlines())  # the bar replaces the plain step lines
    assert "(one_task_worker pid=" in (tmp_path / "digits-mlp" / "run.log").read_text()


BROKEN_MODEL = """
import torch


class Breaks(torch.nn.Module):
    def __init__(self, info):
        super().__init__()
        self.linear = torch.nn.Linear(64, info.num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls > 25:
            raise RuntimeError("the user's model broke")
        return self.linear(x.flatten(1))


def model(info):
    return Breaks(info)
"""


def test_a_failed_run_still_gets_its_report_and_log(tmp_path):
    (tmp_path / "breaks.py").write_text(BROKEN_MODEL)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: breaks\nmodel: {{name: 'breaks:model'}}\ndata: {{name: digits}}\ncheckpoint: {{storage: {tmp_path / 'runs'}}}\n"
    )
    res = orchestrator(
        "run",
        str(job),
        "scaling.num_workers=0",
        "train.max_steps=40",
        "validation.every_n_steps=10",
        "failure.max_failures=0",
        "--json",
    )
    assert res.returncode == 1
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == "failed" and "the user's model broke" in out["error"]
    run = tmp_path / "runs" / "breaks"
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert "failed" in (run / "report.html").read_text() and out["report"] == str(run / "report.html")
    assert "RuntimeError: the user's model broke" in (run / "run.log").read_text()
    assert "Traceback" not in res.stderr
