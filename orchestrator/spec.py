"""The job file: `JobSpec` and its sections, YAML loading, dotted overrides and readable errors.

This module imports neither torch nor ray: `orchestrator validate` and `--help` must stay fast.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.errors import BadInput
from orchestrator.storage import redact

# A user hook: `package.module:function`, importable from the job file's directory.
HOOK_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
BUILTIN_MODELS = ("mlp", "cnn", "resnet", "gpt")
BUILTIN_DATA = ("digits", "synthetic", "parquet")
CLASSIFICATION_METRICS = ("loss", "accuracy", "f1", "roc_auc", "confusion_matrix")
REGRESSION_METRICS = ("loss", "mse", "mae", "r2")
LM_METRICS = ("loss", "perplexity")
ALL_METRICS = tuple(dict.fromkeys(CLASSIFICATION_METRICS + REGRESSION_METRICS + LM_METRICS))
FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Job files are a few KB; a cap keeps a wrong path (a data file, a binary) from being parsed at all.
MAX_JOB_FILE_BYTES = 1 << 20
# Anchors and aliases are fine for reuse, but a few KB of nested aliases ("billion laughs") expand
# into gigabytes once the job is dumped (run.json, a ConfigMap): cap the expanded node count.
MAX_EXPANDED_NODES = 100_000
# Seeds go to numpy's legacy seeding too, which takes 0..2**32-1.
MAX_SEED = 2**32 - 1
# Storage schemes the code opens and tests: local paths, file:// and S3 (s3a is the Hadoop spelling).
STORAGE_SCHEMES = ("file", "s3", "s3a")
MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "databricks")


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
_QUERY_SECRET_RE = re.compile(r"(?i)[?&][^=&#]*(token|key|secret|password|passwd|signature|credential)[^=&#]*=")


def check_uri(value: str, schemes: tuple[str, ...], local: bool, what: str) -> str:
    """A URI of a known scheme (or a local path when `local`) without credentials in it; ValueError if not.

    Secrets come from the environment: a password in a job file would land in run.json, the report
    and the rendered manifests.
    """
    m = _SCHEME_RE.match(value)
    if m is None:
        if local:
            return value
        raise ValueError(f"{redact(value)!r} is not a URI; use {' or '.join(s + '://' for s in schemes)}")
    scheme, netloc = m.group(1).lower(), m.group(2)
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(
            f"{redact(value)!r}: unsupported scheme {scheme!r} for {what}; use {'a local path, ' if local else ''}{allowed}"
        )
    if "@" in netloc or _QUERY_SECRET_RE.search(value):
        raise ValueError(f"{redact(value)!r}: credentials do not belong in a job file; they come from the environment")
    return value


class SpecError(BadInput):
    """A job file that cannot be run; `lines` holds one line per problem, each naming a field."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.lines = problems


def _leaf_types(ann: Any) -> set[Any]:
    """Every type an annotation admits, through unions, containers and Annotated."""
    args = get_args(ann)
    if not args:
        return {ann}
    out: set[Any] = set()
    for a in args:
        out |= _leaf_types(a)
    return out


def _bool_inside(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated, floats are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `epochs: yes` would train one epoch without a word.
        if info.field_name and _bool_inside(v):
            types = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in types and types & {int, float}:
                raise ValueError(f"expected a number, got a boolean ({v!r})")
        return v


class ModelSpec(Section):
    name: str = Field(
        "mlp", description="Built-in model (mlp, cnn, resnet, gpt) or a user `module:function` returning an nn.Module."
    )
    hidden: int = Field(
        128, ge=1, description="Width of hidden layers (mlp), channels (cnn, resnet) or embedding size (gpt)."
    )
    layers: int = Field(
        2,
        ge=1,
        description="Hidden layers (mlp), conv blocks (cnn), residual blocks (resnet) or transformer blocks (gpt).",
    )
    heads: int = Field(4, ge=1, description="Attention heads (gpt); must divide `hidden`.")
    context: int = Field(64, ge=2, description="Longest token sequence the model attends over (gpt).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability in every built-in model.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to a user model function."
    )
    init_from: str | None = Field(
        None,
        description="Start from these weights: a checkpoint URI of an earlier run, or a safetensors/state_dict file.",
    )
    freeze: list[str] = Field(
        default_factory=list, description="Parameter-name patterns (fnmatch) whose weights are not trained."
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in BUILTIN_MODELS and not HOOK_RE.match(v):
            raise ValueError(
                f"unknown model {v!r}{_suggest(v, BUILTIN_MODELS)}; use one of {', '.join(BUILTIN_MODELS)} or module:function"
            )
        return v

    @field_validator("init_from")
    @classmethod
    def _init_uri(cls, v: str | None) -> str | None:
        return None if v is None else check_uri(v, STORAGE_SCHEMES, True, "weights")


class AugmentSpec(Section):
    shift: int = Field(
        0, ge=0, description="Random image shift in pixels, up to this many in each direction (0 = off)."
    )
    noise: float = Field(
        0.0, ge=0.0, description="Standard deviation of Gaussian noise added to training inputs (0 = off)."
    )


class DataSpec(Section):
    name: str = Field(
        "digits",
        description="Data source: digits, synthetic, parquet, or a user `module:function` returning a dataset.",
    )
    task: Literal["classification", "regression", "lm"] | None = Field(
        None, description="Task; built-in sources know theirs, synthetic and parquet data need it."
    )
    path: str | None = Field(None, description="Parquet file, glob or directory, local or s3:// (parquet).")
    features: list[str] = Field(
        default_factory=list, description="Feature columns (parquet, classification/regression)."
    )
    label: str | None = Field(None, description="Label column (parquet, classification/regression).")
    tokens: str | None = Field(None, description="Column of token-id lists (parquet, lm).")
    samples: int = Field(2000, ge=10, description="Number of examples (synthetic).")
    num_features: int = Field(20, ge=1, description="Input features (synthetic classification/regression).")
    num_classes: int = Field(2, ge=2, description="Classes (synthetic classification).")
    vocab_size: int = Field(256, ge=2, description="Token vocabulary size (synthetic lm; parquet lm).")
    seq_len: int = Field(32, ge=2, description="Tokens per training example (lm).")
    classes: list[int] | None = Field(
        None,
        description="Keep only these labels (classification), e.g. digits 0-4 for a transfer-learning source task.",
    )
    test_split: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction held out as the test split, chosen by seed.")
    folds: int | None = Field(
        None, ge=2, description="K-fold cross-validation: number of folds; the validation set is fold `fold`."
    )
    fold: int = Field(0, ge=0, description="Which fold (0-based) is the validation set when `folds` is set.")
    stratify: bool | None = Field(
        None,
        description="Stratified folds: each keeps the class proportions (classification, in-memory data); null = on where it applies.",
    )
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="Training-time image augmentation.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to a user data function."
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for an s3:// parquet path (credentials come from the environment)."
    )
    engine: Literal["native", "ray"] = Field(
        "native",
        description=(
            "Who reads the train split (parquet): native, each worker reading its own row groups; or ray, Ray Data "
            "tasks reading and decoding (and augmenting) on any CPU of the cluster, streamed to the workers. Choose ray "
            "when decoding or augmentation needs more CPUs than the training workers have. It gives up exact "
            "mid-epoch resume (the rest of an interrupted epoch comes from a new pass over it: some of its examples "
            "twice, some not at all; the checkpoint records it) and a reproducible example order; needs Ray Train "
            "workers (scaling.num_workers >= 1) under `orchestrator run` (not sweeps or cv). Validation and test are read natively either way."
        ),
    )

    @field_validator("name")
    @classmethod
    def _known_data(cls, v: str) -> str:
        if v not in BUILTIN_DATA and not HOOK_RE.match(v):
            raise ValueError(
                f"unknown dataset {v!r}{_suggest(v, BUILTIN_DATA)}; use one of {', '.join(BUILTIN_DATA)} or module:function"
            )
        return v

    @field_validator("path")
    @classmethod
    def _data_uri(cls, v: str | None) -> str | None:
        return None if v is None else check_uri(v, STORAGE_SCHEMES, True, "data")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return None if v is None else check_uri(v, ("http", "https"), False, "an S3 endpoint")

    @model_validator(mode="after")
    def _consistent(self) -> DataSpec:
        if self.name == "parquet":
            if not self.path:
                raise ValueError("path: required for parquet data")
            if self.task is None:
                raise ValueError("task: required for parquet data (classification, regression or lm)")
            if self.task == "lm" and not self.tokens:
                raise ValueError("tokens: required for lm parquet data (the column of token ids)")
            if self.task != "lm" and (not self.features or not self.label):
                raise ValueError("features and label: required for classification/regression parquet data")
        if self.engine == "ray" and self.name != "parquet":
            raise ValueError(f"engine: ray reads parquet data (data.name=parquet), not {self.name}; use engine: native")
        if self.name == "synthetic" and self.task is None:
            raise ValueError("task: required for synthetic data (classification, regression or lm)")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold: {self.fold} is not below folds={self.folds}")
        if self.stratify and self.folds is None:
            raise ValueError("stratify: applies to k-fold splits; set folds too")
        if self.stratify and self.task in ("regression", "lm"):
            raise ValueError(f"stratify: stratified folds need class labels, and {self.task} data has none")
        if self.stratify and self.name == "parquet":
            raise ValueError(
                "stratify: parquet folds are assigned per row from its index, without reading labels; set stratify: false"
            )
        return self


class OptimSpec(Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = Field(
        "adamw", description="Optimizer: sgd, adam, adamw or rmsprop."
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (decoupled for adamw, L2 for the others).")
    momentum: float = Field(0.0, ge=0, lt=1, description="Momentum (sgd, rmsprop).")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd; needs momentum > 0).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="Adam/AdamW betas, each in [0, 1)."
    )
    eps: float = Field(1e-8, gt=0, description="Adam/AdamW/RMSprop epsilon.")
    alpha: float = Field(0.99, gt=0, lt=1, description="RMSprop smoothing constant.")

    @model_validator(mode="after")
    def _nesterov(self) -> OptimSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov: needs name=sgd and momentum > 0")
        return self


class ScheduleSpec(Section):
    name: Literal["constant", "step", "cosine", "warmup_cosine", "plateau"] = Field(
        "constant", description="LR schedule: constant, step, cosine, warmup_cosine or plateau."
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear warm-up steps from 0 to `optim.lr` (warmup_cosine; also allowed with constant)."
    )
    step_size: int = Field(100, ge=1, description="Optimizer steps between LR decays (step).")
    gamma: float = Field(0.1, gt=0, le=1, description="LR multiplier at each decay (step).")
    min_lr: float = Field(0.0, ge=0, description="Floor of the cosine schedules.")
    factor: float = Field(0.5, gt=0, lt=1, description="LR multiplier when the metric plateaus (plateau).")
    patience: int = Field(2, ge=0, description="Validations without improvement before the LR drops (plateau).")
    metric: str = Field("val_loss", description="Validation metric watched by plateau.")
    mode: Literal["min", "max"] = Field(
        "min", description="Whether the plateau metric should go down (min) or up (max)."
    )

    @model_validator(mode="after")
    def _warmup(self) -> ScheduleSpec:
        if self.warmup_steps and self.name not in ("constant", "warmup_cosine"):
            raise ValueError(f"warmup_steps: applies to constant and warmup_cosine, not {self.name}")
        return self


class TrainSpec(Section):
    epochs: int = Field(10, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps, whatever the epoch.")
    batch_size: int = Field(64, ge=1, description="Examples per worker per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    clip_grad_norm: float | None = Field(
        None, gt=0, description="Clip the global gradient norm to this value (off when null)."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32, or autocast to bf16/fp16 (fp16 uses a grad scaler)."
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Seed for Python, NumPy and torch (offset per rank) and for the data order, 0..2**32-1.",
    )
    log_every_n_steps: int = Field(
        20, ge=1, description="Optimizer steps between progress lines and training-metric reports."
    )


class ValidationSpec(Section):
    split: float = Field(
        0.2, ge=0.0, lt=1.0, description="Fraction of the non-test data used for validation (ignored with data.folds)."
    )
    every_n_steps: int | None = Field(
        None, ge=1, description="Validate every N optimizer steps; null = at the end of every epoch."
    )
    metrics: list[str] | None = Field(None, description="Validation metrics; null = every metric of the task.")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str] | None) -> list[str] | None:
        for m in v or []:
            if m not in ALL_METRICS:
                raise ValueError(f"unknown metric {m!r}{_suggest(m, ALL_METRICS)}")
        return v


class EarlyStoppingSpec(Section):
    metric: str = Field(
        "val_loss", description="Validation metric watched (val_ prefix), e.g. val_loss or val_accuracy."
    )
    mode: Literal["min", "max"] = Field("min", description="Whether the metric should go down (min) or up (max).")
    patience: int = Field(3, ge=1, description="Validations without improvement before training stops.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")


class ScalingSpec(Section):
    num_workers: int | tuple[int, int] = Field(
        1, description="Training workers (DDP ranks); 0 runs the loop in the driver; [min, max] is elastic."
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float | None = Field(None, gt=0, description="GPUs per worker when use_gpu (default 1).")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, int):
            if v < 0:
                raise ValueError("must be >= 0")
        elif not (1 <= v[0] <= v[1]):
            raise ValueError(f"elastic range [{v[0]}, {v[1]}] needs 1 <= min <= max")
        return v

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class CheckpointSpec(Section):
    storage: str = Field("runs", description="Where runs live: a local path, file:// or s3://bucket/prefix.")
    every_n_steps: int | None = Field(None, ge=1, description="Checkpoint every N optimizer steps (null = off).")
    every_n_epochs: int | None = Field(
        1, ge=1, description="Checkpoint every N epochs (null = off); the last step is always checkpointed."
    )
    keep_last: int = Field(2, ge=1, description="Newest committed checkpoints kept.")
    keep_best: int = Field(
        1,
        ge=0,
        description="Best checkpoints kept by the watched metric, beyond keep_last (the best is the one tested).",
    )
    best_metric: str | None = Field(
        None, description="Metric that makes a checkpoint the best; default early_stopping.metric, else val_loss."
    )
    best_mode: Literal["min", "max"] | None = Field(
        None, description="min or max for best_metric; default from the metric name."
    )
    async_: bool = Field(
        True, alias="async", description="Upload in the background; training blocks only for the snapshot."
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph); credentials come from the environment."
    )
    upload_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Deadline (s) of one storage operation, e.g. a checkpoint upload: connection errors, timeouts, "
        "5xx and throttling are retried until then; access denied, a missing bucket or missing credentials fail at once.",
    )
    lease_ttl_s: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="Object stores: a running driver renews its lease on the run directory every ttl/3; a lease "
        "unrenewed this long (s) is a dead run's, and the next run takes it over (local runs use an OS lock instead).",
    )

    @field_validator("storage")
    @classmethod
    def _storage_uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a local path or a URI, e.g. runs or s3://bucket/prefix")
        return check_uri(v, STORAGE_SCHEMES, True, "checkpoint storage")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return None if v is None else check_uri(v, ("http", "https"), False, "an S3 endpoint")


class FailureSpec(Section):
    max_failures: int = Field(
        3, ge=-1, description="Restarts after a worker or node dies, before the run fails (-1 = unlimited)."
    )
    retry_exceptions: bool = Field(
        False,
        description="Also restart (up to max_failures) when the job's own code raises; by default that fails the run at once.",
    )
    nonfinite_loss: Literal["fail", "skip"] = Field(
        "fail",
        description="A NaN or infinite loss: fail the run naming the step (the last good checkpoint stays the latest), or skip that step's update.",
    )


class MlflowSpec(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http(s)://, sqlite:///, databricks); null = $MLFLOW_TRACKING_URI."
    )
    experiment: str | None = Field(None, description="MLflow experiment; null = the job name.")

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, v: str | None) -> str | None:
        return None if v is None else check_uri(v, MLFLOW_SCHEMES, True, "MLflow tracking")


class TensorBoardSpec(Section):
    log_dir: str | None = Field(
        None, description="Where TensorBoard event files go (local path or URI); null = `<run>/tensorboard`."
    )

    @field_validator("log_dir")
    @classmethod
    def _log_dir(cls, v: str | None) -> str | None:
        return None if v is None else check_uri(v, STORAGE_SCHEMES, True, "TensorBoard event files")


class TrackingSpec(Section):
    mlflow: MlflowSpec | None = Field(
        None,
        description="Log params, metrics, provenance tags and artifacts to MLflow (on when present, e.g. `mlflow: {}`).",
    )
    tensorboard: TensorBoardSpec | None = Field(
        None, description="Write TensorBoard scalars and hyper-parameters (on when present, e.g. `tensorboard: {}`)."
    )


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


# ----------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its path and its YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError([f"{text}: an override must look like dotted.key=value"])
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and FLOAT_RE.match(value):
        value = float(value)  # YAML 1.1 reads 3e-4 as a string; every user means the number
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw job dict with each `dotted.key=value` set (sections are created as needed)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise SpecError([f"{'.'.join(path[: i + 1])}: is a value, not a section; cannot set {'.'.join(path)}"])
            node = child
        node[path[-1]] = value
    return out


def _section_fields(loc: tuple) -> list[str]:
    """Field names (and aliases) of the section at `loc` in JobSpec, for 'did you mean'."""
    model: Any = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann] + list(getattr(ann, "__args__", ()) or ())
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def format_errors(err: ValidationError) -> list[str]:
    """One line per problem, each starting with the dotted field path."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        path = ".".join(str(p) for p in loc) or "(job)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown field{_suggest(str(loc[-1]), _section_fields(loc[:-1]))}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
            # A model validator names the field itself: "field: problem".
            head, sep, rest = msg.partition(": ")
            if sep and re.fullmatch(r"[a-z_][\w.]*( and [a-z_]\w*)?", head):
                prefix = ".".join(str(p) for p in loc)
                path = f"{prefix}.{head}" if prefix and not head.startswith(prefix) and "." not in head else head
                msg = rest
        lines.append(f"{path}: {msg}")
    return lines


def build_spec(raw: Any, overrides: list[str] | None = None) -> JobSpec:
    """Validate a raw job dict (plus overrides) into a JobSpec, or raise SpecError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(["(job): the job file must be a mapping of sections"])
    raw = apply_overrides(raw, overrides or [])
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_errors(err)) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` entries may be overridden by the mapping's own keys
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # an unhashable key; the base class reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (the later one would silently win)", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes the document holds once every alias is expanded (aliases share node objects)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise yaml.YAMLError("a recursive alias (an anchor used inside itself)")
    active.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo, active) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active) for k, v in node.value)
    active.discard(key)
    memo[key] = min(size, MAX_EXPANDED_NODES + 1)  # saturate: the bound is all that matters
    return memo[key]


def parse_yaml(text: str) -> Any:
    """Parse one YAML document strictly: no duplicate keys, no recursive or exploding aliases (yaml.YAMLError)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_EXPANDED_NODES:
            raise yaml.YAMLError(
                f"aliases expand to more than {MAX_EXPANDED_NODES} values; write the values out or use fewer aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_job_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML job file into a dict, or raise SpecError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([f"{path}: no such job file"])
    size = p.stat().st_size
    if size > MAX_JOB_FILE_BYTES:
        raise SpecError(
            [f"{path}: {size} bytes is too big for a job file (at most {MAX_JOB_FILE_BYTES}); is this data?"]
        )
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            [f"{path}: not a UTF-8 text file (byte {data[exc.start]:#04x} at offset {exc.start})"]
        ) from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{path}:{where} is not valid YAML ({' '.join(str(problem).split())})"]) from None
    if raw is None:
        raise SpecError([f"{path}: the job file is empty; a job needs at least a name (see jobs/ for examples)"])
    return raw


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Load and validate a job file with dotted overrides."""
    return build_spec(read_job_file(path), overrides)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (`optim.lr`); empty dicts stay as `{}`."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj} if prefix else {}


def iter_fields(model: type[BaseModel] = JobSpec, prefix: str = ""):
    """Yield (dotted path, type text, default text, description) for every leaf field, for the README."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        candidates = [ann] + list(getattr(ann, "__args__", ()) or ())
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is not None:
            yield from iter_fields(sub, key + ".")
            continue
        if field.is_required():
            default_text = "required"
        else:
            default = field.get_default(call_default_factory=True)
            default_text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        yield key, _type_text(ann), default_text, field.description or ""


def _type_text(ann: Any) -> str:
    text = repr(ann).replace("typing.", "")
    return re.sub(r"<class '(\w+)'>", r"\1", text)
