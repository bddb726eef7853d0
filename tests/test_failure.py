"""Failure as a decision: a dead worker is retried, the job's own exception fails at once, a NaN loss names its step."""

from __future__ import annotations

import json
import math
import pickle
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from commands import run_command
from ray.exceptions import ActorDiedError, RayTaskError, WorkerCrashedError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2.api.exceptions import WorkerGroupError

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.failure import Action, NonFiniteLoss, TaskException, decide
from orchestrator.loop import LoopContext, run_training
from orchestrator.loop.guard import LossGuard
from orchestrator.spec import FailureSpec, build_spec

ROOT = Path(__file__).resolve().parents[1]


def user(exc: BaseException) -> UserExceptionWithTraceback:
    return UserExceptionWithTraceback(exc, f"Traceback (most recent call last):\n  ...\n{type(exc).__name__}: {exc}")


def group(*errors: BaseException) -> WorkerGroupError:
    return WorkerGroupError("\n".join(map(str, errors)), dict(enumerate(errors)))


# ----------------------------------------------------------------------------------------------
# The decision table


def test_the_jobs_own_exception_fails_at_once_with_its_one_line():
    decision = decide(
        group(user(ValueError("mat1 and mat2 shapes cannot be multiplied (8x4 and 5x2)"))), 0, FailureSpec()
    )
    assert decision.action is Action.FAIL
    assert decision.reason == "ValueError: mat1 and mat2 shapes cannot be multiplied (8x4 and 5x2)"
    assert decision.traceback.startswith("Traceback")


def test_retry_exceptions_retries_them_within_max_failures():
    config = FailureSpec(retry_exceptions=True, max_failures=2)
    error = group(user(KeyError("x")))
    assert decide(error, 0, config).action is Action.RETRY
    assert decide(error, 1, config).reason.endswith("restart 2/2 (failure.retry_exceptions)")
    assert decide(error, 2, config).action is Action.FAIL


def test_a_dead_worker_is_retried_even_when_its_peers_raised():
    died = ActorDiedError()
    peer = user(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:1234"))
    decision = decide(group(peer, died), 0, FailureSpec(max_failures=3))
    assert decision.action is Action.RETRY and "restart 1/3 from the last checkpoint" in decision.reason
    assert decide(group(died), 3, FailureSpec(max_failures=3)).action is Action.FAIL
    assert decide(group(died), 100, FailureSpec(max_failures=-1)).action is Action.RETRY
    assert decide(group(died), 0, FailureSpec(max_failures=0)).action is Action.FAIL


def test_infrastructure_errors_in_the_loop_are_retried():
    for exc in (ConnectionResetError("reset"), TimeoutError("read timed out"), OSError("storage endpoint gone")):
        assert decide(group(user(exc)), 0, FailureSpec()).action is Action.RETRY, exc
    assert decide(group(user(FileNotFoundError("no data.csv"))), 0, FailureSpec()).action is Action.FAIL


def test_a_nonfinite_loss_is_never_retried():
    decision = decide(group(user(NonFiniteLoss(37, math.nan))), 0, FailureSpec(retry_exceptions=True))
    assert decision.action is Action.FAIL and decision.reason.startswith("NonFiniteLoss: the loss of step 37 is nan")


def test_local_mode_exceptions_are_the_loops_own():
    assert (
        decide(ZeroDivisionError("division by zero"), 0, FailureSpec()).reason == "ZeroDivisionError: division by zero"
    )


def task_error(exc: BaseException) -> BaseException:
    """What `ray.get` raises when the loop of a run in one task raises `exc`: Ray's dual-class error around the task's
    TaskException."""
    text = f"Traceback (most recent call last):\n  ...\n{type(exc).__name__}: {exc}"
    sent = pickle.loads(pickle.dumps(TaskException(exc, text)))  # from the worker to the driver
    return RayTaskError("one_task_worker", "(Ray's copy)", sent).as_instanceof_cause()


def test_a_run_in_one_task_is_decided_like_a_worker_group():
    bug = decide(task_error(ValueError("mat1 and mat2 shapes cannot be multiplied")), 0, FailureSpec())
    assert bug.action is Action.FAIL and bug.reason == "ValueError: mat1 and mat2 shapes cannot be multiplied"
    assert bug.traceback.startswith("Traceback") and bug.traceback.endswith(bug.reason)
    assert decide(task_error(ConnectionResetError("reset")), 0, FailureSpec()).action is Action.RETRY
    nan = decide(task_error(NonFiniteLoss(3, math.nan)), 0, FailureSpec(retry_exceptions=True))
    assert nan.action is Action.FAIL and nan.reason.startswith("NonFiniteLoss: the loss of step 3")
    # The task's worker process killed: Ray's own error, retried within the budget.
    crashed = decide(WorkerCrashedError(), 0, FailureSpec(max_failures=2))
    assert crashed.action is Action.RETRY and "restart 1/2 from the last checkpoint" in crashed.reason
    assert decide(WorkerCrashedError(), 2, FailureSpec(max_failures=2)).action is Action.FAIL


# ----------------------------------------------------------------------------------------------
# The loss guard and the loop


def test_loss_guard_names_the_first_bad_step_without_reading_every_step():
    guard = LossGuard(torch.device("cpu"), skip=False)
    guard.observe(torch.tensor(1.0), 1)
    guard.check()
    guard.observe(torch.tensor(float("inf")), 2)
    guard.observe(torch.tensor(float("nan")), 3)
    with pytest.raises(NonFiniteLoss, match=r"the loss of step 2 is inf"):
        guard.check()
    skipping = LossGuard(torch.device("cpu"), skip=True)
    skipping.observe(torch.tensor(float("nan")), 5)
    assert skipping.take_skip() == 5 and skipping.take_skip() is None


NAN_DATA = """
import numpy as np

def make(n=400):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0])
    y[::40] = np.nan  # a few broken labels: each batch holding one has a NaN loss
    return x, y
"""


@pytest.fixture
def nan_job(tmp_path):
    module = f"nandata_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(NAN_DATA))

    def spec(*overrides):
        return build_spec(
            {
                "name": "nan",
                "data": {"name": f"{module}:make", "task": "regression", "test_split": 0.0},
                "validation": {"split": 0.1},
                "model": {"hidden": 8, "layers": 1},
                "optim": {"lr": 0.01},
                "train": {"epochs": 2, "batch_size": 16, "log_every_n_steps": 4},
                "checkpoint": {
                    "storage": str(tmp_path / "runs"),
                    "every_n_steps": 3,
                    "every_n_epochs": None,
                    "keep_last": 100,
                },
            },
            list(overrides),
        )

    return spec, tmp_path


def committed(run_uri: str) -> list[ckpt.CheckpointInfo]:
    fs, root = storage.open_storage(run_uri)
    return ckpt.list_checkpoints(fs, root)


def test_a_nonfinite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(nan_job):
    spec, tmp_path = nan_job
    run_uri = str(tmp_path / "runs" / "nan")
    with pytest.raises(NonFiniteLoss) as err:
        run_training(spec(), LoopContext(run_uri=run_uri, base_dir=str(tmp_path)))
    bad = err.value.step
    assert bad >= 1 and math.isnan(err.value.value)
    steps = [c.step for c in committed(run_uri)]
    assert steps and max(steps) < bad
    fs, root = storage.open_storage(run_uri)
    _, files = ckpt.restore_latest(fs, root)
    weights = ckpt.deserialize_weights(files[ckpt.WEIGHTS])
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_skip_mode_skips_the_bad_steps_and_trains_to_the_end(nan_job):
    spec, tmp_path = nan_job
    run_uri = str(tmp_path / "runs" / "nan")
    said: list[str] = []
    result = run_training(
        spec("failure.nonfinite_loss=skip"), LoopContext(run_uri=run_uri, base_dir=str(tmp_path), log=said.append)
    )
    skipped = [line for line in said if "the loss is not finite; its update skipped" in line]
    assert skipped and len(set(skipped)) == len(skipped), said  # the broken labels' batches, each step once
    assert result.steps == max(c.step for c in committed(run_uri))
    fs, root = storage.open_storage(run_uri)
    _, files = ckpt.restore_latest(fs, root)
    assert all(torch.isfinite(t).all() for t in ckpt.deserialize_weights(files[ckpt.WEIGHTS]).values())


# ----------------------------------------------------------------------------------------------
# Through Ray Train: one attempt, not max_failures + 1


@pytest.mark.slow
def test_a_bug_in_a_user_model_fails_the_run_once_with_its_line(tmp_path):
    (tmp_path / "badmodel.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Bad(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = torch.nn.Linear(64, 10)
                    self.calls = 0

                def forward(self, x):
                    self.calls += 1
                    if self.training and self.calls > 3:  # preflight's and the first steps pass
                        raise ValueError("a bug in the user's model at call %d" % self.calls)
                    return self.lin(x.flatten(1))

            def make():
                return Bad()
            """
        )
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: bug\nmodel: {name: 'badmodel:make'}\ntrain: {epochs: 1, batch_size: 32}\n"
        f"scaling: {{num_workers: 1}}\nfailure: {{max_failures: 3}}\ncheckpoint: {{storage: {tmp_path / 'runs'}}}\n"
    )
    start = time.perf_counter()
    # Under pytest's own 600 s: a hang fails here, with its stacks, rather than at pytest's limit without them.
    proc = run_command([sys.executable, "-m", "orchestrator", "run", str(job), "--json"], cwd=tmp_path, timeout=400)
    took = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["status"] == "failed"
    assert summary["error"] == "ValueError: a bug in the user's model at call 4"
    assert "restart" not in proc.stderr  # no attempt after the first
    assert "Traceback" not in proc.stderr and "a bug in the user's model at call 4" in proc.stderr
    log = (tmp_path / "runs" / "bug" / "run.log").read_text()
    assert "Traceback" in log and "a bug in the user's model" in log  # the full traceback is in the run's log
    print(f"failed after {took:.1f}s")
