"""`JobSpec`: the whole job, its cross-section checks, and the walk over its fields for the generated reference."""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from orchestrator.spec.common import (
    ALL_METRICS,
    CLASSIFICATION_METRICS,
    HOOK_RE,
    LM_METRICS,
    REGRESSION_METRICS,
    RUN_NAME_RE,
    _suggest,
)
from orchestrator.spec.sections import (
    CheckpointSpec,
    DataSpec,
    EarlyStoppingSpec,
    FailureSpec,
    ModelSpec,
    OptimSpec,
    ScalingSpec,
    ScheduleSpec,
    Section,
    TrackingSpec,
    TrainSpec,
    ValidationSpec,
)
from orchestrator.spec.sweep import SweepSpec


class JobSpec(Section):
    """A training job: everything a run needs, nothing secret."""

    name: str = Field(
        "job", description="Run name: the run's directory under checkpoint.storage; a rerun with the same name resumes."
    )
    entrypoint: str | None = Field(
        None, description="Bring-your-own loop: `module:function`, a Ray Train train_loop_per_worker(config)."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Passed as `config` to a bring-your-own loop.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The network.")
    data: DataSpec = Field(default_factory=DataSpec, description="The data and its splits.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="The optimizer.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="The learning-rate schedule.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="The loop.")
    validation: ValidationSpec = Field(
        default_factory=ValidationSpec, description="Validation split, cadence and metrics."
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        None, description="Stop when a validation metric stops improving (off when absent)."
    )
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Workers and their resources.")
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Where and how often checkpoints are written."
    )
    failure: FailureSpec = Field(default_factory=FailureSpec, description="Failure handling.")
    sweep: SweepSpec | None = Field(
        None, description="A hyper-parameter sweep of this job with Ray Tune (`orchestrator sweep`); `run` ignores it."
    )
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec,
        description="Experiment trackers: MLflow and TensorBoard (each on when its section is present).",
    )

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v):
            raise ValueError("must be letters, digits, '_', '-' or '.', starting with a letter or digit")
        return v

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, v: str | None) -> str | None:
        if v is not None and not HOOK_RE.match(v):
            raise ValueError(f"{v!r} is not of the form module:function")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        task = self.task
        if self.model.name == "gpt" and task != "lm":
            raise ValueError("model.name: gpt needs token data (data.task=lm)")
        if task == "lm" and self.model.name in ("mlp", "cnn", "resnet"):
            raise ValueError(f"model.name: {self.model.name} cannot model tokens; use gpt")
        if self.model.name == "gpt" and self.model.hidden % self.model.heads:
            raise ValueError(f"model.heads: {self.model.heads} does not divide model.hidden={self.model.hidden}")
        if (
            self.model.name in ("cnn", "resnet")
            and self.data.name not in ("digits",)
            and not HOOK_RE.match(self.data.name)
        ):
            raise ValueError(f"model.name: {self.model.name} needs image data (digits or a user dataset of images)")
        allowed = {"classification": CLASSIFICATION_METRICS, "regression": REGRESSION_METRICS, "lm": LM_METRICS}.get(
            task or "", ALL_METRICS
        )
        for m in self.validation.metrics or []:
            if m not in allowed:
                raise ValueError(f"validation.metrics: {m!r} does not apply to {task}; use {', '.join(allowed)}")
        watched = [
            ("schedule.metric", self.schedule.metric if self.schedule.name == "plateau" else None),
            ("early_stopping.metric", self.early_stopping.metric if self.early_stopping else None),
            ("checkpoint.best_metric", self.checkpoint.best_metric),
        ]
        names = [f"val_{m}" for m in allowed if m != "confusion_matrix"]
        for field_path, metric in watched:
            if metric is not None and metric not in names:
                raise ValueError(
                    f"{field_path}: {metric!r} is not a validation metric of this job{_suggest(metric, names)}; use one of {', '.join(names)}"
                )
        if self.validation.split == 0 and self.data.folds is None:
            # No validation split, no validation metric: what watches one would wait for ever, silently.
            for field_path, metric in watched:
                if metric is not None:
                    raise ValueError(
                        f"validation.split: 0 leaves no validation data, and {field_path} watches {metric}; "
                        "give validation.split a fraction (e.g. 0.2) or leave that out"
                    )
        if (
            self.early_stopping
            and self.checkpoint.best_metric
            and self.checkpoint.best_metric != self.early_stopping.metric
        ):
            raise ValueError(
                f"checkpoint.best_metric: {self.checkpoint.best_metric!r} differs from early_stopping.metric "
                f"{self.early_stopping.metric!r}; the best checkpoint is judged by the metric early stopping watches: set one"
            )
        if self.scaling.gpus_per_worker and not self.scaling.use_gpu:
            raise ValueError("scaling.gpus_per_worker: set scaling.use_gpu=true too")
        if self.data.engine == "ray" and self.scaling.num_workers == 0:
            # Local mode trains in the driver without a Ray cluster: there are no other CPUs for Ray Data to use.
            raise ValueError(
                "data.engine: ray streams to Ray Train workers; with scaling.num_workers=0 the loop runs in the driver: use engine native"
            )
        if self.scaling.strategy == "fsdp" and self.train.precision == "fp16":
            raise ValueError(
                "train.precision: fp16 needs a grad scaler over sharded gradients, which fsdp does not have here; use bf16"
            )
        if self.scaling.strategy == "fsdp" and self.entrypoint:
            raise ValueError(
                "scaling.strategy: fsdp shards the built-in loop's model; a user entrypoint shards its own"
            )
        if self.data.engine == "ray" and self.entrypoint:
            raise ValueError("data.engine: ray feeds the built-in loop; a user entrypoint reads its own data")
        return self

    @model_validator(mode="after")
    def _sweep_metric(self) -> JobSpec:
        if self.sweep is not None:
            names = [f"val_{m}" for m in self.metric_names() if m != "confusion_matrix"]
            if self.sweep.metric not in names:
                raise ValueError(
                    f"sweep.metric: {self.sweep.metric!r} is not a validation metric of this job{_suggest(self.sweep.metric, names)}; use one of {', '.join(names)}"
                )
        return self

    @property
    def task(self) -> str | None:
        """The task, known from the data source when it is built in."""
        if self.data.task:
            return self.data.task
        return "classification" if self.data.name == "digits" else None

    def metric_names(self) -> list[str]:
        """Validation metrics to compute, defaulting to all of the task's."""
        if self.validation.metrics:
            return list(self.validation.metrics)
        return list(
            {"classification": CLASSIFICATION_METRICS, "regression": REGRESSION_METRICS, "lm": LM_METRICS}.get(
                self.task or "", ("loss",)
            )
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved job as plain data (YAML/JSON-ready), with defaults filled in."""
        return self.model_dump(mode="json", by_alias=True)


def iter_fields(model: type[BaseModel] = JobSpec, prefix: str = ""):
    """Yield (dotted path, type text, default text, description) for every leaf field, for the reference.

    A mapping of sections (`sweep.parameters`) shows its entries as `<name>`; a section that may be null is
    described through its fields.
    """
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        sub, keyed = _section_inside(ann)
        if sub is not None:
            yield from iter_fields(sub, key + (".<name>." if keyed else "."))
            continue
        if field.is_required():
            default_text = "required"
        else:
            default = field.get_default(call_default_factory=True)
            default_text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        yield key, type_text(ann, field.metadata), default_text, field.description or ""


def _section_inside(ann: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the section a field holds, whether it holds a mapping of them), or (None, False) for a leaf field."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    for arg in get_args(ann):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, get_origin(ann) is dict
        inner, _ = _section_inside(arg) if get_args(arg) else (None, False)
        if inner is not None:
            return inner, get_origin(arg) is dict
    return None, False


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}


def _bounds_text(metadata: list[Any]) -> str:
    """`0 <= x < 1`, `>= 1`: the numeric bounds pydantic keeps in a field's metadata."""
    found = {key: getattr(m, key) for m in metadata for key, _ in _BOUNDS if getattr(m, key, None) is not None}
    low = next(((op, found[k]) for k, op in _BOUNDS[:2] if k in found), None)
    high = next(((op, found[k]) for k, op in _BOUNDS[2:] if k in found), None)
    if low and high:
        return f"{low[1]} {low[0].replace('>', '<')} x {high[0]} {high[1]}"
    return " ".join(f"{op} {value}" for op, value in (low or high,) if op) if (low or high) else ""


def type_text(ann: Any, metadata: list[Any] | None = None) -> str:
    """A field's type as a reader of the reference wants it: `integer >= 1`, `one of: min, max`, `list of string`."""
    bounds = _bounds_text(metadata or [])
    text = _readable(ann)
    return f"{text}, {bounds}" if bounds else text


def _readable(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        inner = _readable(args[0])
        bounds = _bounds_text(list(args[1:]) + [m for a in args[1:] for m in getattr(a, "metadata", [])])
        return f"{inner}, {bounds}" if bounds else inner
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        shown = [_readable(a) for a in args if a is not type(None)]
        text = " or ".join(f"({t})" if "," in t else t for t in shown)
        return f"{text} or null" if type(None) in args else text
    if origin in (list, tuple) and args:
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis:
            shown = [_readable(a) for a in args]
            if len(set(shown)) == 1:
                return f"pair of {shown[0]}" if len(shown) == 2 else f"{len(shown)} of {shown[0]}"
            return "[" + "; ".join(shown) + "]"
        return f"list of {_readable(args[0])}"
    if origin is dict:
        return "mapping" if not args or args[1] is Any else f"mapping of {_readable(args[1])}"
    return _NAMES.get(ann, getattr(ann, "__name__", str(ann)))
