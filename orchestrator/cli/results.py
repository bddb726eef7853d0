"""What runs left behind (orchestrator/report/): report, runs."""

from __future__ import annotations

import click

from orchestrator.cli.common import console, endpoint_option, epilog, friendly_errors, main, plain_cells, print_json
from orchestrator.storage import redact


@main.command(
    epilog=epilog(
        "orchestrator report runs/digits-mlp                       # writes runs/digits-mlp/report.html",
        "orchestrator report runs/digits-asha --out sweep.html --force",
    )
)
@click.argument("uri")
@click.option(
    "--out",
    default=None,
    metavar="FILE",
    help="Write the report to this local file instead, never one inside a run [default: <URI>/report.html].",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists [default: refuse].")
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help='Print {"report": where it went} as JSON.')
@friendly_errors
def report(uri: str, out: str | None, force: bool, endpoint_url: str | None, as_json: bool) -> None:
    """Write the offline HTML report (plots, settings, provenance) of a run, a sweep or a cross-validation."""
    from orchestrator.report import write_report
    from orchestrator.storage import use_interactive_deadline

    use_interactive_deadline()
    where = write_report(uri, out=out, endpoint_url=endpoint_url, force=force)
    if as_json:
        print_json({"report": where})
    else:
        click.echo(f"wrote {redact(where)}")


@main.command(
    epilog=epilog("orchestrator runs", "orchestrator runs s3://bucket/runs --endpoint-url http://minio:9000 --json")
    + "\n\nSTORAGE is a job's checkpoint.storage: a local directory or s3://bucket/prefix [default: runs]."
)
@click.argument("storage_uri", required=False, default="runs", metavar="[STORAGE]")
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@friendly_errors
def runs(storage_uri: str, endpoint_url: str | None, as_json: bool) -> None:
    """List the runs, sweeps and cross-validations under a storage, newest first."""
    from orchestrator.report import list_runs
    from orchestrator.storage import use_interactive_deadline

    use_interactive_deadline()
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
                (r.get("status") or "-") + (f" ({r['hint']})" if r.get("hint") else ""),
                started,
                r["steps"] if r.get("steps") is not None else "-",
                best,
                wall,
                r["uri"],
            )
        )
    console().print(table)
