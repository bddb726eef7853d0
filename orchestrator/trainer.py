"""Ray Train for a job, as the executors use it (see executor): the TorchTrainer's arguments (pure), the trainer
less Ray Train's idle helper actors, and the restarts that `failure.decide` asks for.

Render, then act: `build_trainer_kwargs` is a pure function of the spec; executor.run_in_group runs it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from orchestrator.failure import Action, decide
from orchestrator.spec import JobSpec

T = TypeVar("T")
log = logging.getLogger(__name__)


def ray_datasets(spec: JobSpec, base_dir: str | None) -> dict[str, Any]:
    """The TorchTrainer's `datasets`: the train split as Ray Data with data.engine=ray, else none (needs a running Ray).

    Ray Train's default DataConfig streaming_splits it across the worker group, equal rows per worker.
    """
    if spec.data.engine != "ray":
        return {}
    from orchestrator.data.raydata import train_dataset

    return {"train": train_dataset(spec, base_dir)}


def loop_config_of(
    spec: JobSpec,
    run_uri: str,
    base_dir: str | None,
    tracking_config: dict[str, Any] | None,
    lease: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a host of our loop is handed (executor.host_loop): the job, where the run is, trackers, the lease to check.

    Where rank 0's progress events go is the executor's to add (see events.py): none, and it prints their lines."""
    config: dict[str, Any] = {"job": spec.to_dict(), "run_uri": run_uri, "base_dir": base_dir}
    if tracking_config:
        config["tracking"] = tracking_config
    if lease:
        config["lease"] = lease
    return config


def build_trainer_kwargs(
    spec: JobSpec,
    loop_config: dict[str, Any],
    ray_storage: str,
    run_name: str,
    loops: tuple[Callable[[dict[str, Any]], None], Callable[[dict[str, Any]], None]],
) -> dict[str, Any]:
    """TorchTrainer arguments for a job (pure: no Ray calls): `loops` are (our loop's worker, a user loop's worker).

    `loop_config` is our loop's (`loop_config_of`); a user's loop gets the job's `config` section and where its
    reports are recorded instead (orchestrator.byo), and checkpoints through Ray's own storage. `scaling.num_workers: 0` is Ray Train's local mode (in this process).
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
    own_loop, user_loop = loops
    if spec.entrypoint:
        from orchestrator.byo import own_loop_config

        loop = user_loop
        config = own_loop_config(
            spec.entrypoint,
            dict(spec.config),
            loop_config.get("base_dir"),
            loop_config["run_uri"],
            spec.checkpoint.endpoint_url,
            loop_config.get("events"),
        )
        config["lease"] = loop_config.get("lease")
        storage_path = spec.checkpoint.storage  # a user loop checkpoints through Ray's own storage
    else:
        loop, config, storage_path = own_loop, loop_config, ray_storage
    # Ray's worker-group retries off: `fit_with_decisions` decides what a failure means (orchestrator/failure.py).
    run_config = RunConfig(name=run_name, storage_path=storage_path, failure_config=FailureConfig(max_failures=0))
    return {
        "train_loop_per_worker": loop,
        "train_loop_config": config,
        "scaling_config": scaling,
        "run_config": run_config,
    }


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

        def _register_sigint_handler(self, controller):
            """None here: Ctrl-C is the run session's to handle, which records the run as interrupted (see session)."""

        def _initialize_and_run_controller(self, **kwargs):
            if lean_policy is not None and "scaling_policy" in kwargs:
                kwargs["scaling_policy"] = lean_policy(kwargs["scaling_policy"])
            return super()._initialize_and_run_controller(**kwargs)

    LeanTrainer.__name__ = LeanTrainer.__qualname__ = f"Lean{trainer_class.__name__}"
    return LeanTrainer


class RunFailedForGood(Exception):
    """A fit that `decide` said not to retry; the message is the decision's one-line reason."""


def fit_with_decisions(attempt: Callable[[], T], spec: JobSpec, say, log_only=None) -> T:
    """Run `attempt`, and after each failure ask `failure.decide`: again from the last checkpoint, or fail with its reason.

    Each attempt starts the loop anew (a new trainer, task or call), and the loop restores the latest committed
    checkpoint first. The job's own traceback goes to the log (the run's log file), the one-line reason to the console.
    """
    failures = 0
    while True:
        try:
            return attempt()
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
