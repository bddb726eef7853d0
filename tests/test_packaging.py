"""The package installs what it imports: every module orchestrator/ imports is a declared dependency, and a plain
`pip install` (no extras) into a fresh environment runs a job whose checkpoint goes to S3 in parts."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from commands import run_command

ROOT = Path(__file__).resolve().parents[1]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings (`ray[train]>=2.6` -> `ray`), normalised."""
    return {_normal(re.match(r"[A-Za-z0-9][A-Za-z0-9_.-]*", r.strip()).group(0)) for r in requirements}


def imported_modules() -> dict[str, list[tuple[str, bool]]]:
    """Top-level third-party modules orchestrator/ imports: module -> [(file, imported at the module's top level)]."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                module = name.split(".")[0]
                if module not in sys.stdlib_module_names and module != "orchestrator":
                    found.setdefault(module, []).append((str(path.relative_to(ROOT)), id(node) in top))
    return found


def test_every_module_the_package_imports_is_a_declared_runtime_dependency():
    """A module only a test extra brought (boto3 was one: the first checkpoint of 16 MiB to S3 failed) is missing."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _names(project["dependencies"])
    optional = {
        extra: _names(reqs) for extra, reqs in project.get("optional-dependencies", {}).items() if extra != "test"
    }
    providers = importlib.metadata.packages_distributions()
    missing, eager = [], []
    for module, places in sorted(imported_modules().items()):
        dists = {_normal(d) for d in providers.get(module, [module])}
        if dists & runtime:
            continue
        extras = [extra for extra, names in optional.items() if dists & names]
        if not extras:
            missing.append(f"{module} ({', '.join(sorted(dists))}) imported by {sorted({f for f, _ in places})}")
        elif any(at_top for _, at_top in places):
            # An extra's module is imported where its feature is used, so the package imports without it.
            eager.append(f"{module} (extra {extras[0]}) at the top of {[f for f, at_top in places if at_top]}")
    assert missing == [], "not a declared runtime dependency: " + "; ".join(missing)
    assert eager == [], "; ".join(eager)


# An MLP of 3 x 2048 on digits: 8.6M parameters, 35 MB of weights (and twice that of AdamW state): objects of
# 16 MiB and more go up through boto3's transfer manager, in parts.
BIG_JOB = """\
name: big
model: {{name: mlp, hidden: 2048, layers: 3}}
train: {{epochs: 1, max_steps: 2, batch_size: 32}}
scaling: {{num_workers: 0}}
checkpoint: {{storage: s3://{bucket}/runs, every_n_steps: 2}}
"""


TORCH = "torch==2.13.0"  # the CPU wheel on this disk (Makefile's TORCH_PIN)


def project_copy(folder: Path) -> Path:
    """What a source distribution of the project holds, copied: pip builds in the tree it is given (build/, *.egg-info)."""
    import shutil

    src = folder / "src"
    shutil.copytree(ROOT / "orchestrator", src / "orchestrator", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


@pytest.mark.slow
def test_a_plain_install_in_a_fresh_environment_checkpoints_to_s3_in_parts(s3_server, bucket, tmp_path):
    """`pip install <project>` without extras (torch pinned to the CPU wheel on this disk), then a run to the S3 server."""
    started = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # As the Makefile does it: a current pip (Python 3.11's own pip 23.2 finds no boto3 beside the botocore that
    # s3fs's aiobotocore pins: ResolutionImpossible, where pip 26 resolves), torch first (the CPU wheel on this
    # disk; resolved with the rest, pip takes PyPI's CUDA build), then the project without extras, from the index
    # and this disk's wheels, no cache of ours. --no-compile: pip would byte-compile every module of every package
    # (torch's thousands) as it installs them. Measured on this 2-core machine: 1:44 for the three at a load of 4-5;
    # a one-step install with byte-compiling took 6:44 at a load of 10. Nothing is cached between runs: what pip
    # reads from this disk's mirrors it does not cache, and CI's machine is new each time.
    python = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    for what in (["--upgrade", "pip"], [TORCH], [str(project_copy(tmp_path))]):
        installed = subprocess.run([*python, *what], capture_output=True, text=True, timeout=1500)
        assert installed.returncode == 0, installed.stderr[-3000:]
    print(f"fresh venv and plain install: {time.monotonic() - started:.0f} s")
    (tmp_path / "big.yaml").write_text(BIG_JOB.format(bucket=bucket))
    # Only the fresh environment: no PYTHONPATH to this checkout, the credentials and endpoint of the S3 server.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    proc = run_command(
        [str(venv / "bin" / "orchestrator"), "run", "big.yaml", "--json"], cwd=tmp_path, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["status"] == "finished" and summary["steps"] == 2
    client = s3_server.client()
    objects = client.list_objects_v2(Bucket=bucket, Prefix="runs/big/")["Contents"]
    weights = [o for o in objects if o["Key"].endswith("model.safetensors")]
    assert weights and weights[0]["Size"] >= 16 * 2**20
    # A multipart upload's ETag is the hash of its parts' hashes, with their count after a dash.
    assert re.fullmatch(r'"[0-9a-f]{32}-\d+"', weights[0]["ETag"]), weights[0]
    imported = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import orchestrator, boto3, torch; print(orchestrator.__file__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    where, torch_version = imported.stdout.split()
    assert where.startswith(str(venv)), imported  # the installed package ran, not this checkout
    assert torch_version == "2.13.0+cpu"  # the wheel on this disk, not PyPI's CUDA build
