"""The job's sections (model, data, optim, schedule, train, validation, early stopping, scaling,
checkpoint, failure, tracking) and `Section`, their strict base."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from orchestrator.spec.common import (
    ALL_METRICS,
    BUILTIN_DATA,
    BUILTIN_MODELS,
    HOOK_RE,
    MAX_SEED,
    MLFLOW_SCHEMES,
    STORAGE_SCHEMES,
    _suggest,
    check_uri,
)


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


class FsdpSpec(Section):
    reshard_after_forward: bool = Field(
        True,
        description="Free a block's gathered parameters after its forward and gather them again for backward "
        "(less memory); false keeps them from forward to backward (one all-gather less per block and step).",
    )
    blocks: list[str] = Field(
        default_factory=list,
        description="Modules sharded as units before the root: fnmatch patterns of module names (`layers.*`) or class "
        "names (`TransformerBlock`); empty = the built-in model's blocks (gpt: token embedding, transformer blocks, head; "
        "resnet: residual blocks; mlp: linear layers; cnn: conv layers), the root alone for a user model.",
    )


class ScalingSpec(Section):
    num_workers: int | tuple[int, int] = Field(
        1, description="Training workers (DDP ranks); 0 runs the loop in the driver; [min, max] is elastic."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model, gradients and optimizer state; fsdp: each holds a "
        "shard of them (FSDP2, gathered per block as it runs) and writes its own shards of each checkpoint.",
    )
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec, description="FSDP's options (scaling.strategy=fsdp).")
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

    @model_validator(mode="after")
    def _fsdp_options(self) -> ScalingSpec:
        # Against the defaults, not the fields set: a resolved job (run.json, job.yaml) spells every default out.
        if self.strategy != "fsdp" and self.fsdp != FsdpSpec():
            raise ValueError("fsdp: its options apply to scaling.strategy=fsdp")
        return self

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
