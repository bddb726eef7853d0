"""A run's identity: which settings change what a run computes, and which only change how, where or how visibly.

Every field of the job is classified here, once: `RESULT` (another value is another run: a rerun with it is
refused rather than resumed or passed off as done) or `SAME` (resources, storage access, cadence of logs and
checkpoints, trackers: a rerun may change it and continue the same run). A field the table misses fails
tests/test_identity.py, so a new field cannot land unclassified. An entry may name a whole section (`tracking`)
whose fields are all of one kind by nature (`tracking`), or a field that holds a mapping (`sweep.parameters`):
everything under it is classified alike.

run.json keeps the fingerprint of a run's `RESULT` settings; sweep.json the same of a sweep's (its base job's
and its search's). `train.epochs` and `train.max_steps` are the run's horizon: `--extend` may raise them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from orchestrator.errors import BadInput

RESULT, SAME = True, False

FIELDS: dict[str, bool] = {
    "name": SAME,  # the run's directory: the identity itself, not a setting of it
    "entrypoint": RESULT,
    "config": RESULT,
    "model.name": RESULT,
    "model.hidden": RESULT,
    "model.layers": RESULT,
    "model.heads": RESULT,
    "model.context": RESULT,
    "model.dropout": RESULT,
    "model.options": RESULT,
    "model.init_from": RESULT,
    "model.freeze": RESULT,
    "data.name": RESULT,
    "data.task": RESULT,
    "data.path": RESULT,
    "data.features": RESULT,
    "data.label": RESULT,
    "data.tokens": RESULT,
    "data.samples": RESULT,
    "data.num_features": RESULT,
    "data.num_classes": RESULT,
    "data.vocab_size": RESULT,
    "data.seq_len": RESULT,
    "data.classes": RESULT,
    "data.test_split": RESULT,
    "data.folds": RESULT,
    "data.fold": RESULT,
    "data.stratify": RESULT,
    "data.augment.shift": RESULT,
    "data.augment.noise": RESULT,
    "data.options": RESULT,
    "data.endpoint_url": SAME,  # where the same bytes are read from
    "data.engine": RESULT,  # Ray Data's streaming split orders batches otherwise
    "optim.name": RESULT,
    "optim.lr": RESULT,
    "optim.weight_decay": RESULT,
    "optim.momentum": RESULT,
    "optim.nesterov": RESULT,
    "optim.betas": RESULT,
    "optim.eps": RESULT,
    "optim.alpha": RESULT,
    "schedule.name": RESULT,
    "schedule.warmup_steps": RESULT,
    "schedule.step_size": RESULT,
    "schedule.gamma": RESULT,
    "schedule.min_lr": RESULT,
    "schedule.factor": RESULT,
    "schedule.patience": RESULT,
    "schedule.metric": RESULT,
    "schedule.mode": RESULT,
    "train.epochs": RESULT,
    "train.max_steps": RESULT,
    "train.batch_size": RESULT,
    "train.grad_accum_steps": RESULT,
    "train.clip_grad_norm": RESULT,
    "train.precision": RESULT,
    "train.compile": SAME,  # the same model and step, compiled
    "train.seed": RESULT,
    "train.log_every_n_steps": SAME,
    "validation.split": RESULT,
    "validation.every_n_steps": RESULT,  # when early stopping and plateau look
    "validation.metrics": RESULT,  # what early stopping and the best checkpoint can watch
    "early_stopping.metric": RESULT,
    "early_stopping.mode": RESULT,
    "early_stopping.patience": RESULT,
    "early_stopping.min_delta": RESULT,
    "scaling.num_workers": SAME,  # a resumable run continues on another number of workers
    "scaling.use_gpu": SAME,
    "scaling.cpus_per_worker": SAME,
    "scaling.gpus_per_worker": SAME,
    # How the same model is laid out across workers: a run's checkpoints resume under either (sharded or whole).
    "scaling.strategy": SAME,
    "scaling.fsdp.reshard_after_forward": SAME,  # memory against communication, the same numbers
    "scaling.fsdp.blocks": SAME,
    "checkpoint.storage": SAME,  # with name, where the run is
    "checkpoint.every_n_steps": SAME,  # a resume continues bit for bit from any step
    "checkpoint.every_n_epochs": SAME,
    "checkpoint.keep_last": SAME,
    "checkpoint.keep_best": SAME,
    "checkpoint.best_metric": RESULT,  # which checkpoint is the best, and the one tested
    "checkpoint.best_mode": RESULT,
    "checkpoint.async": SAME,
    "checkpoint.endpoint_url": SAME,
    "checkpoint.upload_timeout_s": SAME,
    "checkpoint.lease_ttl_s": SAME,
    "failure.max_failures": SAME,
    "failure.retry_exceptions": SAME,
    "failure.nonfinite_loss": RESULT,  # skipped steps are other updates
    "sweep": SAME,  # `run` ignores it; a sweep's own identity is SWEEP_FIELDS
    "tracking": SAME,
}

# The sweep section, for a sweep's identity (beside its base job's RESULT fields).
SWEEP_FIELDS: dict[str, bool] = {
    "sweep.name": SAME,  # the sweep's directory
    "sweep.parameters": RESULT,
    "sweep.num_samples": RESULT,
    "sweep.metric": RESULT,
    "sweep.mode": RESULT,
    "sweep.scheduler": RESULT,
    "sweep.search": RESULT,
    "sweep.max_concurrent_trials": SAME,
    "sweep.seed": RESULT,
    "sweep.cv_folds": RESULT,
}

HORIZON = ("train.epochs", "train.max_steps")  # what `--extend` may raise


def classified(path: str, table: dict[str, bool] = FIELDS) -> bool | None:
    """The class of a leaf field (`RESULT` or `SAME`) by its own entry or its nearest enclosing one; None if unnamed."""
    while path:
        if path in table:
            return table[path]
        path = path.rpartition(".")[0]
    return None


def _lookup(job: dict[str, Any], path: str) -> Any:
    value: Any = job
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def settings_of(job: dict[str, Any], table: dict[str, bool] = FIELDS) -> dict[str, Any]:
    """The `RESULT` settings of a resolved job (`JobSpec.to_dict()`), by dotted path."""
    return {path: _lookup(job, path) for path, result in table.items() if result}


def sweep_settings_of(job: dict[str, Any], sweep: dict[str, Any]) -> dict[str, Any]:
    """A sweep's identity: its base job's `RESULT` settings and its search's (`SweepSpec.model_dump`)."""
    return {**settings_of(job), **settings_of({"sweep": sweep}, SWEEP_FIELDS)}


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of settings (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(path, old, new) of every setting that differs, in the order of `new`; a section differs field by field."""
    out = []
    for path in dict.fromkeys([*new, *old]):
        before, after = old.get(path), new.get(path)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict) and path not in ("config", "sweep.parameters"):
            nested = changes(_flat(before, path), _flat(after, path))
            out.extend(nested or [(path, before, after)])
        else:
            out.append((path, before, after))
    return out


def _flat(value: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            out.update(_flat(item, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = item
    return out


def describe_changes(found: list[tuple[str, Any, Any]]) -> str:
    """`optim.lr 0.003 -> 0.1, train.epochs 15 -> 5`."""
    return ", ".join(f"{path} {_shown(old)} -> {_shown(new)}" for path, old, new in found)


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list, bool)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def only_horizon_grew(found: list[tuple[str, Any, Any]]) -> bool:
    """Whether the only changes are a longer horizon (more epochs, more or unlimited max_steps): what `--extend` may do."""
    if not found:
        return False
    for path, old, new in found:
        if path not in HORIZON:
            return False
        if path == "train.max_steps" and new is not None and (old is None or new <= old):
            return False
        if path == "train.epochs" and (not isinstance(new, int) or not isinstance(old, int) or new <= old):
            return False
    return True


def refusal(
    uri: str, what: str, finished: bool, found: list[tuple[str, Any, Any]], name_field: str, extend_from: int | None
) -> BadInput:
    """The one line that refuses a rerun (run, sweep or cv) whose settings changed: each field old -> new, the ways on."""
    state = "a finished" if finished else "an unfinished"
    changed = describe_changes(found) if found else "settings recorded before they were kept field by field"
    ways = f"use --fresh for a new {what}, or another {name_field}"
    if extend_from is not None:
        ways += f", or --extend to train on from step {extend_from}"
    return BadInput(f"{uri}: holds {state} {what} with other settings: {changed}; {ways}")
