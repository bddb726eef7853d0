"""The job file. Its public face is `JobSpec` (the validated job) and `load_spec` (a file plus overrides to one).

The parts: `sections` (the job's sections), `sweep` (the sweep section), `job` (JobSpec), `yamlparse` (strict
YAML), `overrides` (dotted overrides, error lines), `loading` (files and raw dicts to a JobSpec), `common`
(names, limits, URI checks, SpecError). The package imports neither torch nor ray: `orchestrator validate`
and `--help` must stay fast.
"""

from orchestrator.spec.common import (
    ALL_METRICS,
    BUILTIN_DATA,
    BUILTIN_MODELS,
    CLASSIFICATION_METRICS,
    FLOAT_RE,
    HOOK_RE,
    LM_METRICS,
    MAX_JOB_FILE_BYTES,
    MAX_SEED,
    MLFLOW_SCHEMES,
    REGRESSION_METRICS,
    RUN_NAME_RE,
    STORAGE_SCHEMES,
    SpecError,
    check_uri,
    flatten,
)
from orchestrator.spec.job import JobSpec, iter_fields
from orchestrator.spec.loading import build_spec, load_spec, read_job_file
from orchestrator.spec.overrides import apply_overrides, format_errors, parse_override
from orchestrator.spec.sections import (
    AugmentSpec,
    CheckpointSpec,
    DataSpec,
    EarlyStoppingSpec,
    FailureSpec,
    FsdpSpec,
    MlflowSpec,
    ModelSpec,
    OptimSpec,
    ScalingSpec,
    ScheduleSpec,
    Section,
    TensorBoardSpec,
    TrackingSpec,
    TrainSpec,
    ValidationSpec,
)
from orchestrator.spec.sweep import PARAM_TYPES, PBT_MUTABLE, ParamSpec, SchedulerSpec, SweepSpec
from orchestrator.spec.yamlparse import MAX_EXPANDED_NODES, parse_yaml

__all__ = [
    "ALL_METRICS",
    "BUILTIN_DATA",
    "BUILTIN_MODELS",
    "CLASSIFICATION_METRICS",
    "FLOAT_RE",
    "HOOK_RE",
    "LM_METRICS",
    "MAX_EXPANDED_NODES",
    "MAX_JOB_FILE_BYTES",
    "MAX_SEED",
    "MLFLOW_SCHEMES",
    "PARAM_TYPES",
    "PBT_MUTABLE",
    "REGRESSION_METRICS",
    "RUN_NAME_RE",
    "STORAGE_SCHEMES",
    "AugmentSpec",
    "CheckpointSpec",
    "DataSpec",
    "EarlyStoppingSpec",
    "FailureSpec",
    "JobSpec",
    "MlflowSpec",
    "ModelSpec",
    "OptimSpec",
    "ParamSpec",
    "FsdpSpec",
    "ScalingSpec",
    "ScheduleSpec",
    "SchedulerSpec",
    "Section",
    "SpecError",
    "SweepSpec",
    "TensorBoardSpec",
    "TrackingSpec",
    "TrainSpec",
    "ValidationSpec",
    "apply_overrides",
    "build_spec",
    "check_uri",
    "flatten",
    "format_errors",
    "iter_fields",
    "load_spec",
    "parse_override",
    "parse_yaml",
    "read_job_file",
]
