"""Everything that can be wrong with a job's input, found before Ray starts: one checklist, one line per problem.

Each check raises BadInput naming the field, file or URI; nothing is written and no cluster starts.
The checks run cheapest first, except the trackers, last: a tracking server that does not answer
costs seconds.
"""

from __future__ import annotations

import fnmatch
import math
import os

from orchestrator import storage, tracking
from orchestrator.data import DataInfo, check_data
from orchestrator.errors import BadInput
from orchestrator.hooks import import_hook
from orchestrator.spec import JobSpec
from orchestrator.weights import load_weights


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
    model = check_model(spec, info, base_dir)
    check_init_from(spec, model)
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
    if spec.data.engine == "ray" and cpus - need < 1:
        # Ray Data's read tasks take a CPU each, from what the workers leave: with none left the run would wait forever.
        raise BadInput(
            f"data.engine: ray reads on CPUs the workers leave free, and {spec.scaling.max_workers} worker(s) x "
            f"{spec.scaling.cpus_per_worker:g} CPU leave {max(0.0, cpus - need):g} of this machine's {cpus}; lower "
            "scaling.cpus_per_worker (a fraction is fine) or use engine native"
        )
    if spec.scaling.use_gpu:
        import torch  # only a GPU job needs torch this early

        if not torch.cuda.is_available():
            raise BadInput("scaling.use_gpu: no CUDA GPU on this machine")
        if spec.scaling.max_workers > torch.cuda.device_count():
            raise BadInput(
                f"scaling.num_workers: {spec.scaling.max_workers} GPU workers but this machine has {torch.cuda.device_count()} GPU(s)"
            )


def check_model(spec: JobSpec, info: DataInfo, base_dir: str | None):
    """The model builds for the data's shapes and gives the task's output; every freeze pattern matches; something
    is left to train; the schedule fits the run. Returns the model.

    Cheap on the driver (a model is built, no data is loaded), and every failure here would otherwise
    surface only after the workers started and run.json was written. No optimizer is built: its arguments
    are the spec's, checked when the job was read (torch's constructors check nothing more), and building
    one imports torch's compiler machinery (torch._dynamo, about 2.4 s on two cores), which the worker
    that trains imports again.
    """
    from orchestrator.models import build_model, check_outputs  # torch: after the checks that need none
    from orchestrator.optim import check_schedule

    try:
        model = build_model(spec, info, base_dir=base_dir)
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"model: cannot build {spec.model.name!r} for this data ({type(exc).__name__}: {exc})") from None
    check_outputs(model, spec, info, strict=False)
    names = [name for name, _ in model.named_parameters()]
    for pattern in spec.model.freeze:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise BadInput(f"model.freeze: {pattern!r} matches no parameter of {spec.model.name} (they are: {shown})")
    if spec.scaling.strategy == "fsdp":
        from orchestrator.models import block_modules

        try:
            block_modules(model, spec.model.name, spec.scaling.fsdp.blocks)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    frozen = spec.model.freeze
    if not any(
        param.requires_grad and not any(fnmatch.fnmatchcase(name, pattern) for pattern in frozen)
        for name, param in model.named_parameters()
    ):
        raise BadInput("optim: the model has no trainable parameters (are they all frozen by model.freeze?)")
    try:
        check_schedule(spec.schedule, estimated_total_steps(spec, info))
    except Exception as exc:
        raise BadInput(f"schedule: {_one_line(exc)}") from None
    return model


def estimated_total_steps(spec: JobSpec, info: DataInfo) -> int:
    """The run's optimizer steps as the loop will count them, from the split sizes (estimated for some Parquet)."""
    workers = max(1, spec.scaling.max_workers)
    batches = max(1, info.sizes.get("train", 0) // (spec.train.batch_size * workers))
    total = math.ceil(batches / spec.train.grad_accum_steps) * spec.train.epochs
    return min(total, spec.train.max_steps) if spec.train.max_steps else total


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_init_from(spec: JobSpec, model) -> None:
    """`model.init_from` names weights that can be read, some of which fit the model (by name and shape).

    None fitting is a run that would train from scratch while saying it started from those weights.
    """
    if not spec.model.init_from:
        return
    weights = load_weights(spec.model.init_from, spec.checkpoint.endpoint_url)
    own = model.state_dict()
    if not any(k in own and tuple(own[k].shape) == tuple(getattr(v, "shape", ())) for k, v in weights.items()):
        ours, theirs = sorted(own), sorted(weights)
        raise BadInput(
            f"model.init_from: none of the {len(theirs)} tensors of {spec.model.init_from} fits {spec.model.name} by name "
            f"and shape (they are: {_some(theirs)}; the model's are: {_some(ours)})"
        )


def _some(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "") if names else "none"
