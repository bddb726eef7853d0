"""Tune's search space of a sweep section (pure): one Tune domain per searched field."""

from __future__ import annotations

from typing import Any

from orchestrator.spec import ParamSpec, SweepSpec


def tune_domain(param: ParamSpec, enumerate_choices: bool = False):
    """The Tune search-space object of one parameter."""
    from ray import tune

    if param.type == "grid" or (param.type == "choice" and enumerate_choices):
        return tune.grid_search(list(param.values))
    if param.type == "choice":
        return tune.choice(list(param.values))
    if param.type == "uniform":
        return tune.uniform(param.low, param.high)
    if param.type == "loguniform":
        return tune.loguniform(param.low, param.high)
    if param.type == "randint":
        return tune.randint(int(param.low), int(param.high) + 1)  # Tune's upper bound is exclusive; ours is included
    return tune.qloguniform(param.low, param.high, param.q)


def build_param_space(sweep: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: one entry per dotted field (PBT mutations not otherwise searched start sampled)."""
    space = {
        path: tune_domain(param, enumerate_choices=sweep.search == "grid") for path, param in sweep.parameters.items()
    }
    if sweep.scheduler.name == "pbt":
        from ray import tune

        for path, param in sweep.scheduler.mutations.items():
            if path not in space:
                space[path] = tune.choice(list(param.values)) if param.values is not None else tune_domain(param)
    return space
