"""The settings a report shows: those of a resolved job that applied to its run, not every field JobSpec has.

run.json records the resolved job, every default filled in: an MLP's record holds `model.heads` and
`data.vocab_size` too. A page lists a field only where the run's choices use it (the model's kind, the data's
source and task, the optimizer, the schedule, a bring-your-own loop), and leaves out what is unset (null, empty).
Fields this module does not know (a newer or older record) are shown, not guessed away.
"""

from __future__ import annotations

from typing import Any

# What each built-in model reads of the model section, beside name, init_from and freeze (models.build_model).
MODEL_FIELDS = {
    "mlp": {"hidden", "layers", "dropout"},
    "cnn": {"hidden", "layers", "dropout"},
    "resnet": {"hidden", "layers", "dropout"},
    "gpt": {"hidden", "layers", "heads", "context", "dropout"},
}
MODEL_ALWAYS = {"name", "init_from", "freeze"}

# What each data source reads, by task (None: whatever the task), beside the split and fold fields.
DATA_FIELDS: dict[str, dict[str | None, set[str]]] = {
    "digits": {None: {"classes", "augment"}},
    "synthetic": {
        "classification": {"task", "samples", "num_features", "num_classes", "classes", "augment"},
        "regression": {"task", "samples", "num_features", "augment"},
        "lm": {"task", "samples", "vocab_size", "seq_len"},
    },
    "parquet": {
        "classification": {"task", "path", "features", "label", "classes", "endpoint_url", "engine", "augment"},
        "regression": {"task", "path", "features", "label", "endpoint_url", "engine", "augment"},
        "lm": {"task", "path", "tokens", "vocab_size", "seq_len", "endpoint_url", "engine"},
    },
}
DATA_ALWAYS = {"name", "test_split", "folds"}
FOLD_FIELDS = {"fold", "stratify"}  # only with folds

OPTIM_FIELDS = {
    "sgd": {"momentum", "nesterov"},
    "adam": {"betas", "eps"},
    "adamw": {"betas", "eps"},
    "rmsprop": {"momentum", "eps", "alpha"},
}
OPTIM_ALWAYS = {"name", "lr", "weight_decay"}

SCHEDULE_FIELDS = {
    "constant": {"warmup_steps"},
    "step": {"step_size", "gamma"},
    "cosine": {"min_lr"},
    "warmup_cosine": {"warmup_steps", "min_lr"},
    "plateau": {"factor", "patience", "metric", "mode"},
}

# A bring-your-own loop (entrypoint) trains itself: of the job, the orchestrator uses only these.
OWN_LOOP_SECTIONS = {
    "name": None,
    "entrypoint": None,
    "config": None,
    "scaling": None,
    "checkpoint": {"storage", "endpoint_url"},
    "failure": {"max_failures", "retry_exceptions"},
    "tracking": None,
}


def _set(value: Any) -> bool:
    return value is not None and value != {} and value != []


def _pruned(node: Any) -> Any:
    """`node` without unset values (null, empty), at every depth."""
    if not isinstance(node, dict):
        return node
    out = {k: _pruned(v) for k, v in node.items()}
    return {k: v for k, v in out.items() if _set(v)}


def _only(section: dict[str, Any], keep: set[str], known: set[str]) -> dict[str, Any]:
    """The fields of `section` in `keep`, and any this module does not know (`known`: every field it has rules for)."""
    return {k: v for k, v in section.items() if k in keep or k not in known}


def _model(model: dict[str, Any]) -> dict[str, Any]:
    known = MODEL_ALWAYS | {"options"} | set().union(*MODEL_FIELDS.values())
    uses = MODEL_FIELDS.get(model.get("name"), {"options"})  # a user's model function gets only its options
    return _only(model, MODEL_ALWAYS | uses, known)


def _data(data: dict[str, Any]) -> dict[str, Any]:
    known = DATA_ALWAYS | FOLD_FIELDS | {"options"}
    for by_task in DATA_FIELDS.values():
        known |= set().union(*by_task.values())
    by_task = DATA_FIELDS.get(data.get("name"))
    if by_task is None:  # a user's data function: its options and the task it declares
        uses = {"task", "options", "classes", "augment"}
    else:
        uses = by_task.get(None) or by_task.get(data.get("task"), set())
    keep = DATA_ALWAYS | uses | (FOLD_FIELDS if data.get("folds") else set())
    out = _only(data, keep, known)
    augment = out.get("augment")
    if isinstance(augment, dict) and not any(augment.values()):  # every augmentation off
        out.pop("augment")
    return out


def _by_name(section: dict[str, Any], fields: dict[str, set[str]], always: set[str]) -> dict[str, Any]:
    known = always | set().union(*fields.values())
    return _only(section, always | fields.get(section.get("name"), set()), known)


def applied_settings(job: dict[str, Any]) -> dict[str, Any]:
    """The settings of a resolved job (run.json's `job`) that applied to its run, unset ones left out."""
    job = _pruned(job)
    if job.get("entrypoint"):
        out = {}
        for key, value in job.items():
            if key not in OWN_LOOP_SECTIONS:
                continue
            keep = OWN_LOOP_SECTIONS[key]
            out[key] = {k: v for k, v in value.items() if k in keep} if keep and isinstance(value, dict) else value
        return _pruned(out)
    out = dict(job)
    if isinstance(out.get("model"), dict):
        out["model"] = _model(out["model"])
    if isinstance(out.get("data"), dict):
        out["data"] = _data(out["data"])
    if isinstance(out.get("optim"), dict):
        out["optim"] = _by_name(out["optim"], OPTIM_FIELDS, OPTIM_ALWAYS)
    if isinstance(out.get("schedule"), dict):
        out["schedule"] = _by_name(out["schedule"], SCHEDULE_FIELDS, {"name"})
    scaling = out.get("scaling")
    if isinstance(scaling, dict) and scaling.get("strategy", "ddp") != "fsdp":
        out["scaling"] = {k: v for k, v in scaling.items() if k != "fsdp"}  # FSDP's options shard nothing under ddp
    validation = out.get("validation")
    if isinstance(validation, dict) and (out.get("data") or {}).get("folds"):
        out["validation"] = {k: v for k, v in validation.items() if k != "split"}  # the fold is the validation set
    return _pruned(out)
