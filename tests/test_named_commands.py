"""Every command the docs and the example jobs tell a person to type exists: make targets, scripts, CLI commands.

A comment in a job file once sent people to `make run-examples`, which never existed. What a command
does is tested where it lives (the scripts in test_data/bench, the CLI everywhere); here: that it is there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [ROOT / "README.md", ROOT / "k8s" / "README.md", ROOT / "bench" / "BENCHMARKS.md"]
    + list((ROOT / "jobs").glob("*.yaml"))
    + list((ROOT / "jobs").glob("*.py"))
    + list((ROOT / "k8s").rglob("*.yaml"))
)


def commands(text: str) -> list[str]:
    """What a reader is told to type: `inline code` and the lines of fenced code blocks."""
    out = re.findall(r"`([^`\n]+)`", text)
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        out += [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [c for c in out if c]


def named() -> list[tuple[str, str]]:
    return [(path.relative_to(ROOT).as_posix(), c) for path in DOCS for c in commands(path.read_text())]


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m for m in re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M)}


def test_commands_are_found_at_all():
    found = named()
    assert any(c.startswith("make ") for _, c in found) and any(c.startswith("orchestrator ") for _, c in found)
    assert any("python jobs/make_diabetes_parquet.py" in c for _, c in found)


def test_every_make_target_named_exists():
    targets = makefile_targets()
    assert {"run", "test", "lint"} <= targets
    missing = [
        (where, cmd)
        for where, cmd in named()
        for target in re.findall(r"(?:^|&&\s*|;\s*)make ([a-z][\w-]*)", cmd)
        if target not in targets
    ]
    assert missing == [], f"named but not in the Makefile: {missing}"


def test_every_script_named_exists():
    missing = [
        (where, script)
        for where, cmd in named()
        for script in re.findall(r"\bpython3? ((?:jobs|bench|tests|k8s)/[\w/.-]+\.(?:py|sh))", cmd)
        if not (ROOT / script).is_file()
    ]
    missing += [
        (where, module)
        for where, cmd in named()
        for module in re.findall(r"\bpython3? -m (orchestrator[\w.]*)", cmd)
        if not (ROOT / (module.replace(".", "/") + ".py")).is_file() and not (ROOT / module.replace(".", "/")).is_dir()
    ]
    assert missing == [], missing


def test_every_orchestrator_command_named_exists():
    known = set(main.commands)
    groups = {name: set(cmd.commands) for name, cmd in main.commands.items() if hasattr(cmd, "commands")}
    wrong = []
    for where, cmd in named():
        m = re.match(r"(?:python -m )?orchestrator ([a-z][\w-]*)(?: ([a-z][\w-]*))?", cmd)
        if not m:
            continue
        sub, subsub = m.groups()
        if sub not in known or (sub in groups and subsub not in groups[sub]):
            wrong.append((where, cmd))
    assert wrong == [], wrong


@pytest.mark.parametrize("bad", ["`make run-examples`", "```\nmake nope\n```"])
def test_a_missing_target_would_be_caught(bad):
    targets = makefile_targets()
    assert [t for c in commands(bad) for t in re.findall(r"(?:^|&&\s*|;\s*)make ([a-z][\w-]*)", c) if t not in targets]
