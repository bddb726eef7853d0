"""Failure as a decision, in one place: what went wrong in a fit maps to RETRY or FAIL, with a one-line reason.

A worker or node that dies (killed, out of memory, node lost, a peer's collective broken by it) is
retried from the last committed checkpoint, up to `failure.max_failures`. An exception raised by the
job's own code (a bug in a model or data hook, a shape mismatch) would only happen again: it fails the run
at once, unless `failure.retry_exceptions` says to retry those too. A non-finite loss and bad data
(`DataError`) fail it at once whatever that says.

Ray Train's own policy retries both alike, so the fit runs with Ray's worker-group retries off and
`trainer.fit` asks `decide` after each failed attempt. This module imports neither torch nor ray at
the top: a decision reads exceptions by class name where ray's classes are not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from orchestrator.errors import DataError
from orchestrator.lease import LeaseLost
from orchestrator.spec import FailureSpec

# Messages of errors that a dying peer, a lost connection or a storage outage leave in a healthy
# rank: infrastructure, not the job's code.
_INFRASTRUCTURE_HINTS = (
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "nccl",
    "gloo",
    "timed out",
    "timeout",
    "socket",
    "endpoint",
    "unreachable",
)


class Action(str, Enum):
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt, and a one-line reason a person can act on."""

    action: Action
    reason: str
    traceback: str | None = None  # the job's own exception, in full, for the run's log


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN or infinite: deterministic from this checkpoint on, so never retried."""

    def __init__(self, step: int, value: float):
        super().__init__(
            f"the loss of step {step} is {value}; the last checkpoint before it stays the latest "
            "(failure.nonfinite_loss: skip skips such steps)"
        )
        self.step, self.value = step, value

    def __reduce__(self):  # to the driver from a worker: rebuilt from its step and value, not its message
        return type(self), (self.step, self.value)


class JobExited(Exception):
    """The job's own code called `sys.exit(n)` or `os._exit(n)` in the loop (executor.exits_as_errors): a failed run."""

    def __init__(self, code: int, how: str):
        super().__init__(code, how)
        self.code, self.how = code, how

    def __str__(self) -> str:
        return f"the job's code called {self.how}({self.code})"


class TaskException(Exception):
    """The loop's exception as a run in one task raises it (executor.one_task_worker), with its traceback as text:
    pickling, which takes it to the driver, keeps no traceback. Ray Train's UserExceptionWithTraceback, for a task."""

    def __init__(self, exc: BaseException, traceback_str: str):
        super().__init__(exc, traceback_str)
        self._base_exc, self._traceback_str = exc, traceback_str

    def __str__(self) -> str:
        return str(self._base_exc)


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _worker_errors(error: BaseException) -> list[BaseException]:
    """The per-rank errors inside Ray Train's TrainingFailedError (or the error itself, e.g. in local mode)."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return [failures[rank] for rank in sorted(failures)]
    controller = getattr(error, "controller_failure", None)
    return [controller] if isinstance(controller, BaseException) else [error]


def _task_error(error: BaseException) -> bool:
    """Whether `error` is what `ray.get` raises for an exception in a task: a RayTaskError holding it as `cause`."""
    return any(c.__name__ == "RayTaskError" for c in type(error).__mro__) and isinstance(
        getattr(error, "cause", None), BaseException
    )


def _user_exception(error: BaseException) -> BaseException | None:
    """The exception the job's code raised, when `error` is one (Ray wraps it with its traceback string)."""
    if type(error).__name__ in ("UserExceptionWithTraceback", "TaskException"):
        return getattr(error, "_base_exc", None) or error
    if _task_error(error):
        return _user_exception(error.cause)  # a plain task's exception (the task executor: executor.run_in_task)
    if type(error).__module__.startswith("ray."):
        return None  # an actor that died, a health check, a scheduling error: Ray's own
    return error  # local mode: the loop's exception, raised as is


def _infrastructure(exc: BaseException) -> bool:
    if isinstance(exc, NonFiniteLoss):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) and not isinstance(
        exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
    ):
        return True
    module = type(exc).__module__
    if module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")):
        return True
    text = str(exc).lower()
    return type(exc).__name__ in ("DistBackendError", "DistNetworkError") or any(
        h in text for h in _INFRASTRUCTURE_HINTS
    )


def _traceback_of(error: BaseException) -> str | None:
    text = getattr(error, "_traceback_str", None)  # a task error hands this on from its cause, a TaskException
    return text if isinstance(text, str) else None


def decide(error: BaseException, failures: int, config: FailureSpec) -> Decision:
    """RETRY or FAIL after a failed attempt; `failures` counts the retries already spent."""
    errors = _worker_errors(error)
    users = [(e, u) for e in errors if (u := _user_exception(e)) is not None]
    final = next((u for _, u in users if isinstance(u, (LeaseLost, JobExited))), None)
    if final is not None:  # it would only happen again (an exit), or must not (another run holds the directory)
        wrapper = next(w for w, u in users if u is final)
        return Decision(Action.FAIL, str(final), _traceback_of(wrapper) if isinstance(final, JobExited) else None)
    # The data's fault, or the loss's: the same data fails a restart the same way, retry_exceptions or not (a
    # corrupt Parquet page raises OSError, which read as a lost connection, and was retried to the budget).
    deterministic = next((u for _, u in users if isinstance(u, (NonFiniteLoss, DataError))), None)
    if deterministic is not None:
        return Decision(Action.FAIL, one_line(deterministic))
    died = [e for e in errors if _user_exception(e) is None]
    code = [(e, u) for e, u in users if not _infrastructure(u)]
    limit = config.max_failures
    left = limit < 0 or failures < limit
    budget = "unlimited" if limit < 0 else f"{failures + 1}/{limit}"
    if died or not code:
        # A dead rank wins over its peers' errors: when one rank dies the others fail in their collectives.
        cause = one_line(died[0] if died else users[0][1] if users else error)
        if left:
            return Decision(Action.RETRY, f"a worker failed ({cause}); restart {budget} from the last checkpoint")
        return Decision(Action.FAIL, f"{cause} (after {failures} restart(s), failure.max_failures={limit})")
    wrapper, exc = code[0]
    if config.retry_exceptions and left:
        return Decision(
            Action.RETRY, f"{one_line(exc)}; restart {budget} (failure.retry_exceptions)", _traceback_of(wrapper)
        )
    return Decision(Action.FAIL, one_line(exc), _traceback_of(wrapper))


def job_exit_code(error: BaseException) -> int | None:
    """The code of a job's own `sys.exit`/`os._exit` that ended a fit (JobExited in any executor's wrapping), else None."""
    seen = error
    while seen is not None:
        for e in _worker_errors(seen):
            user = _user_exception(e)
            if isinstance(user, JobExited):
                return user.code
        seen = seen.__cause__
    return None
