"""What of a job's directory a submission ships: the walk Ray's zip will do, ignore files, size limits,
and the paths never shipped (secret-looking files, links out of the directory).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.secret_rules import secret_in_text

# Never worth shipping: version control, environments, caches, run outputs and weights.
DEFAULT_EXCLUDES = (
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    "node_modules/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".ipynb_checkpoints/",
    ".DS_Store",
    "runs/",
    "mlruns/",
    "ray_results/",
    "wandb/",
    "*.safetensors",
    "*.pt",
    "*.pth",
    "*.ckpt",
)
# Never shipped to a cluster unless `--include` names them: credentials and keys that sit in a project
# directory (gitignored, but Ray's zip would still take an untracked file that no ignore file names). The
# file names of gitrob's and the secret scanners' signatures; matched in lower case (`ID_RSA` too). A file
# of any name is withheld as well when its contents hold a secret (`orchestrator.secret_rules`).
SECRET_PATTERNS = (
    # environment files, but not their templates
    ".env",
    ".env.*",
    "*.env",
    "!.env.example",
    "!.env.sample",
    "!.env.template",
    ".envrc",
    # tools' credential directories and files
    ".aws/",
    ".ssh/",
    ".gnupg/",
    ".kube/",
    ".docker/",
    ".azure/",
    ".config/gcloud/",
    ".password-store/",
    ".netrc",
    "_netrc",
    ".pgpass",
    ".my.cnf",
    ".git-credentials",
    ".npmrc",
    ".pypirc",
    ".s3cfg",
    ".boto",
    ".dockercfg",
    ".vault-token",
    ".htpasswd",
    "credentials",
    "credentials.*",
    "*.kubeconfig",
    "kubeconfig",
    "auth_token",
    "secret.*",
    "secrets.*",
    "*service-account*.json",
    "*service_account*.json",
    # keys and key stores
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.pkcs12",
    "*.jks",
    "*.keystore",
    "*.keytab",
    "*.kdbx",
    "*.ppk",
    "*.ovpn",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*_rsa",
    "*_dsa",
    "*_ecdsa",
    "*_ed25519",
    # infrastructure state, which holds every secret it created
    "*.tfstate",
    "*.tfstate.backup",
    "*.tfvars",
    ".terraformrc",
    "terraform.rc",
    # shell and database histories: passwords typed on command lines
    "*_history",
    ".histfile",
)
# Contents are read this far for secrets (a key or an .env is a few KB; a data file's head is enough).
MAX_SCAN_BYTES = 1 << 20
MAX_PACKAGE_BYTES = 100 * 1000 * 1000
# A bigger single file is left out of the package (Ray warns at 10 MiB): data belongs on storage the cluster reads.
MAX_FILE_BYTES = 10 * 1024 * 1024


def _spec(lines: list[str]):
    """A .gitignore-style matcher with git's own rules (negation, `**`, anchoring), by pathspec."""
    from pathspec import GitIgnoreSpec  # only `submit` packages a directory

    return GitIgnoreSpec.from_lines(lines)


def _ignore_file_spec(directory: Path):
    """The patterns of a directory's .gitignore and .rayignore (Ray honours both), relative to it; None if none."""
    lines: list[str] = []
    for name in (".gitignore", ".rayignore"):
        path = directory / name
        if path.is_file():
            lines += path.read_text(errors="replace").splitlines()
    return _spec(lines) if any(line.strip() and not line.startswith("#") for line in lines) else None


def literal_pattern(rel: str) -> str:
    """A gitignore pattern matching exactly this path under the root (special characters escaped)."""
    escaped = re.sub(r"([\\*?\[\]!#])", r"\\\1", rel)
    return "/" + escaped.replace(" ", "\\ ") if escaped.endswith(" ") else "/" + escaped


@dataclass
class PackagePlan:
    """What `working_dir` will ship: file count and bytes, the big files left out, and what was withheld and why."""

    root: str
    files: int = 0
    bytes: int = 0
    left_out: list[tuple[str, int]] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)
    # Paths never shipped though nothing excluded them: secret-looking files and links out of the directory.
    withheld: list[tuple[str, str]] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)  # of the withheld, those `--include` would ship

    def withhold(self, rel: str, reason: str, secret: bool = False) -> None:
        """Leave a path out of the package, saying why; a secret ships only when `--include` names it."""
        self.withheld.append((rel, reason))
        self.excluded.add(rel)
        if secret:
            self.secrets.add(rel)

    def ships(self, rel: str) -> bool:
        """Whether a path relative to the root is in the package."""
        rel = rel.strip("/")
        return not any(rel == e or rel.startswith(e + "/") for e in self.excluded)


def plan_package(
    root: str | Path,
    excludes: list[str],
    max_file_bytes: int = MAX_FILE_BYTES,
    includes: list[str] | tuple[str, ...] = (),
) -> PackagePlan:
    """Walk the directory as Ray will zip it (excludes, .gitignore, .rayignore) and add up what ships.

    Secret-looking paths (SECRET_PATTERNS) are withheld unless an `includes` pattern names them; a link
    out of the directory, to a directory, or to nothing is withheld always (Ray's zip would follow it).
    """
    root = Path(root)
    real_root = root.resolve()
    plan = PackagePlan(root=str(root))
    excluded_spec, secret_spec, include_spec = (
        _spec(list(excludes)),
        _spec(list(SECRET_PATTERNS)),
        _spec(list(includes)),
    )
    # (directory, its path under the root, the ignore files in force: (their directory's path, matcher), outermost first)
    stack: list[tuple[Path, str, list[tuple[str, Any]]]] = [(root, "", [])]
    while stack:
        directory, rel_dir, ignores = stack.pop()
        own = _ignore_file_spec(directory)
        if own is not None:
            ignores = ignores + [(rel_dir, own)]
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            probe = rel + "/" if is_dir else rel
            if excluded_spec.match_file(probe) or _ignored(probe, ignores):
                plan.excluded.add(rel)
                continue
            included = include_spec.match_file(probe)
            if secret_spec.match_file(probe.lower()) and not included:
                plan.withhold(rel, "looks like a secret", secret=True)
                continue
            if entry.is_symlink():
                reason = _link_problem(Path(entry.path), real_root)
                if reason:
                    plan.withhold(rel, reason)
                    continue
            if is_dir:
                stack.append((Path(entry.path), rel, ignores))
                continue
            try:
                size = entry.stat().st_size  # through a link: what Ray's zip would read
            except OSError:
                continue
            if size > max_file_bytes:
                plan.left_out.append((rel, size))
                plan.excluded.add(rel)
                continue
            reason = None if included else _secret_inside(Path(entry.path), real_root, secret_spec)
            if reason:
                plan.withhold(rel, reason, secret=True)
                continue
            plan.files += 1
            plan.bytes += size
    plan.left_out.sort()
    plan.withheld.sort()
    return plan


def _ignored(probe: str, ignores: list[tuple[str, Any]]) -> bool:
    # git: the deepest ignore file with a matching pattern decides, and its last matching pattern (a `!` re-includes).
    for base, spec in reversed(ignores):
        result = spec.check_file(probe[len(base) + 1 :] if base else probe)
        if result.include is not None:
            return bool(result.include)
    return False


def _link_problem(link: Path, real_root: Path) -> str | None:
    """Why a symbolic link must not ship (Ray's zip follows links), or None for a link to a file inside the root."""
    target = Path(os.path.realpath(link))
    try:
        target.relative_to(real_root)
    except ValueError:
        return f"a link out of the directory, to {target}"
    if not target.exists():
        return "a broken link"
    if target.is_dir():
        return "a link to a directory (it could loop)"
    return None


def _secret_inside(path: Path, real_root: Path, secret_spec) -> str | None:
    """Why a file (or the file a link inside the root names) holds a secret, or None.

    A link is judged by its target too: `innocent.txt -> .env` would ship the .env's contents under an
    innocent name, since Ray's zip follows links.
    """
    if path.is_symlink():
        target = Path(os.path.realpath(path)).relative_to(real_root).as_posix()
        if secret_spec.match_file(target.lower()):
            return f"a link to {target}, which looks like a secret"
    try:
        with open(path, "rb") as fh:
            head = fh.read(MAX_SCAN_BYTES)
    except OSError:
        return None
    found = secret_in_text(head.decode("utf-8", errors="replace"))
    return f"holds {found}" if found else None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
