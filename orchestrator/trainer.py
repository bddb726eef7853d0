"""Ray Train for a job: the TorchTrainer's arguments (pure), the function its workers run, and the fit.

Render, then act: `build_trainer_kwargs` is a pure function of the spec; `fit` runs it.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any

from orchestrator.console import RunConsole, marker_progress
from orchestrator.failure import Action, TaskException, decide, one_line
from orchestrator.provenance import device_facts
from orchestrator.ray_runtime import train_environment
from orchestrator.runrecord import RunStatus
from orchestrator.spec import JobSpec
from orchestrator.tracking import create_tracker

log = logging.getLogger(__name__)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: rebuild the spec, then run the loop with Ray's context."""
    import ray.train
    import ray.train.torch
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
    _run_loop(spec, config, rank, world_size, ray.train.torch.get_device(), report, shard)


def _placement(placed: list[tuple[str, list[str]]]) -> dict[str, Any]:
    return {
        "placement_world_size": len(placed),
        "placement_hosts": len({host for host, _ in placed}),
        "placement_gpus": ",".join(name for _, names in placed for name in names),
    }


def _run_loop(spec: JobSpec, config: dict[str, Any], rank: int, world_size: int, device, report, shard) -> None:
    """The job's loop on a worker: rank 0 also tracks, and describes its progress for the driver's console."""
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
        progress=marker_progress() if config.get("events") else None,
        train_shard=shard,
    )
    try:
        run_training(spec, ctx)
    finally:
        if tracker is not None:
            tracker.close()


def runs_in_one_task(spec: JobSpec, one_node: bool) -> bool:
    """Whether a run's one worker is a plain Ray task of ours rather than Ray Train's worker group.

    A fixed-size run of one worker on a Ray of one node (an embedded Ray, or one `ray start --head` left
    up) has nothing for Ray Train's machinery to do: no group to form or re-form, no collective, no node
    to choose, no dataset to split; our loop does its own checkpoints, and `fit_with_decisions` its own
    restarts. Ray Train would still start its controller, its worker (each a fresh process through Ray's
    setup_worker.py: they carry a runtime environment, see ray_runtime.train_environment) and a
    synchronization actor before the first step; a plain task takes a worker Ray has prestarted or
    starts one plain process. Runs on a cluster of several nodes, of several or elastic workers, a
    user's own loop or data.engine=ray keep Ray Train.
    """
    workers = spec.scaling.num_workers
    return one_node and isinstance(workers, int) and workers == 1 and not spec.entrypoint and spec.data.engine != "ray"


def one_task_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The loop as a run's only worker, in a plain Ray task: rank 0 of 1; returns what it last reported."""
    import ray
    import torch

    spec = JobSpec.model_validate(config["job"])
    placement = _placement([(socket.gethostname(), device_facts()["gpus"])])
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave the task: the task's device is the first visible one.
    device = torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    # For the run's log (the console keeps a worker's own lines out): where the run's one worker is.
    print(f"rank 0 of 1 on {socket.gethostname()}, device {device}", flush=True)
    last: dict[str, Any] = {}

    def report(metrics: dict[str, Any]) -> None:  # the driver reads the run's outcome from its checkpoints
        last.clear()
        last.update(metrics)

    try:
        _run_loop(spec, config, 0, 1, device, report, None)
    except Exception as exc:
        raise TaskException(exc, traceback.format_exc()) from None
    return {**last, **placement}


@dataclass
class OneTaskResult:
    """What `fit` returns for a run in one task, in the shape of Ray Train's Result that the driver reads."""

    metrics: dict[str, Any]
    checkpoint: Any = None


class OneTaskRun:
    """A run's one worker as a plain Ray task (see `runs_in_one_task`): `fit()` as Ray Train's trainer has it."""

    def __init__(self, spec: JobSpec, loop_config: dict[str, Any]):
        self.spec, self.loop_config = spec, loop_config

    def fit(self) -> OneTaskResult:
        import ray

        scaling = self.spec.scaling
        gpus = (scaling.gpus_per_worker or 1) if scaling.use_gpu else 0
        # No retries of Ray's: `fit_with_decisions` decides, and a new task resumes from the last checkpoint.
        task = ray.remote(num_cpus=scaling.cpus_per_worker, num_gpus=gpus, max_retries=0)(one_task_worker)
        ref = task.remote(self.loop_config)
        try:
            return OneTaskResult(metrics=ray.get(ref))
        except KeyboardInterrupt:
            ray.cancel(ref, force=True)
            raise


def user_loop_worker(config: dict[str, Any]) -> None:
    """Bring-your-own loop: the user's train_loop_per_worker on the worker, its reports recorded as the run's steps."""
    from orchestrator.byo import run_own_loop

    run_own_loop(config)


def ray_datasets(spec: JobSpec, base_dir: str | None) -> dict[str, Any]:
    """The TorchTrainer's `datasets`: the train split as Ray Data with data.engine=ray, else none (needs a running Ray).

    Ray Train's default DataConfig streaming_splits it across the worker group, equal rows per worker.
    """
    if spec.data.engine != "ray":
        return {}
    from orchestrator.data.raydata import train_dataset

    return {"train": train_dataset(spec, base_dir)}


def loop_config_of(
    spec: JobSpec, run_uri: str, base_dir: str | None, tracking_config: dict[str, Any] | None, worker_events: bool
) -> dict[str, Any]:
    """What a worker of our loop is handed (`train_worker`, `one_task_worker`): the job, where the run is, trackers."""
    config: dict[str, Any] = {"job": spec.to_dict(), "run_uri": run_uri, "base_dir": base_dir}
    if tracking_config:
        config["tracking"] = tracking_config
    if worker_events:
        config["events"] = True
    return config


def build_trainer_kwargs(
    spec: JobSpec,
    run_uri: str,
    base_dir: str | None,
    ray_storage: str,
    run_name: str,
    tracking_config: dict[str, Any] | None = None,
    worker_events: bool = False,
) -> dict[str, Any]:
    """TorchTrainer arguments for a job (pure: no Ray calls).

    `tracking_config` lets rank 0 reach the run's trackers; with `worker_events` rank 0 describes its
    progress as marker lines for the driver's console instead of plain lines.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker or 1
    num_workers = spec.scaling.num_workers
    scaling = ScalingConfig(
        num_workers=tuple(num_workers) if isinstance(num_workers, (list, tuple)) else num_workers,
        use_gpu=spec.scaling.use_gpu,
        resources_per_worker=resources if num_workers != 0 else None,
    )
    if spec.entrypoint:
        from orchestrator.byo import own_loop_config

        loop, loop_config = (
            user_loop_worker,
            own_loop_config(
                spec.entrypoint, dict(spec.config), base_dir, run_uri, spec.checkpoint.endpoint_url, worker_events
            ),
        )
        storage_path = spec.checkpoint.storage  # a user loop checkpoints through Ray's own storage
    else:
        loop, loop_config = train_worker, loop_config_of(spec, run_uri, base_dir, tracking_config, worker_events)
        storage_path = ray_storage
    # Ray's worker-group retries off: `fit_with_decisions` decides what a failure means (orchestrator/failure.py).
    run_config = RunConfig(name=run_name, storage_path=storage_path, failure_config=FailureConfig(max_failures=0))
    return {
        "train_loop_per_worker": loop,
        "train_loop_config": loop_config,
        "scaling_config": scaling,
        "run_config": run_config,
    }


def fit(
    spec: JobSpec,
    run_uri: str,
    base_dir: str | None,
    run_name: str,
    tracking_config: dict[str, Any] | None,
    console: RunConsole,
    embedded: bool,
    worker_events: bool,
    local_mode: bool,
    one_node: bool = False,
) -> tuple[RunStatus, str | None, Any]:
    """Ray Train's fit of the job: (status, one-line error, Ray's result); a failure after Ray's retries is a failed run, not an exception."""
    try:
        if not local_mode:
            console.status(f"starting {spec.scaling.max_workers} worker(s)")
        if not local_mode and runs_in_one_task(spec, one_node):
            # Ray Train is not even imported (seconds of a 2-core machine's start-up).
            config = loop_config_of(spec, run_uri, base_dir, tracking_config, worker_events)
            trained = fit_with_decisions(lambda: OneTaskRun(spec, config), spec, console.message, console.log_only)
            return RunStatus.FINISHED, None, trained
        from ray.train.torch import TorchTrainer

        ray_storage = os.path.join(tempfile.gettempdir(), "orchestrator-ray")
        kwargs = build_trainer_kwargs(
            spec, run_uri, base_dir, ray_storage, run_name, tracking_config, worker_events=worker_events
        )
        trainer_class = lean_trainer_class(TorchTrainer, embedded=embedded, own_loop=not spec.entrypoint)
        with train_environment(embedded=embedded):
            datasets = ray_datasets(spec, base_dir)
            trained = fit_with_decisions(
                lambda: trainer_class(**kwargs, datasets=datasets), spec, console.message, console.log_only
            )
            return RunStatus.FINISHED, None, trained
    except Exception as exc:  # the run failed for good: record it, report it, keep what was committed
        return RunStatus.FAILED, str(exc) if isinstance(exc, RunFailedForGood) else one_line(exc), None


def lean_trainer_class(trainer_class: type, embedded: bool, own_loop: bool, in_sweep: bool = False) -> type:
    """`trainer_class` less the helper actors of Ray Train that a run of ours leaves idle.

    Ray Train 2.60 starts each of its helper actors as a fresh process (they carry a runtime
    environment; see ray_runtime.train_environment), one after another before the first step: seconds
    each on two cores. Two may have nothing to do. Ray Data's DatasetManager serves
    `ray.train.get_dataset_shard`: left out where our own loop is given no Ray datasets (it reads its
    data itself); a bring-your-own loop, or a trainer given datasets, keeps it. The
    PlacementGroupCleaner, a detached actor, removes the run's placement group if the controller
    dies; an embedded Ray dies with this process and its placement groups with it, but a sweep's trial
    (`in_sweep`) can be stopped while the sweep's Ray goes on, so there it stays. On an embedded Ray a
    fixed-size run also leaves out the autoscaling coordinator (see embedded_policy). Where Ray's
    internals are not as expected, Ray's defaults stay.
    """
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return trainer_class
    if not (own_loop or embedded) or not hasattr(trainer_class, "_create_default_callbacks"):
        return trainer_class

    lean_policy = None
    if embedded:
        try:
            from orchestrator.embedded_policy import without_coordinator as lean_policy
        except ImportError:  # Ray Train's internals are not as expected: its own policy stays
            pass

    class LeanTrainer(trainer_class):
        def _create_default_callbacks(self):
            idle = (DatasetsCallback,) if own_loop and not getattr(self, "datasets", None) else ()
            idle += (PlacementGroupCleanerCallback,) if embedded and not in_sweep else ()
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, idle)]

        def _initialize_and_run_controller(self, **kwargs):
            if lean_policy is not None and "scaling_policy" in kwargs:
                kwargs["scaling_policy"] = lean_policy(kwargs["scaling_policy"])
            return super()._initialize_and_run_controller(**kwargs)

    LeanTrainer.__name__ = LeanTrainer.__qualname__ = f"Lean{trainer_class.__name__}"
    return LeanTrainer


class RunFailedForGood(Exception):
    """A fit that `decide` said not to retry; the message is the decision's one-line reason."""


def fit_with_decisions(make_trainer, spec: JobSpec, say, log_only=None) -> Any:
    """Fit, and after each failure ask `failure.decide`: restart from the last checkpoint, or fail with its reason.

    Each restart is a new fit of a new trainer; the loop restores the latest committed checkpoint first.
    The job's own traceback goes to the log (the run's log file), the one-line reason to the console.
    """
    failures = 0
    while True:
        try:
            return make_trainer().fit()
        except Exception as exc:
            decision = decide(exc, failures, spec.failure)
            if decision.action is Action.FAIL or decision.traceback:
                # The full story for the run's log; the terminal gets the decision's one line.
                text = decision.traceback or "".join(traceback.format_exception(exc))
                (log_only or log.debug)(f"attempt {failures + 1} ended: {decision.reason}\n{text}")
            if decision.action is Action.FAIL:
                raise RunFailedForGood(decision.reason) from exc
            failures += 1
            say(decision.reason)
