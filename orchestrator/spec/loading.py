"""From a job file (or a raw dict) and overrides to a validated `JobSpec`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.secret_rules import secrets_in_job
from orchestrator.spec.common import MAX_JOB_FILE_BYTES, SpecError
from orchestrator.spec.job import JobSpec
from orchestrator.spec.overrides import apply_overrides, format_errors
from orchestrator.spec.yamlparse import parse_yaml


def build_spec(raw: Any, overrides: list[str] | None = None) -> JobSpec:
    """Validate a raw job dict (plus overrides) into a JobSpec, or raise SpecError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(["(job): the job file must be a mapping of sections"])
    raw = apply_overrides(raw, overrides or [])
    # Whatever a job holds is stored and shown (run.json, reports, job.yaml, ConfigMaps, MLflow params): a
    # secret in it is refused here, once, rather than redacted at each of those.
    secrets = secrets_in_job(raw)
    if secrets:
        raise SpecError(secrets)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_errors(err)) from None


def read_job_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML job file into a dict, or raise SpecError naming the file."""
    p = Path(path)
    if not p.is_file():
        if p.exists() and not p.is_dir():
            raise SpecError([f"{path}: not a regular file (a FIFO, socket or device)"])
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
