"""The TorchTrainer a run builds: which of Ray Train's helper actors it leaves out, and where it keeps them."""

from __future__ import annotations

import pytest
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from orchestrator.executor import Executor, choose_executor
from orchestrator.spec import build_spec
from orchestrator.trainer import lean_trainer_class


def _loop(config):  # never run: the callbacks are decided when the trainer is built
    raise AssertionError


def _callback_types(embedded: bool, own_loop: bool, **trainer_kwargs) -> set[type]:
    trainer = lean_trainer_class(TorchTrainer, embedded=embedded, own_loop=own_loop)(_loop, **trainer_kwargs)
    assert isinstance(trainer, TorchTrainer)
    return {type(cb) for cb in trainer._create_default_callbacks()}


@pytest.mark.parametrize(
    "embedded, own_loop, datasets_kept, cleaner_kept",
    [
        (True, True, False, False),  # the default job on an embedded Ray: neither helper has work
        (False, True, False, True),  # attached to a cluster that outlives us: its placement groups need the cleaner
        (True, False, True, False),  # a bring-your-own loop may ask for dataset shards
        (False, False, True, True),  # nothing to leave out: Ray's own trainer
    ],
)
def test_only_idle_helper_actors_are_left_out(embedded, own_loop, datasets_kept, cleaner_kept):
    kinds = _callback_types(embedded, own_loop)
    assert (DatasetsCallback in kinds) is datasets_kept
    assert (PlacementGroupCleanerCallback in kinds) is cleaner_kept
    assert len(kinds) >= 3  # the rest of Ray's defaults (accelerators, backend, ...) stay


def test_a_sweep_trial_keeps_the_placement_group_cleaner_on_an_embedded_ray():
    # A trial that the scheduler stops takes its controller with it while the sweep's Ray goes on: without
    # the cleaner its workers' placement group would hold their CPUs until the sweep ends.
    trainer = lean_trainer_class(TorchTrainer, embedded=True, own_loop=True, in_sweep=True)(_loop)
    kinds = {type(cb) for cb in trainer._create_default_callbacks()}
    assert PlacementGroupCleanerCallback in kinds and DatasetsCallback not in kinds


def test_a_trainer_given_ray_datasets_keeps_its_dataset_manager():
    # A callable stands for the dataset: the trainer only keeps it until its workers ask for shards.
    kinds = _callback_types(embedded=True, own_loop=True, datasets={"train": lambda: None})
    assert DatasetsCallback in kinds and PlacementGroupCleanerCallback not in kinds


class _ControllerArgs(TorchTrainer):
    """A TorchTrainer that shows what it would start its controller with, instead of starting it."""

    def _initialize_and_run_controller(self, **kwargs):
        return kwargs


@pytest.mark.parametrize(
    "embedded, workers, coordinator_kept",
    [
        (True, 2, False),  # one node of fixed size, no autoscaler to tell what the run needs
        (False, 2, True),  # a cluster's autoscaler (KubeRay) scales on those requests
        (True, (1, 2), True),  # the elastic policy reads the free resources from the coordinator
    ],
)
def test_the_autoscaling_coordinator_is_left_out_only_for_a_fixed_size_run_on_an_embedded_ray(
    embedded, workers, coordinator_kept
):
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy

    scaling = ScalingConfig(num_workers=workers)
    trainer = lean_trainer_class(_ControllerArgs, embedded=embedded, own_loop=True)(_loop, scaling_config=scaling)
    policy = trainer._initialize_and_run_controller(scaling_policy=create_scaling_policy(scaling))["scaling_policy"]
    assert policy.scaling_config is scaling
    # The policy asks the coordinator when the controller starts and again before each worker group.
    asked = []
    policy._coordinator_client = type(
        "Client", (), {"__getattr__": lambda self, name: lambda *a, **k: asked.append(name)}
    )()
    policy._send_resource_request()
    policy._maybe_send_resource_request()
    assert bool(asked) is coordinator_kept


@pytest.mark.parametrize(
    "overrides, in_sweep, executor",
    [
        ([], False, Executor.TASK),  # the default job: one worker, nothing for Ray Train to coordinate, on any cluster
        (["scaling.num_workers=0"], False, Executor.DRIVER),  # local mode: the loop in the driver
        (["scaling.num_workers=2"], False, Executor.GROUP),  # a group to form and a collective to join
        (["scaling.num_workers=[1,2]"], False, Executor.GROUP),  # elastic: Ray Train resizes the group
        (["entrypoint=mymod:train_loop"], False, Executor.GROUP),  # a user's loop calls ray.train itself
        (["entrypoint=mymod:train_loop", "scaling.num_workers=0"], False, Executor.DRIVER),  # Ray Train's local mode
        ([], True, Executor.DRIVER),  # a sweep trial of one worker: in the trial's process
        (["scaling.num_workers=2"], True, Executor.GROUP),
    ],
)
def test_the_executor_is_chosen_by_the_job_alone(overrides, in_sweep, executor):
    spec = build_spec({"name": "t", "data": {"name": "digits"}, "scaling": {"num_workers": 1}}, overrides)
    assert choose_executor(spec, in_sweep=in_sweep) is executor
