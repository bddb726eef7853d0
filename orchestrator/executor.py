"""Where a run's loop runs: the executor, chosen once by a rule, and one host function per executor.

The rule (the README's "Where the loop runs"; run.json records the choice as `executor`), from the job alone,
never from the state of a cluster:

- `driver`: the loop in the process that drives the run: `scaling.num_workers: 0` under `orchestrator run`;
  a sweep's trial (or a cv fold) of at most one worker, in the trial's own process.
- `task`: one plain Ray task: `orchestrator run` of one fixed worker, the built-in loop, data read natively.
  Ray places it like any task (CPUs, a GPU) on whatever cluster it runs; failures restart it from the last
  checkpoint (`trainer.fit_with_decisions`). Ray Train would add a controller, a worker group and its
  collectives to form, a synchronization actor: nothing a group of one uses.
- `group`: Ray Train's worker group: several or elastic workers, a user's own loop (`entrypoint`, which
  calls ray.train itself), data.engine ray (Ray Data's split across the group).

`host_loop` is the one place the loop is hosted, whatever the executor: the context, rank 0's trackers and
progress events, the lease check before commits, the device (`pick_device`), and a user's `sys.exit` or
`os._exit` turned into a failure the driver records. Each executor hands rank 0's progress events to the
driver's console on a channel of its own (events.py): straight, streamed from the task, or by a mailbox actor.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from orchestrator.events import Sink, take_events, yield_events
from orchestrator.failure import JobExited, TaskException
from orchestrator.provenance import device_facts
from orchestrator.spec import JobSpec
from orchestrator.tracking import create_tracker


class Executor(str, Enum):
    """Where the loop runs; the value is what run.json says."""

    DRIVER = "driver"
    TASK = "task"
    GROUP = "group"

    def __str__(self) -> str:
        return self.value


RULES = {
    Executor.DRIVER: "the loop in this process (scaling.num_workers 0, or a sweep trial of at most one worker)",
    Executor.TASK: "one Ray task (one fixed worker, the built-in loop, native data)",
    Executor.GROUP: "Ray Train's worker group (several or elastic workers, a user's loop, or data.engine ray)",
}


def choose_executor(spec: JobSpec, in_sweep: bool = False) -> Executor:
    """The executor of a run by the rule above: from the job alone, decided once, before anything starts."""
    workers = spec.scaling.num_workers
    if in_sweep:
        return Executor.DRIVER if spec.scaling.max_workers <= 1 and not spec.entrypoint else Executor.GROUP
    if workers == 0:
        return Executor.DRIVER
    fixed_one = isinstance(workers, int) and workers == 1
    if fixed_one and not spec.entrypoint and spec.data.engine != "ray":
        return Executor.TASK
    return Executor.GROUP


def pick_device(spec: JobSpec, ray_train: bool = False):
    """The device of this rank: the CPU unless the job asks for a GPU and one is visible.

    Ray makes a task's (or a trial's) GPU the first visible one; in Ray Train's group the workers of a node
    see the node's GPUs together, and Ray Train says which is this rank's.
    """
    import torch

    if not spec.scaling.use_gpu or not torch.cuda.is_available():
        return torch.device("cpu")
    if ray_train:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda", 0)


@dataclass
class LoopOutcome:
    """What a run's executor hands back to its session: the last metrics the loop reported and where it ran."""

    metrics: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# The loop's host, on whichever process runs it


@contextlib.contextmanager
def exits_as_errors() -> Iterator[None]:
    """A `sys.exit(n)` or `os._exit(n)` of the job's code, on this thread, raised as JobExited: a failure with its code.

    Left alone, `os._exit` would end the process (the driver, with no record of the run; a Ray worker, which
    Ray would take for a crash worth a restart) and `sys.exit` in a Ray Train worker would end its thread as
    if training were done. Other threads and forked children keep the real `os._exit`.
    """
    real_exit, pid, thread = os._exit, os.getpid(), threading.get_ident()

    def job_exit(code: int = 0) -> None:
        if os.getpid() != pid or threading.get_ident() != thread:
            real_exit(code)
        raise JobExited(code, "os._exit")

    os._exit = job_exit
    try:
        yield
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
        raise JobExited(code or 0, "sys.exit") from None
    finally:
        os._exit = real_exit


def host_loop(
    spec: JobSpec,
    config: dict[str, Any],
    rank: int,
    world_size: int,
    device,
    report: Callable[[dict[str, Any]], None],
    shard=None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    progress: Sink | None = None,
):
    """The job's loop on this rank: rank 0 also tracks and hands its progress events to `progress` (else prints
    their lines); every commit checks the lease."""
    from orchestrator.loop import LoopContext, run_training  # torch: on the worker, not where a run is planned

    tracker = create_tracker(config.get("tracking"), spec.checkpoint.endpoint_url) if rank == 0 else None
    ctx = LoopContext(
        run_uri=config["run_uri"],
        rank=rank,
        world_size=world_size,
        device=device,
        report=report,
        base_dir=config.get("base_dir"),
        track=tracker,
        progress=progress,
        train_shard=shard,
        lease=config.get("lease"),
        **({"should_stop": should_stop} if should_stop else {}),
        **({"log": log} if log else {}),
    )
    try:
        with exits_as_errors():
            return run_training(spec, ctx)
    finally:
        if tracker is not None:
            tracker.close()


def user_loop_worker(config: dict[str, Any]) -> None:
    """Bring-your-own loop: the user's train_loop_per_worker on the worker, its reports recorded as the run's steps."""
    from orchestrator.byo import run_own_loop

    with exits_as_errors():
        run_own_loop(config)


def _placement(placed: list[tuple[str, list[str]]]) -> dict[str, Any]:
    return {
        "placement_world_size": len(placed),
        "placement_hosts": len({host for host, _ in placed}),
        "placement_gpus": ",".join(name for _, names in placed for name in names),
    }


def _this_host() -> dict[str, Any]:
    return _placement([(socket.gethostname(), device_facts()["gpus"])])


# ----------------------------------------------------------------------------------------------
# driver: the loop in this process


@dataclass
class DriverHooks:
    """What the process hosting a `driver` loop gives it: where reports go, when to stop, where lines go."""

    report: Callable[[dict[str, Any]], None] | None = None  # a sweep trial's reporter; else the last report is kept
    should_stop: Callable[[], bool] | None = None
    log: Callable[[str], None] | None = None
    run_name: str = "run"  # a user's loop: the name of Ray Train's run (its local mode)
    close: Callable[[bool], None] | None = None  # after the loop: True when it ended well (a reporter then flushes)


def run_in_driver(
    spec: JobSpec, config: dict[str, Any], hooks: DriverHooks | None = None, events: Sink | None = None
) -> LoopOutcome:
    """The loop in this process, rank 0 of 1, its progress events straight to `events`; a user's loop through Ray
    Train's local mode (it calls ray.train), in this process too."""
    hooks = hooks or DriverHooks()
    if spec.entrypoint:
        from ray.train.torch import TorchTrainer

        from orchestrator.trainer import build_trainer_kwargs

        config = {**config, "events": events} if events else config
        kwargs = build_trainer_kwargs(spec, config, _ray_storage(), hooks.run_name, _loops())
        result = TorchTrainer(**kwargs).fit()
        return _outcome_of(result)
    last: dict[str, Any] = {}

    def keep(metrics: dict[str, Any]) -> None:  # the session reads the run's outcome from its checkpoints
        last.clear()
        last.update(metrics)
        if hooks.report is not None:
            hooks.report(metrics)

    try:
        host_loop(
            spec, config, 0, 1, pick_device(spec), keep, should_stop=hooks.should_stop, log=hooks.log, progress=events
        )
    except BaseException:
        if hooks.close is not None:
            hooks.close(False)
        raise
    if hooks.close is not None:
        hooks.close(True)
    return LoopOutcome(metrics=dict(last), placement=_this_host())


# ----------------------------------------------------------------------------------------------
# task: one plain Ray task


def one_task_worker(config: dict[str, Any], stream_events: bool):
    """The loop as a run's only worker, in a plain Ray task (a streaming generator): with `stream_events` rank 0's
    progress events as the loop makes them, then what it last reported (see events.yield_events)."""
    yield from yield_events(lambda events: _one_task_loop(config, events), stream_events)


def _one_task_loop(config: dict[str, Any], events: Sink | None) -> dict[str, Any]:
    """The loop as rank 0 of 1 in this task; returns what it last reported."""
    spec = JobSpec.model_validate(config["job"])
    device = pick_device(spec)
    # For the run's log (the console keeps a worker's own lines out): where the run's one worker is.
    print(f"rank 0 of 1 on {socket.gethostname()}, device {device}", flush=True)
    last: dict[str, Any] = {}

    def report(metrics: dict[str, Any]) -> None:
        last.clear()
        last.update(metrics)

    try:
        host_loop(spec, config, 0, 1, device, report, progress=events)
    except Exception as exc:
        raise TaskException(exc, traceback.format_exc()) from None
    return {**last, **_this_host()}


def run_in_task(spec: JobSpec, config: dict[str, Any], events: Sink | None = None) -> LoopOutcome:
    """One attempt of the run as one Ray task, which streams rank 0's progress events to `events` in order, all of
    them before its result or its error; cancelled (forced) when this process is interrupted."""
    import ray

    scaling = spec.scaling
    gpus = (scaling.gpus_per_worker or 1) if scaling.use_gpu else 0
    # No retries of Ray's: `fit_with_decisions` decides, and a new task resumes from the last checkpoint.
    task = ray.remote(num_cpus=scaling.cpus_per_worker, num_gpus=gpus, max_retries=0, num_returns="streaming")
    generator = task(one_task_worker).remote(config, events is not None)
    try:
        reported = take_events(generator, events or (lambda event: None))
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, a lost lease (see session): the task stops with the driver
        ray.cancel(generator, force=True)
        raise
    return LoopOutcome(metrics=reported, placement={k: v for k, v in reported.items() if k.startswith("placement_")})


# ----------------------------------------------------------------------------------------------
# group: Ray Train's worker group


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: rebuild the spec, then host the loop with Ray's context."""
    import ray.train
    from ray.train import CheckpointUploadMode

    from orchestrator.loop.evaluate import all_gather  # torch: on the worker, not where a run is planned

    spec = JobSpec.model_validate(config["job"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Where the run really ran (elastic groups change it): rank 0 passes it to the driver with every report.
    placement = _placement(all_gather((socket.gethostname(), device_facts()["gpus"]), world_size))

    def report(metrics: dict[str, Any]) -> None:
        # ASYNC: the result waits for the controller's poll on Ray's upload thread, not on this one (no checkpoint rides along).
        ray.train.report({**metrics, **placement}, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    # data.engine=ray: Ray Train's streaming split of the train dataset `ray_datasets` handed the trainer.
    shard = ray.train.get_dataset_shard("train") if spec.data.engine == "ray" else None
    events = config.get("events")  # an events.EventSender to the driver's mailbox
    try:
        host_loop(spec, config, rank, world_size, pick_device(spec, ray_train=True), report, shard, progress=events)
    finally:
        if hasattr(events, "flush"):  # the driver takes the mailbox's last events once the fit has returned
            events.flush()


@dataclass
class GroupHooks:
    """How this process runs a Ray Train group: on a Ray it started, inside a sweep, with Tune's callback."""

    embedded: bool = False
    in_sweep: bool = False
    callbacks: list[Any] = field(default_factory=list)
    run_name: str = "run"  # Ray Train's name of the run (its storage of results under a temporary directory)


def run_in_group(
    spec: JobSpec, config: dict[str, Any], hooks: GroupHooks | None = None, events: Sink | None = None
) -> LoopOutcome:
    """One attempt of the run as Ray Train's TorchTrainer (our lean one: see trainer.lean_trainer_class); `events`
    is what rank 0 sends its progress events to (an events.EventSender: the group is in other processes)."""
    import dataclasses

    from ray.train.torch import TorchTrainer

    from orchestrator.ray_runtime import train_environment
    from orchestrator.trainer import build_trainer_kwargs, lean_trainer_class, ray_datasets

    hooks = hooks or GroupHooks()
    config = {**config, "events": events} if events else config
    kwargs = build_trainer_kwargs(spec, config, _ray_storage(), hooks.run_name, _loops())
    if hooks.callbacks:
        kwargs["run_config"] = dataclasses.replace(kwargs["run_config"], callbacks=hooks.callbacks)
    trainer_class = lean_trainer_class(
        TorchTrainer, embedded=hooks.embedded, own_loop=not spec.entrypoint, in_sweep=hooks.in_sweep
    )
    with train_environment(embedded=hooks.embedded):
        datasets = ray_datasets(spec, config.get("base_dir"))
        return _outcome_of(trainer_class(**kwargs, datasets=datasets).fit())


def _outcome_of(result) -> LoopOutcome:
    metrics = dict(result.metrics or {})
    return LoopOutcome(
        metrics=metrics,
        placement={k: v for k, v in metrics.items() if k.startswith("placement_")},
    )


def _loops() -> tuple[Callable, Callable]:
    return train_worker, user_loop_worker


def _ray_storage() -> str:
    return os.path.join(tempfile.gettempdir(), "orchestrator-ray")


HOSTS = {Executor.DRIVER: run_in_driver, Executor.TASK: run_in_task, Executor.GROUP: run_in_group}
