"""The job's `sweep` section: searched parameters, the Tune scheduler, the search."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.spec.common import FLOAT_RE, MAX_SEED, RUN_NAME_RE
from orchestrator.spec.sections import Section

PARAM_TYPES = ("choice", "grid", "uniform", "loguniform", "randint", "qloguniform")
_MAX_METRICS = ("accuracy", "f1", "roc_auc", "r2")
# PBT mutates a running trial and restores its weights: only settings that leave the weights' shapes alone.
PBT_MUTABLE = (
    "optim.lr",
    "optim.weight_decay",
    "optim.momentum",
    "optim.betas",
    "optim.eps",
    "optim.alpha",
    "schedule.",
    "model.dropout",
    "data.augment.",
    "train.clip_grad_norm",
)


class ParamSpec(Section):
    """One searched field of the job: `choice`/`grid` take `values`, the ranges take `low` and `high`."""

    type: Literal["choice", "grid", "uniform", "loguniform", "randint", "qloguniform"] = Field(
        description="choice (sampled from values), grid (every value), uniform, loguniform, randint (integers, high included) or qloguniform (log scale, rounded to q)."
    )
    values: list[Any] | None = Field(None, description="The values (choice, grid).")
    low: float | None = Field(None, description="Lower bound (uniform, loguniform, randint, qloguniform).")
    high: float | None = Field(None, description="Upper bound, included (uniform, loguniform, randint, qloguniform).")
    q: float | None = Field(None, gt=0, description="Quantum (qloguniform): values are multiples of q.")

    @field_validator("values")
    @classmethod
    def _numbers(cls, v: list[Any] | None) -> list[Any] | None:
        # YAML 1.1 reads 1e-4 as a string; every user means the number.
        return None if v is None else [float(x) if isinstance(x, str) and FLOAT_RE.match(x) else x for x in v]

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"values: a {self.type} needs at least one value")
            extra = [k for k in ("low", "high", "q") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{extra[0]}: applies to ranges, not {self.type} (use values)")
            return self
        if self.values is not None:
            raise ValueError(f"values: applies to choice and grid, not {self.type} (use low and high)")
        if self.low is None or self.high is None:
            raise ValueError(f"low and high: required for {self.type}")
        if self.low > self.high:
            raise ValueError(f"low: {self.low:g} is above high={self.high:g}")
        if self.type in ("loguniform", "qloguniform") and self.low <= 0:
            raise ValueError(f"low: {self.type} needs low > 0, got {self.low:g}")
        if self.type == "randint" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("low and high: randint needs integers")
        if self.type == "qloguniform" and self.q is None:
            raise ValueError("q: required for qloguniform")
        if self.type != "qloguniform" and self.q is not None:
            raise ValueError(f"q: applies to qloguniform, not {self.type}")
        return self

    def sample_values(self) -> list[Any]:
        """Values that stand for the whole space when validating a job with them (every value, or both ends)."""
        if self.values is not None:
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class SchedulerSpec(Section):
    name: Literal["fifo", "asha", "pbt"] = Field(
        "fifo",
        description="fifo (every trial runs to the end), asha (stops the weaker trials early) or pbt (population based training).",
    )
    time_attr: Literal["epoch", "step", "training_iteration"] = Field(
        "epoch", description="The clock of asha and pbt: reported epoch, optimizer step, or number of validations."
    )
    max_t: int | None = Field(
        None,
        ge=1,
        description="ASHA: the longest a trial runs, in time_attr units; null = train.epochs (or the trial's steps).",
    )
    grace_period: int = Field(
        1, ge=1, description="ASHA: the shortest a trial runs before it may be stopped, in time_attr units."
    )
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: 1 in reduction_factor trials goes on at each rung.")
    perturbation_interval: int = Field(2, ge=1, description="PBT: time_attr units between exploit/explore decisions.")
    quantile_fraction: float = Field(
        0.25,
        gt=0,
        le=0.5,
        description="PBT: the bottom fraction copies the top fraction's weights and mutates their settings.",
    )
    mutations: dict[str, ParamSpec] = Field(
        default_factory=dict, description="PBT: the dotted fields mutated and how; empty = the sweep's parameters."
    )

    @model_validator(mode="after")
    def _options_of_this_scheduler(self) -> SchedulerSpec:
        owners = {
            "max_t": "asha",
            "grace_period": "asha",
            "reduction_factor": "asha",
            "perturbation_interval": "pbt",
            "quantile_fraction": "pbt",
            "mutations": "pbt",
        }
        fields = type(self).model_fields
        # Only a value other than the default counts: a resolved job (every default written out) must load again.
        given = {
            k for k in self.model_fields_set if getattr(self, k) != fields[k].get_default(call_default_factory=True)
        }
        for option, owner in owners.items():
            if option in given and owner != self.name:
                raise ValueError(f"{option}: is an option of {owner}, not {self.name}")
        if self.name == "fifo" and "time_attr" in given:
            raise ValueError("time_attr: is an option of asha and pbt, not fifo")
        if self.name == "asha" and self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period: {self.grace_period} is above max_t={self.max_t}")
        for path in self.mutations:
            if not path.startswith(PBT_MUTABLE):
                raise ValueError(
                    f"mutations: {path} cannot change in a running trial (PBT keeps its weights and optimizer state); mutate {', '.join(p.rstrip('.') for p in PBT_MUTABLE)}"
                )
        return self


class SweepSpec(Section):
    name: str | None = Field(
        None,
        description="The sweep's directory under checkpoint.storage (trials are `<name>/<trial id>`); null = `<job name>-sweep`.",
    )
    parameters: dict[str, ParamSpec] = Field(
        default_factory=dict,
        validate_default=True,
        description="Searched fields by dotted path (`optim.lr`, `model.hidden`), each a choice, grid, uniform, loguniform, randint or qloguniform.",
    )
    num_samples: int = Field(
        1,
        ge=1,
        description="Trials drawn (random, optuna); with grid parameters, each grid point is repeated this many times.",
    )
    metric: str = Field("val_loss", description="The validation metric that ranks trials (and that ASHA/PBT act on).")
    mode: Literal["min", "max"] | None = Field(
        None, description="Whether the metric should go down (min) or up (max); null = from the metric name."
    )
    scheduler: SchedulerSpec = Field(
        default_factory=SchedulerSpec, description="When trials stop early or are mutated."
    )
    search: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="random (grid parameters crossed, the rest sampled), grid (every combination of choice/grid values) or optuna (Tune's Optuna search).",
    )
    max_concurrent_trials: int = Field(
        2, ge=1, description="Trials running at once; each takes scaling.num_workers x scaling.cpus_per_worker CPUs."
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed of the random and Optuna searches, 0..2**32-1 (null = a different draw each sweep).",
    )
    cv_folds: int | None = Field(
        None,
        ge=2,
        description="Score each trial by k-fold cross-validation: its k folds (data.folds=k, stratified for classification) "
        "train one after another in the trial, and its metric is their mean best validation value, the std and 95% CI "
        "beside it; fifo scheduler only; null = one validation split.",
    )

    @field_validator("name")
    @classmethod
    def _sweep_name(cls, v: str | None) -> str | None:
        if v is not None and not RUN_NAME_RE.match(v):
            raise ValueError("must be letters, digits, '_', '-' or '.', starting with a letter or digit")
        return v

    @field_validator("parameters")
    @classmethod
    def _some_parameters(cls, v: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not v:
            raise ValueError(
                "name at least one field to search, e.g. optim.lr: {type: loguniform, low: 1e-4, high: 1e-1}"
            )
        for path in v:
            if (
                path == "sweep"
                or path.startswith("sweep.")
                or path == "name"
                or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", path)
            ):
                raise ValueError(f"{path!r} is not a dotted field path of the job (e.g. optim.lr)")
        return v

    @model_validator(mode="after")
    def _search_fits(self) -> SweepSpec:
        if self.cv_folds is not None and self.scheduler.name != "fifo":
            raise ValueError(
                f"cv_folds: a k-fold trial's metric is known only after its last fold, so {self.scheduler.name} has nothing "
                "to act on; use scheduler fifo"
            )
        if self.cv_folds is not None and any(p.startswith("data.fold") for p in self.parameters):
            raise ValueError("cv_folds: every trial trains all k folds; data.folds and data.fold are not searched then")
        if self.mode is None:
            base = self.metric.removeprefix("val_")
            self.__dict__["mode"] = "max" if base in _MAX_METRICS else "min"
        if self.search == "grid":
            ranged = [p for p, s in self.parameters.items() if s.type not in ("choice", "grid")]
            if ranged:
                raise ValueError(
                    f"search: grid needs values to enumerate; {ranged[0]} is {self.parameters[ranged[0]].type} (use random or optuna)"
                )
        if self.search == "optuna":
            grids = [p for p, s in self.parameters.items() if s.type == "grid"]
            if grids:
                raise ValueError(f"search: optuna samples, it does not enumerate; {grids[0]} is grid (use choice)")
            if self.scheduler.name == "pbt":
                raise ValueError("search: pbt explores by itself; use random with scheduler pbt")
        if self.scheduler.name == "pbt":
            for path in self.scheduler.mutations or self.parameters:
                if not path.startswith(PBT_MUTABLE):
                    raise ValueError(
                        f"sweep.scheduler.mutations: {path} cannot change in a running trial (PBT keeps its weights and optimizer state); set scheduler.mutations to {', '.join(p.rstrip('.') for p in PBT_MUTABLE)}"
                    )
        return self

    @property
    def trial_count(self) -> int:
        """How many trials the sweep runs (grid points x num_samples)."""
        points = 1
        for p in self.parameters.values():
            if p.type == "grid" or (self.search == "grid" and p.type == "choice"):
                points *= len(p.values or [])
        return points * self.num_samples
