"""Everything that can be wrong with a job's input, found before Ray starts: one checklist, one line per problem.

Each check raises BadInput naming the field, file or URI; nothing is written and no cluster starts.
The checks run cheapest first, except the trackers, last: a tracking server that does not answer
costs seconds.
"""

from __future__ import annotations

import os

from orchestrator import storage, tracking
from orchestrator.checkpoint import load_weights
from orchestrator.data import DataInfo, check_data
from orchestrator.errors import BadInput
from orchestrator.hooks import import_hook
from orchestrator.spec import JobSpec


def preflight(spec: JobSpec, base_dir: str | None, address: str | None) -> DataInfo | None:
    """Check the job against this machine, its storage, user code, data, model, weights to start from and trackers.

    Returns the data's DataInfo (None for a bring-your-own loop, which owns its data).
    """
    if address is None:
        check_resources(spec)
    storage.preflight(spec.checkpoint.storage, spec.checkpoint.endpoint_url, spec.checkpoint.upload_timeout_s)
    if spec.entrypoint:
        import_hook(spec.entrypoint, base_dir, "entrypoint")
        tracking.preflight(spec)
        return None
    info = check_data(spec, base_dir)
    check_model(spec, info, base_dir)
    check_init_from(spec)
    tracking.preflight(spec)
    return info


def check_resources(spec: JobSpec) -> None:
    """The CPUs (and GPUs) the workers ask for exist on this machine (a run that attaches to a cluster asks the cluster)."""
    cpus = os.cpu_count() or 1
    need = max(1, spec.scaling.max_workers) * spec.scaling.cpus_per_worker
    if need > cpus:
        raise BadInput(
            f"scaling.num_workers: {spec.scaling.max_workers} worker(s) x {spec.scaling.cpus_per_worker:g} CPU need {need:g} CPUs; this machine has {cpus}"
        )
    if spec.scaling.use_gpu:
        import torch  # only a GPU job needs torch this early

        if not torch.cuda.is_available():
            raise BadInput("scaling.use_gpu: no CUDA GPU on this machine")
        if spec.scaling.max_workers > torch.cuda.device_count():
            raise BadInput(
                f"scaling.num_workers: {spec.scaling.max_workers} GPU workers but this machine has {torch.cuda.device_count()} GPU(s)"
            )


def check_model(spec: JobSpec, info: DataInfo, base_dir: str | None) -> None:
    """The model builds for the data's shapes."""
    from orchestrator.models import build_model  # torch: after the checks that need none

    try:
        build_model(spec, info, base_dir=base_dir)
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"model: cannot build {spec.model.name!r} for this data ({type(exc).__name__}: {exc})") from None


def check_init_from(spec: JobSpec) -> None:
    """`model.init_from` names weights that can be read."""
    if spec.model.init_from:
        load_weights(spec.model.init_from, spec.checkpoint.endpoint_url)
