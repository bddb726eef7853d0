"""A real Python environment that lacks some of orchestrator's packages, for the tests of what happens then.

A virtual environment of this interpreter whose site-packages links every entry of this environment's but the
packages left out: to the processes that run in it those packages are not installed, as on a machine where
nobody installed them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def python_without(root: Path, *left_out: str) -> Path:
    """Create (once) a virtual environment at `root` with every package of this one but `left_out` (import names,
    whose distributions go too); return its bin directory."""
    bin_dir = root / "bin"
    if (bin_dir / "python").exists():
        return bin_dir
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = root / Path(sysconfig.get_paths()["purelib"]).relative_to(sys.prefix)
    for entry in ours.iterdir():
        top = entry.name.split("-")[0].split(".")[0]
        if top in left_out or entry.name == "__pycache__":
            continue
        target = theirs / entry.name
        if not target.exists():
            os.symlink(entry, target)
    return bin_dir
