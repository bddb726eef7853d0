"""A sweep file read, merged with its job and checked before Ray starts; the job of each trial."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from orchestrator.errors import BadInput
from orchestrator.rundir import run_uri_for
from orchestrator.spec import JobSpec, ParamSpec, SpecError, SweepSpec, apply_overrides, build_spec, read_job_file
from orchestrator.spec.identity import sweep_settings_of
from orchestrator.sweep.schedulers import default_max_t


@dataclasses.dataclass
class SweepJob:
    """A validated sweep: the job every trial starts from, the sweep section, and where it all lives."""

    job: dict[str, Any]  # the raw job (overrides applied, no sweep section): each trial applies its settings to it
    spec: JobSpec  # the base job, validated
    sweep: SweepSpec
    name: str
    uri: str  # <checkpoint.storage>/<name>, absolute for local storage
    job_file: str
    base_dir: str  # where user code and relative data paths resolve: the job file's directory
    kind: str = "sweep"  # what it is called in a refusal: sweep, or cross-validation
    name_field: str = "sweep.name"  # the field that names its directory
    lease: dict[str, Any] | None = (
        None  # while it runs: its lease (RunLease.token_ref), which its trials' commits check
    )

    @property
    def endpoint(self) -> str | None:
        return self.spec.checkpoint.endpoint_url

    def settings(self) -> dict[str, Any]:
        """Its identity (spec.identity): the base job's settings that change a result, and the search's."""
        return sweep_settings_of(self.spec.to_dict(), self.sweep.model_dump(mode="json"))

    def fingerprint(self) -> str:
        """The fingerprint sweep.json kept before settings were kept field by field: the raw job and the search."""
        search = self.sweep.model_dump(mode="json", exclude={"max_concurrent_trials"})
        if search.get("cv_folds") is None:
            search.pop("cv_folds", None)  # the sweeps from before the field: the same fingerprint as they had
        return hashlib.sha256(
            json.dumps({"job": self.job, "sweep": search}, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_sweep_file(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The raw job of a sweep file and the directory its code resolves from.

    A sweep file is a job file with a `sweep` section, or a file naming one (`job: digits_mlp.yaml`)
    whose other sections are laid over that job.
    """
    raw = read_job_file(path)
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: a sweep file must be a mapping of sections"])
    if "job" not in raw:
        return raw, str(Path(path).resolve().parent)
    ref = raw["job"]
    if not isinstance(ref, str):
        raise SpecError([f"{path}: job: must name a job file, e.g. job: digits_mlp.yaml"])
    job_path = (Path(path).resolve().parent / ref).resolve()
    if not job_path.is_file():
        raise SpecError([f"{path}: job: {ref}: no such job file"])
    job = read_job_file(job_path)
    if not isinstance(job, dict):
        raise SpecError([f"{path}: job: {ref}: the job file must be a mapping of sections"])
    return _deep_merge(job, {k: v for k, v in raw.items() if k != "job"}), str(job_path.parent)


def _override_text(path: str, value: Any) -> str:
    # JSON is YAML: the value survives apply_overrides' YAML parsing exactly (strings stay strings).
    return f"{path}={json.dumps(_plain(value))}"


def _plain(value: Any) -> Any:
    """Python scalars for what Tune samples (numpy ints and floats do not serialize)."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def settings_text(config: dict[str, Any]) -> str:
    """A trial's settings on one line."""
    return "  ".join(f"{k}={short(v)}" for k, v in config.items())


def short(value: Any) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def check_parameters(job: dict[str, Any], sweep: SweepSpec) -> None:
    """Build the job with every value (or both ends of every range) of every searched field; SpecError naming the field."""
    problems = []
    searched = dict(sweep.parameters)
    if sweep.scheduler.name == "pbt":
        searched.update(sweep.scheduler.mutations)
    for path, param in searched.items():
        field = f"sweep.parameters.{path}" if path in sweep.parameters else f"sweep.scheduler.mutations.{path}"
        if _is_section(path):
            problems.append(
                f"{field}: is a section of the job, not a field; name a field in it (e.g. {path}.{_first_field(path)})"
            )
            continue
        for value in param.sample_values():
            try:
                build_spec(job, [_override_text(path, value)])
            except SpecError as exc:
                reason = exc.lines[0]
                if "unknown field" in reason or "is a value, not a section" in reason:
                    problems.append(f"{field}: not a field of the job ({reason})")
                else:
                    problems.append(f"{field}: the value {value!r} does not make a valid job ({reason})")
                break
    if problems:
        raise SpecError(problems)


def _section_at(path: str):
    """The JobSpec section class a dotted path names, or None when it names a field (or nothing)."""
    model: Any = JobSpec
    for part in path.split("."):
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        candidates = [field.annotation, *(getattr(field.annotation, "__args__", ()) or ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _is_section(path: str) -> bool:
    return _section_at(path) is not None


def _first_field(path: str) -> str:
    section = _section_at(path)
    return next(iter(section.model_fields)) if section is not None else ""


def with_cv_folds(raw: dict[str, Any]) -> dict[str, Any]:
    """The job with `sweep.cv_folds: k` as its `data.folds` (trials override `data.fold`), so the job's own checks of
    folds (stratification needs class labels) apply; BadInput when the job asks for another fold count."""
    k = (raw.get("sweep") or {}).get("cv_folds") if isinstance(raw.get("sweep"), dict) else None
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        return raw  # absent, or wrong: the spec's own check of sweep.cv_folds says so
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if data.get("folds") not in (None, k):
        raise BadInput(f"sweep.cv_folds: {k}, but the job sets data.folds: {data['folds']}; leave data.folds out")
    return {**raw, "data": {**data, "folds": k, "fold": 0}}


def load_sweep(path: str, overrides: list[str] | None = None, fresh: bool = False) -> SweepJob:
    """Read, merge and validate a sweep file with dotted overrides; BadInput/SpecError on the first problem."""
    raw, base_dir = read_sweep_file(path)
    raw = apply_overrides(raw, overrides or [])
    raw = with_cv_folds(raw)
    spec = build_spec(raw)
    if spec.sweep is None:
        raise BadInput(f"{path}: no sweep section (add `sweep:` with parameters, or name a job file with `job:`)")
    sweep = spec.sweep
    job = {k: v for k, v in raw.items() if k != "sweep"}
    check_parameters(job, sweep)
    if spec.entrypoint:
        raise BadInput(
            "entrypoint: a bring-your-own loop reports its own metrics; sweeps run the built-in loop (model/data sections)"
        )
    if sweep.scheduler.name == "pbt" and spec.scaling.max_workers > 1:
        raise BadInput(
            "sweep.scheduler: pbt hands checkpoints between trials inside their processes; use scaling.num_workers 0 or 1"
        )
    if sweep.scheduler.name == "pbt" and spec.scaling.strategy == "fsdp":
        raise BadInput(
            "sweep.scheduler: pbt hands a trial's whole checkpoint to another, and fsdp writes shards; use scaling.strategy ddp"
        )
    if sweep.scheduler.name == "asha":
        max_t = default_max_t(sweep, spec)
        if sweep.scheduler.grace_period > max_t:
            raise BadInput(f"sweep.scheduler.grace_period: {sweep.scheduler.grace_period} is above max_t={max_t}")
    name = sweep.name or f"{spec.name}-sweep"
    if fresh:
        name = f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    return SweepJob(
        job=job, spec=spec, sweep=sweep, name=name, uri=run_uri_for(spec, name), job_file=str(path), base_dir=base_dir
    )


def trial_spec(
    job: dict[str, Any], config: dict[str, Any], name: str, ranges: dict[str, ParamSpec] | None = None
) -> JobSpec:
    """The job of one trial: the base job with the trial's settings (clamped into their ranges: PBT perturbs past them)."""
    overrides = []
    for path, value in config.items():
        value = _plain(value)
        param = (ranges or {}).get(path)
        if param is not None and param.low is not None and isinstance(value, (int, float)):
            value = type(value)(min(max(value, param.low), param.high))
        overrides.append(_override_text(path, value))
    return build_spec({**job, "name": name}, overrides)
