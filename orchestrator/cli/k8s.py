"""The `k8s` group: a job (or its cross-validation) as a KubeRay RayJob, rendered or applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from orchestrator.cli.common import CONTEXT, epilog, friendly_errors, job_file_argument, main, overrides_argument


@main.group(
    context_settings=CONTEXT,
    epilog=epilog(
        "orchestrator k8s render jobs/digits_mlp.yaml checkpoint.storage=s3://bucket/runs",
        "orchestrator k8s apply jobs/digits_mlp.yaml checkpoint.storage=s3://bucket/runs",
    ),
)
def k8s() -> None:
    """Kubernetes through KubeRay: render a job (or its cross-validation) as a RayJob, or apply it with kubectl."""


def k8s_options(fn: Callable) -> Callable:
    """The options `k8s render` and `k8s apply` share: what to run, where, and for how long."""
    options = [
        click.option(
            "--image",
            default=None,
            help="Job image, pinned to a tag or digest [default: orchestrator:<version>, -gpu for GPU jobs].",
        ),
        click.option(
            "--namespace", default="orchestrator", help="Namespace of the ConfigMap and RayJob [default: orchestrator]."
        ),
        click.option(
            "--cluster",
            default=None,
            metavar="NAME",
            help="Run on this existing RayCluster [default: a new RayCluster for the job, deleted --ttl seconds after it].",
        ),
        click.option(
            "--worker-memory",
            default=None,
            help="Memory of a worker pod, e.g. 16Gi [default: 4Gi per CPU, 8Gi more per GPU].",
        ),
        click.option(
            "--ttl",
            "ttl_seconds",
            type=int,
            default=None,
            help="Seconds the finished job's cluster is kept for its logs [default: 600].",
        ),
        click.option(
            "--deadline",
            "deadline_seconds",
            type=int,
            default=None,
            help="Seconds the job may run before KubeRay stops it [default: 7 days].",
        ),
        click.option(
            "--cv",
            is_flag=True,
            help="Run the job's k-fold cross-validation (`orchestrator cv`, data.folds folds side by side) instead of one run.",
        ),
        click.option(
            "--refit",
            is_flag=True,
            help="With --cv: then train once on all non-test data (as `orchestrator cv --refit`).",
        ),
        click.option(
            "--queue",
            default=None,
            help="Queue the RayJob in this Kueue LocalQueue: labelled kueue.x-k8s.io/queue-name, created suspended until "
            "Kueue admits it (needs a cluster of its own: not with --cluster).",
        ),
        click.option(
            "--service-account",
            default=None,
            help="Run the pods as this existing ServiceAccount (e.g. one with an IAM role for the bucket) "
            "[default: one of the job's own, rendered with it].",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _render_k8s(job_file: str, overrides: tuple[str, ...], **options: Any) -> list[dict[str, Any]]:
    from orchestrator.k8s import render_job_file

    # Options left out take render_manifests' defaults, so the defaults live in one place.
    manifests, warnings = render_job_file(
        job_file, list(overrides), **{k: v for k, v in options.items() if v is not None}
    )
    for line in warnings:
        click.echo(f"warning: {line}", err=True)
    return manifests


@k8s.command(
    "render",
    epilog=epilog(
        "orchestrator k8s render jobs/digits_mlp.yaml checkpoint.storage=s3://bucket/runs > rayjob.yaml",
        "orchestrator k8s render jobs/cv_digits.yaml checkpoint.storage=s3://bucket/runs --cv --refit --namespace ml",
        overrides=True,
    ),
)
@job_file_argument
@overrides_argument
@k8s_options
@friendly_errors
def k8s_render(job_file: str, overrides: tuple[str, ...], **options: Any) -> None:
    """Print what a job (with overrides) needs on Kubernetes as YAML: ServiceAccount, NetworkPolicy, ConfigMap, RayJob."""
    from orchestrator.k8s import dump_manifests

    click.echo(dump_manifests(_render_k8s(job_file, overrides, **options)), nl=False)


@k8s.command(
    "apply",
    epilog=epilog(
        "orchestrator k8s apply jobs/digits_mlp.yaml checkpoint.storage=s3://bucket/runs",
        "orchestrator k8s apply jobs/digits_mlp.yaml checkpoint.storage=s3://bucket/runs --cluster shared --namespace ml",
        overrides=True,
    ),
)
@job_file_argument
@overrides_argument
@k8s_options
@friendly_errors
def k8s_apply(job_file: str, overrides: tuple[str, ...], **options: Any) -> None:
    """Render a job and `kubectl apply` it in the current kubectl context."""
    from orchestrator.k8s import apply_manifests, job_names

    manifests = _render_k8s(job_file, overrides, **options)
    click.echo(apply_manifests(manifests), nl=False)
    name, namespace = job_names(manifests)["RayJob"], options["namespace"]
    click.echo(
        f"follow it: kubectl -n {namespace} get rayjob {name} -w; kubectl -n {namespace} logs -f job/{name}", err=True
    )
