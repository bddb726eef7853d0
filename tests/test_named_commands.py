"""Every command the docs and the example jobs tell a person to type exists (make targets, scripts, CLI commands,
each option given to a command), every `k8s render|apply` of the docs and the help renders, and every relative link
of the docs points at a file that is there (and at a heading of it, for `#anchor`).

A comment in a job file once sent people to `make run-examples`, which never existed. What a command
does is tested where it lives (the scripts in test_data/bench, the CLI everywhere); here: that it is there.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "k8s" / "README.md", ROOT / "bench" / "BENCHMARKS.md"]
    + list((ROOT / "docs").glob("*.md"))
)
DOCS = sorted(
    PAGES
    + list((ROOT / "jobs").glob("*.yaml"))
    + list((ROOT / "jobs").glob("*.py"))
    + list((ROOT / "k8s").rglob("*.yaml"))
)


def commands(text: str) -> list[str]:
    """What a reader is told to type: `inline code` and the lines of fenced code blocks (a `$ ` prompt taken off)."""
    out = re.findall(r"`([^`\n]+)`", text)
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        out += [line.split("#", 1)[0].strip().removeprefix("$ ") for line in block.splitlines()]
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


def command_lines(text: str) -> list[str]:
    """`commands`, with a fenced line continued by a trailing backslash joined to the next."""
    text = re.sub(r"\\\n\s*", " ", text)
    return commands(text)


def wrong_options(text: str) -> list[str]:
    """The `orchestrator CMD ... --option` lines of a text that name an option CMD does not have (a renamed one
    included: it is hidden, kept only to refuse it), or give `--address` something other than a dashboard URL."""
    wrong = []
    for cmd in command_lines(text):
        words = cmd.split()
        if words[:3] == ["python", "-m", "orchestrator"]:
            words = words[2:]
        if words[:1] != ["orchestrator"] or len(words) < 2 or words[1] not in main.commands:
            continue
        command = main.commands[words[1]]
        if hasattr(command, "commands") and len(words) > 2 and words[2].split("|")[0] in command.commands:
            command = command.commands[words[2].split("|")[0]]  # `k8s render|apply`: both take the same options
        visible = {opt for p in command.params if not getattr(p, "hidden", False) for opt in p.opts + p.secondary_opts}
        visible |= {"--help", "-h"}
        for i, word in enumerate(words):
            option = word.strip("[]").split("=", 1)[0]
            if option.startswith("-") and option not in visible:
                wrong.append(cmd)
            elif (
                option == "--address"
                and i + 1 < len(words)
                and not re.match(r"https?://|URL$", words[i + 1].strip("[]"))
            ):
                wrong.append(cmd)
    return wrong


def test_every_option_named_with_a_command_is_one_of_its_options():
    found = {page.relative_to(ROOT).as_posix(): wrong_options(page.read_text()) for page in PAGES}
    assert {page: cmds for page, cmds in found.items() if cmds} == {}


@pytest.mark.parametrize(
    "bad",
    [
        "`orchestrator run jobs/x.yaml --wait`",  # renamed: --wait-for-lease
        "```\norchestrator submit jobs/x.yaml --wait --json   # follows\n```",  # renamed: --follow
        "```\norchestrator run jobs/x.yaml --address auto\n```",  # --address is a dashboard's URL now
        "```\norchestrator k8s render jobs/x.yaml \\\n    --nope 1 > job.yaml\n```",
        "`python -m orchestrator export runs/x --latest`",
    ],
)
def test_a_wrong_option_would_be_caught(bad):
    assert wrong_options(bad)


def k8s_commands() -> list[tuple[str, str]]:
    """Every `orchestrator k8s render|apply` of a job in jobs/ that the docs and the commands' help examples show."""
    found = [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in command_lines(page.read_text())]
    for name in ("render", "apply"):
        examples = [line.split("#", 1)[0].strip() for line in main.commands["k8s"].commands[name].epilog.splitlines()]
        found += [(f"k8s {name} --help", c) for c in examples]
    return [(where, c) for where, c in found if re.match(r"orchestrator k8s (render|apply) jobs/", c)]


@pytest.mark.parametrize("where, cmd", k8s_commands())
def test_every_k8s_command_shown_renders(where, cmd, monkeypatch):
    """A k8s example renders as shown: one that is refused (a local checkpoint.storage) would teach the refusal."""
    from click.testing import CliRunner

    words = shlex.split(cmd.split(">", 1)[0].replace("$REGISTRY", "registry.example.com/ml"))
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(main, ["k8s", "render", *words[3:]])  # apply is render, then kubectl
    assert res.exit_code == 0, (where, cmd, res.output)
    assert "kind: RayJob" in res.output


def test_k8s_commands_are_found():
    where = {w for w, _ in k8s_commands()}
    assert len(k8s_commands()) >= 10 and {"k8s render --help", "k8s apply --help", "k8s/README.md"} <= where


@pytest.mark.parametrize("bad", ["`make run-examples`", "```\nmake nope\n```"])
def test_a_missing_target_would_be_caught(bad):
    targets = makefile_targets()
    assert [t for c in commands(bad) for t in re.findall(r"(?:^|&&\s*|;\s*)make ([a-z][\w-]*)", c) if t not in targets]


def links(text: str) -> list[str]:
    """The targets of markdown links and images, outside code: `[text](target)`, `![alt](target)`."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)\)", prose)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    titles = re.findall(r"^#{1,6} (.+)$", prose, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") for title in titles}


def broken_links(page: Path, text: str) -> list[str]:
    """The relative links of a page whose file (or heading) does not exist."""
    broken = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:: not ours to check here
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(target)
        elif anchor and where.suffix == ".md" and anchor not in anchors(where.read_text()):
            broken.append(target)
    return broken


def test_every_relative_link_points_at_a_file():
    assert (ROOT / "docs" / "reference.md") in PAGES
    found = {page.relative_to(ROOT).as_posix(): links(page.read_text()) for page in PAGES}
    assert sum(map(len, found.values())) > 20, found  # the pages do link, so this test looks at something
    broken = {page.relative_to(ROOT).as_posix(): broken_links(page, page.read_text()) for page in PAGES}
    assert {page: targets for page, targets in broken.items() if targets} == {}


@pytest.mark.parametrize(
    "bad",
    [
        "[the guide](docs/nope.md)",
        "![shot](docs/nope.png)",
        "[a heading](docs/storage.md#no-such-heading)",
        "[x](#nope)",
    ],
)
def test_a_broken_link_would_be_caught(bad):
    page = ROOT / "README.md"
    assert broken_links(page, bad) == [bad.split("(", 1)[1].rstrip(")")]


def test_the_readme_starts_with_make_run_and_make_test_and_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```[^\n]*\n(.*?)```", text, flags=re.S).group(1)
    assert [line.split("#", 1)[0].strip() for line in first_block.splitlines()] == ["make run", "make test"]
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(text)}
    unlinked = [page.name for page in (ROOT / "docs").glob("*.md") if page.resolve() not in linked]
    assert unlinked == []
