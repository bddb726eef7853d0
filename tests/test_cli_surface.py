"""What a person reads and types: the help, one meaning per option name, the renamed options refused with what to
use, `validate` of every file the README shows, and a Python that lacks a package told so in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from commands import run_command
from python_envs import python_without

from orchestrator.cli.common import OVERRIDES_HELP, SECTIONS, main
from orchestrator.environment import REQUIRED_MODULES

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, python=sys.executable, timeout=120):
    return run_command(
        [python, "-m", "orchestrator", *args], cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout
    )


def one_error(res, starts: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: {starts}"), res.stderr


def every_command() -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in main.commands.items():
        out.append((name, cmd))
        for sub, subcmd in getattr(cmd, "commands", {}).items():
            out.append((f"{name} {sub}", subcmd))
    return out


# ----------------------------------------------------------------------------------------------
# The help


def test_the_top_help_lists_every_command_once_by_where_it_acts_and_cuts_nothing():
    res = cli("--help")
    assert res.returncode == 0
    text = res.stdout
    titles = [title for title, _ in SECTIONS]
    assert [t for t in titles if f"{t}:" in text] == titles
    assert [text.index(f"{t}:") for t in titles] == sorted(text.index(f"{t}:") for t in titles)
    listed = [name for _, names in SECTIONS for name in names]
    assert sorted(listed) == sorted(main.commands) and "Other:" not in text  # a new command must get a section
    commands = text.split("Options:")[1]
    assert "..." not in commands  # click cuts a long first sentence with "...": none is cut
    assert "train the example job here" in text


@pytest.mark.parametrize("name", [name for name, _ in every_command()])
def test_every_help_has_an_example_and_explains_overrides_where_they_apply(name):
    res = cli(*name.split(), "--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "Examples: orchestrator " in text, res.stdout
    command = dict(every_command())[name]
    takes_overrides = any(p.name == "overrides" for p in command.params)
    assert (" ".join(OVERRIDES_HELP.split()) in text) == takes_overrides
    # Defaults are shown one way: at the end of the help, as [default: ...].
    assert "(default:" not in text and "default is" not in text


def test_one_meaning_per_option_name():
    """An option name means the same on every command: --address a cluster's dashboard, --ray-address the Ray this
    process trains on, --endpoint-url an S3 endpoint, --wait only `stop`'s."""
    helps: dict[str, list[str]] = {}
    for _, cmd in every_command():
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                helps.setdefault(p.opts[0], []).append(p.help)
    assert all("dashboard, e.g. http://HOST:8265" in h for h in helps["--address"]), helps["--address"]
    assert len(helps["--address"]) == 9  # run, sweep, cv, submit, status, logs, stop, list, doctor
    assert len(set(helps["--ray-address"])) == 1 and len(helps["--ray-address"]) == 3  # run, sweep, cv
    assert len(set(helps["--endpoint-url"])) == 1
    waits = {name for name, cmd in every_command() for p in cmd.params if "--wait" in p.opts and not p.hidden}
    assert waits == {"stop"}
    for name in ("runs", "report", "checkpoints", "export"):  # every command that reads storage
        assert any("--endpoint-url" in p.opts for p in main.commands[name].params), name


# ----------------------------------------------------------------------------------------------
# Renamed options: refused with one line that says what to use, before anything starts


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["run", "jobs/digits_mlp.yaml", "--address", "10.0.0.5:6379"],
            "--address 10.0.0.5:6379: --address now names a cluster's dashboard (http://HOST:8265), as for `submit`; what it meant here before is --ray-address 10.0.0.5:6379",
        ),
        (
            ["run", "jobs/digits_mlp.yaml", "--address", "auto"],
            "--address auto: --address now names a cluster's dashboard",
        ),
        (["sweep", "jobs/sweep_digits_lr.yaml", "--address", "auto"], "--address auto: --address now names"),
        (["cv", "jobs/cv_digits.yaml", "--address", "local"], "--address local: --address now names"),
        (["run", "jobs/digits_mlp.yaml", "--wait"], "--wait: renamed --wait-for-lease"),
        (["submit", "jobs/digits_mlp.yaml", "--wait"], "--wait: renamed --follow"),
        (
            ["run", "jobs/digits_mlp.yaml", "--ray-address", "http://10.0.0.5:8265"],
            "--ray-address http://10.0.0.5:8265: that is a dashboard's URL; to run the job on that cluster use --address http://10.0.0.5:8265",
        ),
        (
            ["run", "jobs/digits_mlp.yaml", "--ray-address", "head"],
            "--ray-address head: give HOST:PORT of a running Ray",
        ),
        (
            ["run", "jobs/digits_mlp.yaml", "--address", "http://127.0.0.1:9", "--ray-address", "auto"],
            "--ray-address, --verbose and --wait-for-lease apply to a run from this process",
        ),
    ],
)
def test_renamed_and_misplaced_options_are_refused_with_what_to_use(args, message, tmp_path):
    res = cli(*args, f"checkpoint.storage={tmp_path}")
    one_error(res, message)
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_run_at_a_dashboard_that_does_not_answer_is_one_line_and_leaves_no_run(tmp_path):
    """Once a Ray ValueError traceback that left run.json `running`: now the dashboard is checked before anything."""
    res = cli("run", "jobs/digits_mlp.yaml", f"checkpoint.storage={tmp_path}", "--address", "http://127.0.0.1:9")
    one_error(res, "--address http://127.0.0.1:9: no Ray dashboard answers there")
    assert list(tmp_path.iterdir()) == []


def test_a_submitted_job_id_must_be_one(tmp_path):
    one_error(
        cli("submit", "jobs/digits_mlp.yaml", "--address", "http://127.0.0.1:9", "--job-id", "a b"),
        "--job-id 'a b': a job id is 1 to 200 characters without spaces",
    )


# ----------------------------------------------------------------------------------------------
# validate


def test_validate_takes_a_sweep_file_that_names_its_job(tmp_path):
    (tmp_path / "digits_mlp.yaml").write_text((ROOT / "jobs" / "digits_mlp.yaml").read_text())
    # The README's form, as it shows it.
    (tmp_path / "sweep.yaml").write_text(
        "job: digits_mlp.yaml               # relative to this file\n"
        "train: {epochs: 6}\n"
        "sweep:\n"
        "  parameters: {optim.lr: {type: grid, values: [1e-3, 1e-2]}}\n"
        "  metric: val_accuracy\n"
    )
    res = cli("validate", str(tmp_path / "sweep.yaml"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (
        f"{tmp_path / 'sweep.yaml'}: valid (digits-mlp: mlp on digits, adamw lr=0.003; "
        "sweep digits-mlp-sweep: 1 trials over optim.lr, fifo)"
    )
    js = cli("validate", str(tmp_path / "sweep.yaml"), "--json")
    job = json.loads(js.stdout)
    assert job["train"]["epochs"] == 6 and job["sweep"]["parameters"]["optim.lr"]["values"] == [1e-3, 1e-2]


def test_validate_refuses_an_unknown_field_in_sweep_parameters_with_a_suggestion(tmp_path):
    (tmp_path / "sweep.yaml").write_text(
        (ROOT / "jobs" / "sweep_digits_lr.yaml").read_text().replace("optim.lr:", "optim.lrr:")
    )
    assert "optim.lrr:" in (tmp_path / "sweep.yaml").read_text()
    one_error(
        cli("validate", str(tmp_path / "sweep.yaml")),
        "sweep.parameters.optim.lrr: not a field of the job (optim.lrr: unknown field (did you mean 'lr'?))",
    )


def test_validate_describes_a_bring_your_own_loop_by_its_loop_not_by_unused_defaults():
    res = cli("validate", "jobs/byo_loop.yaml")
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout.strip()
        == "jobs/byo_loop.yaml: valid (byo-loop: your loop byo_loop:train_loop_per_worker on 1 worker)"
    )


def test_validate_of_a_sweep_imports_neither_torch_nor_ray():
    code = (
        "import sys\nfrom orchestrator.cli import main\n"
        "for args in (['validate', 'jobs/sweep_digits_asha.yaml'], ['validate', 'jobs/digits_mlp.yaml'], ['--help']):\n"
        "    try:\n        main(args, standalone_mode=False)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, 'ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "False False", out.stderr


# ----------------------------------------------------------------------------------------------
# A Python without a package orchestrator needs


def test_the_required_modules_are_pyprojects_dependencies():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for d in deps}
    assert names == {d.lower() for d in REQUIRED_MODULES.values()}


def test_a_python_without_torch_is_told_so_in_one_line_before_a_run_starts(tmp_path_factory, tmp_path):
    bin_dir = python_without(tmp_path_factory.mktemp("venv-notorch"), "torch", "functorch", "torchgen")
    python = str(bin_dir / "python")
    for args in (
        ["run", "jobs/digits_mlp.yaml"],
        ["sweep", "jobs/sweep_digits_lr.yaml"],
        ["cv", "jobs/cv_digits.yaml"],
    ):
        res = cli(*args, f"checkpoint.storage={tmp_path}", python=python)
        assert res.returncode == 1 and res.stdout == "", (args, res.stderr)
        assert res.stderr.strip() == (
            f"error: missing package: {python} (Python {sys.version.split()[0]}) cannot import torch, which "
            "orchestrator needs; install orchestrator's requirements into it (pip install torch)"
        ), res.stderr
    assert list(tmp_path.iterdir()) == []
    assert cli("validate", "jobs/digits_mlp.yaml", python=python).returncode == 0  # validate needs no torch
