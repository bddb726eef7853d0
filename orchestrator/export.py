"""`orchestrator export`: which checkpoint's weights leave a run, where they may go, and what their header says.

A run's URI exports its best checkpoint unless told otherwise (`--checkpoint best|latest|STEP`): the one its
summary names and its test split was evaluated on. The file is a plain safetensors file whose header metadata
says where it came from (run, step, epoch, model, the fingerprint of the run's settings), so that a file found
later can be traced back to its run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from orchestrator import __version__, outfile, storage, weights
from orchestrator import checkpoint as ckpt
from orchestrator.errors import BadInput
from orchestrator.provenance import job_hash
from orchestrator.rundir import RunDir
from orchestrator.runrecord import RunRecord, RunStatus, summary_from_checkpoints

BEST, LATEST = "best", "latest"


def parse_choice(value: str | None) -> str | int | None:
    """`--checkpoint`: best, latest or a step number (None when not given); BadInput for anything else."""
    if value is None or value in (BEST, LATEST):
        return value
    if value.isdigit():
        return int(value)
    raise BadInput(f"--checkpoint {value}: give best, latest or a step number (`orchestrator checkpoints` lists them)")


@dataclass
class Chosen:
    """The checkpoint an export takes: its run, the checkpoint, and why this one (best, latest, the step asked for)."""

    run: RunDir
    info: ckpt.CheckpointInfo
    why: str
    best: Any = None  # the run's Best, when the checkpoint is it


def choose_checkpoint(uri: str, choice: str | int | None, endpoint_url: str | None = None) -> Chosen:
    """The checkpoint `uri` names, or of the run at `uri` the best (default), the latest or the one at a step."""
    fs, path = storage.open_storage(uri, endpoint_url)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if ckpt.CHECKPOINT_RE.match(name):
        if choice is not None:
            raise BadInput(f"--checkpoint: {uri} names one checkpoint already; give its run's URI to choose")
        run_uri = uri.rstrip("/").rsplit("/", 1)[0]
        run = RunDir(uri=run_uri, fs=fs, root=path.rstrip("/").rsplit("/", 1)[0], endpoint_url=endpoint_url)
        found = ckpt.list_checkpoints(fs, run.root, uri_prefix=run.uri)
        info = next((c for c in found if c.path.rstrip("/") == path.rstrip("/")), None)
        if info is None:
            raise BadInput(f"{uri}: not a committed checkpoint (no manifest.json)")
        return Chosen(run, info, "as named")
    run = RunDir(uri=uri.rstrip("/"), fs=fs, root=path.rstrip("/"), endpoint_url=endpoint_url)
    found = ckpt.list_checkpoints(fs, run.root, uri_prefix=run.uri)
    if not found:
        raise BadInput(f"{uri}: no committed checkpoint here")
    if choice == LATEST:
        return Chosen(run, found[-1], "the latest")
    if isinstance(choice, int):
        info = next((c for c in found if c.step == choice), None)
        if info is None:
            steps = ", ".join(str(c.step) for c in found[-8:])
            raise BadInput(f"--checkpoint {choice}: {uri} has no committed checkpoint at that step (it has {steps})")
        return Chosen(run, info, "as asked")
    best = summary_from_checkpoints(run, RunStatus.RUNNING).best
    if best is None or best.step is None:
        raise BadInput(
            f"{uri}: no best checkpoint recorded (nothing validated); --checkpoint latest exports step {found[-1].step}"
        )
    info = next((c for c in found if c.step == best.step), None)
    if info is None:
        raise BadInput(
            f"{uri}: its best checkpoint (step {best.step}) is no longer kept; --checkpoint latest exports step "
            f"{found[-1].step}, or name a step `orchestrator checkpoints {uri}` lists"
        )
    return Chosen(run, info, "the best", best)


def _job_of(chosen: Chosen, record: RunRecord | None) -> dict[str, Any]:
    """The resolved job that wrote the checkpoint (its job.yaml), else the run's record of it."""
    if "job.yaml" in chosen.info.manifest.files:
        try:
            job = yaml.safe_load(ckpt.read_verified(chosen.run.fs, chosen.info, ["job.yaml"])["job.yaml"])
        except (ValueError, yaml.YAMLError) as exc:
            raise BadInput(f"{chosen.info.uri}: {exc}") from None
        if isinstance(job, dict):
            return job
    return dict(record.job) if record else {}


def settings_fingerprint(job: dict[str, Any]) -> str:
    """The fingerprint of a resolved job's settings, for an export of a run whose run.json keeps none."""
    return job_hash(job)


def header_metadata(chosen: Chosen) -> dict[str, str]:
    """The safetensors metadata of an export: where the weights came from (strings only, as the format wants)."""
    record = RunRecord.load(chosen.run)
    job = _job_of(chosen, record)
    metadata = {
        "format": "pt",  # what loaders of PyTorch safetensors files (transformers) look for
        "job": str(record.run if record else job.get("name", chosen.run.name)),
        "step": str(chosen.info.step),
        "epoch": str(chosen.info.epoch),
        "fingerprint": getattr(record, "fingerprint", None) or settings_fingerprint(job),
        "checkpoint": storage.redact(chosen.info.uri),
        "orchestrator": __version__,
    }
    if job.get("entrypoint"):  # a bring-your-own loop builds its own model: the model section means nothing
        metadata["model"] = str(job["entrypoint"])
    else:
        model = job.get("model") or {}
        metadata["model"] = str(model.get("name", ""))
        metadata["model_config"] = json.dumps(model, sort_keys=True, separators=(",", ":"))
    return metadata


def export_checkpoint(
    uri: str, out: str, choice: str | int | None = None, force: bool = False, endpoint_url: str | None = None
) -> dict[str, Any]:
    """Write the chosen checkpoint's weights to the local file `out`; what was written, from which step and why."""
    target = outfile.check_target(out, force)  # before anything is read: a refused target costs nothing
    chosen = choose_checkpoint(uri, choice, endpoint_url)
    metadata = header_metadata(chosen)
    with outfile.replacing(target, force) as tmp:
        try:
            size = weights.export_weights(chosen.run.fs, chosen.info, tmp, metadata)
        except ValueError as exc:  # a file that does not match its manifest
            raise BadInput(str(exc)) from None
    best = chosen.best
    return {
        "out": target,
        "bytes": size,
        "step": chosen.info.step,
        "epoch": chosen.info.epoch,
        "chosen": chosen.why,
        "checkpoint": storage.redact(chosen.info.uri),
        "best": {"metric": best.metric, "value": best.value} if best is not None else None,
        "metadata": metadata,
    }
