"""The command line: parse, call the library, print. Heavy modules (torch, ray) are imported lazily."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from orchestrator.errors import BadInput, RunFailed
from orchestrator.storage import redact

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def print_json(obj: Any) -> None:
    """The machine-readable result: one JSON object on the last line of stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def friendly_errors(fn: Callable) -> Callable:
    """Turn BadInput into one line per problem on stderr and exit 2; RunFailed into exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as exc:
            for line in exc.lines:
                click.echo(f"error: {redact(line)}", err=True)
            sys.exit(exc.exit_code)
        except RunFailed as exc:
            click.echo(f"failed: {redact(str(exc))}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def plain_cells(*values: Any) -> list[Any]:
    """Table cells shown as written: run names, URIs and metric names are data, not rich markup (`[red]x`)."""
    from rich.text import Text

    return [Text(str(v)) for v in values]


def console():
    """A rich console; piped output is not wrapped at 80 columns, so URIs stay whole for grep and scripts."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


job_file_argument = click.argument("job_file", type=click.Path(dir_okay=False))
overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


class OneLineErrors(click.Group):
    """The top-level group: a usage error (bad option, missing argument, a directory for a file) is one line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
            message = redact(" ".join(exc.format_message().split()))
            click.echo(f"error: {message}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=OneLineErrors, context_settings=CONTEXT)
@click.version_option(package_name="orchestrator")
def main() -> None:
    """Train PyTorch models from one job file: locally, on a Ray cluster, or on Kubernetes."""


@main.command()
@job_file_argument
@overrides_argument
@click.option("--json", "as_json", is_flag=True, help="Print the resolved job as JSON.")
@friendly_errors
def validate(job_file: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check a job file (with overrides); exit 2 with one line per problem."""
    from orchestrator.spec import load_spec

    spec = load_spec(job_file, list(overrides))
    if as_json:
        print_json(spec.to_dict())
    else:
        click.echo(
            f"{job_file}: valid ({spec.name}: {spec.model.name} on {spec.data.name}, {spec.optim.name} lr={spec.optim.lr:g})"
        )


@main.command()
@job_file_argument
@overrides_argument
@click.option(
    "--address",
    envvar="ORCHESTRATOR_RAY_ADDRESS",
    default=None,
    help="Ray to run on: HOST:PORT or auto [default: a Ray already up on this machine, else a new embedded one; local: always a new one].",
)
@click.option("--fresh", is_flag=True, help="Start a new run under a new name instead of resuming this one.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON summary on the last line of stdout.")
@click.option(
    "--verbose", is_flag=True, help="Show Ray's and the workers' own output too (it is always in <run>/run.log)."
)
@click.option(
    "--wait", is_flag=True, help="If another run is using the run directory, wait for it to end instead of refusing."
)
@friendly_errors
def run(
    job_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    fresh: bool,
    as_json: bool,
    verbose: bool,
    wait: bool,
) -> None:
    """Train a job on this machine (embedded Ray) or on the cluster at --address."""
    from orchestrator.console import RunConsole, prepare_ray_output
    from orchestrator.launch import run_job
    from orchestrator.runrecord import RunStatus
    from orchestrator.spec import load_spec

    spec = load_spec(job_file, list(overrides))
    prepare_ray_output()
    stream = sys.stderr if as_json else sys.stdout
    console = RunConsole(
        stream, live=stream.isatty() and os.environ.get("TERM") != "dumb" and not as_json, verbose=verbose
    )
    summary = run_job(
        spec, job_file=job_file, address=address, fresh=fresh, quiet=as_json, console=console, capture=True, wait=wait
    )
    if as_json:
        print_json(summary.to_dict())
    if summary.status == RunStatus.FAILED:
        sys.exit(1)


@main.command()
@click.argument("run_uri")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@friendly_errors
def checkpoints(run_uri: str, as_json: bool) -> None:
    """List the committed checkpoints of a run (step, metrics, size, URI)."""
    from orchestrator.checkpoint import list_checkpoints
    from orchestrator.storage import open_storage

    fs, root = open_storage(run_uri)
    found = list_checkpoints(fs, root, uri_prefix=run_uri)
    if as_json:
        print_json([c.to_dict() for c in found])
        return
    if not found:
        raise BadInput(f"{run_uri}: no committed checkpoint here")
    from rich.table import Table

    table = Table("step", "epoch", "metrics", "size", "uri")
    for c in found:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in c.metrics.items() if isinstance(v, (int, float)))
        table.add_row(*plain_cells(c.step, c.epoch, shown, f"{c.size / 1e6:.2f} MB", c.uri))
    console().print(table)


@main.command()
@click.argument("checkpoint_uri")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the weights (safetensors).")
@friendly_errors
def export(checkpoint_uri: str, out: str) -> None:
    """Copy a checkpoint's weights out as one safetensors file."""
    from orchestrator.checkpoint import export_weights

    size = export_weights(checkpoint_uri, out)
    click.echo(f"wrote {out} ({size / 1e6:.2f} MB)")


@main.group(context_settings=CONTEXT)
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
            "--namespace", default="orchestrator", show_default=True, help="Namespace of the ConfigMap and RayJob."
        ),
        click.option(
            "--cluster", default=None, help="Run on this existing RayCluster instead of a new cluster per job."
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


@k8s.command("render")
@job_file_argument
@overrides_argument
@k8s_options
@friendly_errors
def k8s_render(job_file: str, overrides: tuple[str, ...], **options: Any) -> None:
    """Print the ConfigMap and RayJob of a job (with overrides) as YAML."""
    from orchestrator.k8s import dump_manifests

    click.echo(dump_manifests(_render_k8s(job_file, overrides, **options)), nl=False)


@k8s.command("apply")
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


# ----------------------------------------------------------------------------------------------
# Ray clusters through the Jobs API (orchestrator/cluster.py)

address_option = click.option(
    "--address",
    default=None,
    metavar="URL",
    help="The cluster's dashboard, e.g. http://HOST:8265 [default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS]. "
    "The auth token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
)


@main.command()
@job_file_argument
@overrides_argument
@address_option
@click.option("--wait", is_flag=True, help="Follow the job's output to its end; exit 1 unless it succeeds.")
@click.option("--fresh", is_flag=True, help="Start a new run under a new name instead of resuming this one.")
@click.option(
    "--include",
    "includes",
    multiple=True,
    metavar="PATTERN",
    help="Ship secret-looking files matching this .gitignore-style pattern anyway (.env, *.pem, .aws/, ... are left out by default).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="End with one JSON object on stdout (with --wait: the final status and run summary).",
)
@friendly_errors
def submit(
    job_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    wait: bool,
    fresh: bool,
    includes: tuple[str, ...],
    as_json: bool,
) -> None:
    """Submit a job to a Ray cluster (Jobs API) with the code in its directory; print the job id."""
    from orchestrator.cluster import RayJobsBackend, follow_to_end, format_status, prepare_submission, summary_from_logs

    backend = RayJobsBackend(address)
    submission = prepare_submission(job_file, list(overrides), backend, fresh=fresh, includes=includes)
    for line in submission["warnings"]:
        click.echo(f"warning: {line}", err=True)
    job_id = backend.submit(submission)
    package = submission["package"]
    click.echo(
        f"submitted {job_id} to {redact(backend.address)} ({package['files']} files, {package['bytes'] / 1e6:.2f} MB from {package['dir']})",
        err=True,
    )
    if not wait:
        if as_json:
            print_json(
                {
                    "submission_id": job_id,
                    "address": redact(backend.address),
                    "run": submission["metadata"]["orchestrator_run"],
                }
            )
        else:
            click.echo(job_id)
            click.echo(f"follow it: orchestrator logs {job_id} --follow --address {redact(backend.address)}", err=True)
        return
    final = follow_to_end(backend, job_id, out=sys.stderr if as_json else sys.stdout)
    if as_json:
        print_json({**final, "address": redact(backend.address), "summary": summary_from_logs(backend.logs(job_id))})
    else:
        click.echo(format_status(final))
    if final["status"] != "SUCCEEDED":
        reason = (final.get("message") or "").strip().splitlines()
        raise RunFailed(f"{job_id} {final['status']}" + (f": {reason[0]}" if reason else ""))


@main.command()
@click.argument("job_id")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@friendly_errors
def status(job_id: str, address: str | None, as_json: bool) -> None:
    """Show a submitted job: its state, run, times and why it ended."""
    from orchestrator.cluster import RayJobsBackend, format_status

    job = RayJobsBackend(address).status(job_id)
    if as_json:
        print_json(job)
    else:
        click.echo(format_status(job))


@main.command()
@click.argument("job_id")
@address_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@friendly_errors
def logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print what a submitted job's driver printed (all of it, or as it comes with --follow)."""
    from orchestrator.cluster import RayJobsBackend

    backend = RayJobsBackend(address)
    if not follow:
        click.echo(backend.logs(job_id), nl=False)
        return
    for chunk in backend.follow(job_id):
        click.echo(chunk, nl=False)


@main.command()
@click.argument("job_id")
@address_option
@click.option("--wait", is_flag=True, help="Return once the job has stopped.")
@friendly_errors
def stop(job_id: str, address: str | None, wait: bool) -> None:
    """Stop a submitted job (its checkpoints stay; submitting it again resumes)."""
    from orchestrator.cluster import RayJobsBackend

    backend = RayJobsBackend(address)
    if not backend.stop(job_id):
        click.echo(f"{job_id} had already ended ({backend.status(job_id)['status']})")
        return
    if wait:
        click.echo(f"{job_id} {backend.wait(job_id, timeout=120)['status']}")
    else:
        click.echo(f"stopping {job_id}")


@main.command("list")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
@friendly_errors
def list_jobs(address: str | None, as_json: bool) -> None:
    """List the jobs submitted to a cluster, newest first."""
    from orchestrator.cluster import RayJobsBackend, format_jobs

    jobs = RayJobsBackend(address).list()
    if as_json:
        print_json(jobs)
        return
    if not jobs:
        click.echo("no submitted jobs")
        return
    console().print(format_jobs(jobs))


# ----------------------------------------------------------------------------------------------
# Hyper-parameter sweeps with Ray Tune (orchestrator/sweep.py)


@main.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@overrides_argument
@click.option(
    "--address",
    envvar="ORCHESTRATOR_RAY_ADDRESS",
    default=None,
    help="A cluster's dashboard (http://HOST:8265): submit the sweep there through the Jobs API and follow it; "
    "or Ray itself (auto, HOST:PORT): run the trials there from this process.",
)
@click.option("--fresh", is_flag=True, help="Start a new sweep under a new name instead of continuing this one.")
@click.option(
    "--best-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the best trial's job file [default: <sweep>/best.yaml on storage].",
)
@click.option("--verbose", is_flag=True, help="Show every trial's training progress, not only the live view.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="End with one JSON object (trials, best, best_job_file) on the last line of stdout.",
)
@friendly_errors
def sweep(
    sweep_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    fresh: bool,
    best_out: str | None,
    verbose: bool,
    as_json: bool,
) -> None:
    """Sweep hyper-parameters of a job with Ray Tune (its `sweep` section); rerun to continue an interrupted sweep."""
    from orchestrator.runrecord import RunStatus
    from orchestrator.sweep import format_result, is_dashboard_address, load_sweep, run_sweep, submit_sweep

    job = load_sweep(sweep_file, list(overrides), fresh=fresh)
    if is_dashboard_address(address):
        if best_out or verbose:
            raise BadInput(
                "--best-out and --verbose apply to a sweep run from here; a submitted sweep writes <sweep>/best.yaml on its storage"
            )
        # A fresh name is decided here, once: the cluster must not pick another one.
        pinned = list(overrides) + ([f"sweep.name={job.name}"] if fresh else [])
        result = submit_sweep(job, pinned, address, out=sys.stderr if as_json else sys.stdout)
    else:
        result = run_sweep(job, address=address, best_out=best_out, quiet=as_json, verbose=verbose)
    if as_json:
        print_json(result)
    else:
        table, text = format_result(result)
        console().print(table)
        click.echo(text)
    if result.get("status") != RunStatus.FINISHED:
        sys.exit(1)


@main.command()
@job_file_argument
@overrides_argument
@click.option(
    "--address",
    envvar="ORCHESTRATOR_RAY_ADDRESS",
    default=None,
    help="A cluster's dashboard (http://HOST:8265): submit the cross-validation there through the Jobs API and follow it; "
    "or Ray itself (auto, HOST:PORT): run the folds there from this process [default: a Ray already up on this machine, else a new embedded one].",
)
@click.option(
    "--fresh", is_flag=True, help="Start a new cross-validation under a new name instead of continuing this one."
)
@click.option(
    "--refit",
    is_flag=True,
    help="Then train once on all non-test data for the folds' mean best epoch count, test it, and name that checkpoint.",
)
@click.option("--verbose", is_flag=True, help="Show every fold's training progress, not only the live view.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="End with one JSON object (cv.json: folds, metrics) on the last line of stdout.",
)
@friendly_errors
def cv(
    job_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    fresh: bool,
    refit: bool,
    verbose: bool,
    as_json: bool,
) -> None:
    """K-fold cross-validation of a job (data.folds folds, in parallel): each fold's best, mean, std, 95% CI; rerun to continue."""
    from orchestrator.cv import format_cv, load_cv, run_cv
    from orchestrator.runrecord import RunStatus
    from orchestrator.sweep import is_dashboard_address

    if is_dashboard_address(address):
        from orchestrator.cv import submit_cv

        if verbose:
            raise BadInput(
                "--verbose applies to a cross-validation run from here; `orchestrator logs` shows a submitted one's"
            )
        result = submit_cv(
            job_file, list(overrides), address, fresh=fresh, refit=refit, out=sys.stderr if as_json else sys.stdout
        )
    else:
        job = load_cv(job_file, list(overrides), fresh=fresh)
        result = run_cv(job, address=address, quiet=as_json, verbose=verbose, refit=refit)
    if as_json:
        print_json(result)
    else:
        table, text = format_cv(result)
        console().print(table)
        click.echo(text)
    refit_status = (result.get("refit") or {}).get("status", RunStatus.FINISHED)
    if result.get("status") != RunStatus.FINISHED or refit_status != RunStatus.FINISHED:
        sys.exit(1)


# ----------------------------------------------------------------------------------------------
# What runs left behind (orchestrator/report/)


@main.command()
@click.argument("uri")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the report to this local file [default: <URI>/report.html].",
)
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint of the URI [default: $AWS_ENDPOINT_URL].")
@click.option("--json", "as_json", is_flag=True, help='Print {"report": where it went} as JSON.')
@friendly_errors
def report(uri: str, out: str | None, endpoint_url: str | None, as_json: bool) -> None:
    """Write the offline HTML report (plots, settings, provenance) of a run or a sweep."""
    from orchestrator.report import write_report

    where = write_report(uri, out=out, endpoint_url=endpoint_url)
    if as_json:
        print_json({"report": where})
    else:
        click.echo(f"wrote {redact(where)}")


@main.command()
@click.argument("storage_uri", required=False, default="runs", metavar="[STORAGE]")
@click.option(
    "--endpoint-url", default=None, help="S3-compatible endpoint of the storage [default: $AWS_ENDPOINT_URL]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@friendly_errors
def runs(storage_uri: str, endpoint_url: str | None, as_json: bool) -> None:
    """List the runs and sweeps under a storage (default: runs), newest first."""
    from orchestrator.report import list_runs

    found = list_runs(storage_uri, endpoint_url)
    if as_json:
        print_json(found)
        return
    if not found:
        click.echo(f"no runs under {redact(storage_uri)}")
        return
    from rich.table import Table

    table = Table("name", "kind", "status", "started", "steps", "best", "wall", "uri")
    for r in found:
        best = f"{r['best_metric']} {r['best_value']:.4f}" if isinstance(r.get("best_value"), (int, float)) else "-"
        wall = f"{r['wall_s']:.1f}s" if isinstance(r.get("wall_s"), (int, float)) else "-"
        started = (r.get("started") or "-")[:19].replace("T", " ")
        table.add_row(
            *plain_cells(
                r["name"],
                r["kind"],
                r.get("status") or "-",
                started,
                r["steps"] if r.get("steps") is not None else "-",
                best,
                wall,
                r["uri"],
            )
        )
    console().print(table)


def command() -> None:
    """The `orchestrator` command (and `python -m orchestrator`): `main`, then an exit without the interpreter's teardown.

    Tearing down an interpreter that imported torch and its compiler frontend (which the first optimizer step
    imports) takes seconds of a CPU after the command's work is done (measured: `import torch._dynamo`, then
    a normal exit, 2.1 s more than the same with `os._exit`), on every command that trained. What the normal
    exit does that matters still happens: the atexit handlers run (log handlers flushed, Ray disconnected,
    temporary directories removed, child processes reaped) and the standard streams are flushed. Where a
    non-daemon thread still runs, the interpreter's own exit waits for it, as it always has.
    """
    import atexit
    import threading

    try:
        returned = main()  # click's non-standalone main returns an exit code (--help, --version) or a command's value
        code = returned if type(returned) is int else 0
    except SystemExit as exc:
        if exc.code is not None and type(exc.code) is not int:
            raise  # a message: the interpreter prints it and exits 1
        code = exc.code or 0
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: nothing left to say on it
            pass
    os._exit(code)


if __name__ == "__main__":
    command()
