"""When trials stop early or change (FIFO, ASHA, PBT), how trials are drawn (variant generator, Optuna), what each reserves."""

from __future__ import annotations

from typing import Any

from orchestrator.errors import BadInput
from orchestrator.spec import JobSpec, SweepSpec
from orchestrator.sweep.space import tune_domain


def default_max_t(sweep: SweepSpec, spec: JobSpec) -> int:
    """ASHA's horizon when the job file gives none: the trial's length in the scheduler's clock."""
    s = sweep.scheduler
    if s.max_t is not None:
        return s.max_t
    if s.time_attr == "epoch" or (s.time_attr == "training_iteration" and not spec.validation.every_n_steps):
        return spec.train.epochs
    if s.time_attr == "step" and spec.train.max_steps:
        return spec.train.max_steps
    raise BadInput(
        f"sweep.scheduler.max_t: required with time_attr={s.time_attr} (the trial's length in that clock is not known before it runs)"
    )


def trial_length(sweep: SweepSpec, spec: JobSpec) -> float | None:
    """How long a trial runs in the scheduler's clock, when the job file says (None when only the data knows)."""
    t = sweep.scheduler.time_attr
    if t == "epoch" or (t == "training_iteration" and not spec.validation.every_n_steps):
        return spec.train.epochs if not spec.train.max_steps else None
    if t == "step" and spec.train.max_steps:
        return spec.train.max_steps
    return None


def mutation_space(sweep: SweepSpec) -> dict[str, Any]:
    """PBT's hyperparam_mutations: lists for choice/grid values, Tune domains for ranges."""
    out = {}
    for path, param in (sweep.scheduler.mutations or sweep.parameters).items():
        out[path] = list(param.values) if param.values is not None else tune_domain(param)
    return out


def build_scheduler(sweep: SweepSpec, spec: JobSpec):
    """FIFO, ASHA or PBT, acting on the metric the loop reports after every validation."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    if s.name == "asha":
        max_t, length = default_max_t(sweep, spec), trial_length(sweep, spec)
        if length is not None and max_t >= length and s.grace_period < length:
            # Trials end by themselves (with their last checkpoint); a rung at their last report would decide
            # nothing, so the horizon goes just below it and the top rung with it.
            return ASHAScheduler(
                time_attr=s.time_attr,
                max_t=length - 1e-6,
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
                stop_last_trials=False,
            )
        return ASHAScheduler(
            time_attr=s.time_attr, max_t=max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor
        )
    if s.name == "pbt":
        return PopulationBasedTraining(
            time_attr=s.time_attr,
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=mutation_space(sweep),
            quantile_fraction=s.quantile_fraction,
        )
    return FIFOScheduler()


def build_search(sweep: SweepSpec):
    """Tune's search algorithm: its variant generator (random, grid) or Optuna, each running at most max_concurrent_trials."""
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.seed), max_concurrent=sweep.max_concurrent_trials)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=sweep.max_concurrent_trials, random_state=sweep.seed)


def trial_resources(spec: JobSpec) -> dict[str, float]:
    """What one trial reserves: its loop's CPUs (and GPU) when it trains in the trial's process, nothing when Ray Train's workers reserve their own."""
    if spec.scaling.max_workers > 1:
        return {"CPU": 0.01}  # the trial only waits on its Ray Train run (Tune refuses an empty request)
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker or 1
    return resources
