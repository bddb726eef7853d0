"""What orchestrator needs of a Python environment, and the one line that says what is missing from one.

Standard library only: it speaks when the packages it names cannot be imported (the first import of a
command, on this machine or in a job's driver on a cluster), and `status` finds its line in a job's logs.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import sys

# The import name of each package orchestrator depends on (pyproject.toml's dependencies; a test keeps the two
# in step) and the distribution that provides it.
REQUIRED_MODULES: dict[str, str] = {
    "ray": "ray",
    "torch": "torch",
    "numpy": "numpy",
    "pyarrow": "pyarrow",
    "fsspec": "fsspec",
    "s3fs": "s3fs",
    "pydantic": "pydantic",
    "yaml": "pyyaml",
    "safetensors": "safetensors",
    "click": "click",
    "rich": "rich",
    "sklearn": "scikit-learn",
    "tensorboardX": "tensorboardX",
    "optuna": "optuna",
    "pathspec": "pathspec",
    "boto3": "boto3",
    "botocore": "botocore",
    "requests": "requests",
    "scipy": "scipy",
    "packaging": "packaging",
}
MISSING = "missing package:"
_MISSING_RE = re.compile(re.escape(MISSING) + r" (.+)")


def this_python() -> str:
    """The interpreter as a person finds it: its path and version."""
    return f"{sys.executable} (Python {platform.python_version()})"


def missing_package_line(exc: ModuleNotFoundError) -> str | None:
    """The one line for a package orchestrator needs that this Python lacks; None when the missing module is not
    one of them (a user's own import, which the job's checks report on their own)."""
    module = (exc.name or "").split(".")[0]
    distribution = REQUIRED_MODULES.get(module)
    if distribution is None:
        return None
    source = f" (from {distribution})" if distribution != exc.name else ""
    return (
        f"{MISSING} {this_python()} cannot import {exc.name}{source}, which orchestrator needs; "
        f"install orchestrator's requirements into it (pip install {distribution})"
    )


def require_packages() -> None:
    """Before a command trains: ModuleNotFoundError for the first package orchestrator needs that this Python lacks.

    Found without importing anything (milliseconds), so that the one line comes before a run starts rather than
    as a traceback from deep inside it (Ray Train imports torch only as the run starts).
    """
    for module in REQUIRED_MODULES:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def find_missing_package(text: str) -> str | None:
    """The missing-package line in a job's output (its logs or Ray's message), without its prefix; None if none."""
    found = _MISSING_RE.search(text)
    return f"on the cluster, {found.group(1).strip()}" if found else None
