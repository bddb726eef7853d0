"""Files a command writes on this machine where a user's `--out` says (`export`, `report --out`).

A user's path is checked before anything is read or written: never a file of a run (run.json, a checkpoint's
manifest: the run would lose its record or its checkpoint), never something that is not a regular file (a
device node, a directory, a symlink that points elsewhere), never an existing file unless `--force` says so.
The file is written beside its target under a temporary name and then put in place in one step, so that a
target is either the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator

from orchestrator.errors import BadInput

# A directory holding one of these is a run's, a sweep's or a cross-validation's; a checkpoint's is named
# checkpoint_<step> and holds a manifest (a manifest.json elsewhere, a web app's, is no concern of ours).
RUN_MARKERS = {"run.json": "a run's", "sweep.json": "a sweep's", "cv.json": "a cross-validation's"}
CHECKPOINT_DIR_RE = re.compile(r"^checkpoint_\d+$")


def _enclosing_run(folder: str) -> tuple[str, str] | None:
    """The nearest directory at or above `folder` that belongs to a run, a sweep or a checkpoint, and whose it is."""
    here = folder
    while True:
        if CHECKPOINT_DIR_RE.match(os.path.basename(here)) and os.path.isfile(os.path.join(here, "manifest.json")):
            return here, "a checkpoint's"
        for marker, whose in RUN_MARKERS.items():
            if os.path.isfile(os.path.join(here, marker)):
                return here, whose
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def check_target(out: str, force: bool, option: str = "--out") -> str:
    """The absolute path to write `out` to; BadInput in one line when it may not be written (see the module)."""
    path = os.path.abspath(os.path.expanduser(out))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise BadInput(f"{option} {out}: cannot be examined ({exc.strerror})") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise BadInput(f"{option} {out}: is a symbolic link (to {os.readlink(path)}); give the real path of a file")
        if stat.S_ISDIR(st.st_mode):
            raise BadInput(f"{option} {out}: is a directory; give the path of a file in it")
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{option} {out}: is not a regular file (a device, a pipe or a socket); give another path")
    # Resolved, so that a link to a run's directory higher up counts as that directory.
    enclosing = _enclosing_run(os.path.realpath(os.path.dirname(path)))
    if enclosing is not None:
        raise BadInput(f"{option} {out}: lies inside {enclosing[1]} directory {enclosing[0]}; write it outside any run")
    if st is not None and not force:
        raise BadInput(f"{option} {out}: already exists; --force replaces it")
    return path


@contextlib.contextmanager
def replacing(path: str, force: bool) -> Iterator[str]:
    """A temporary path beside `path` to write to; on leaving, it becomes `path` (an existing one only with `force`).

    Without `force` the file is linked into place, which fails rather than replace a file that appeared meanwhile.
    """
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644 & ~_umask())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise BadInput(f"--out {path}: appeared while it was written; --force replaces it") from None
            except OSError:  # a filesystem without hard links: the check above is all there is
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_target(path: str, data: bytes, force: bool) -> None:
    """Write `data` to a path that `check_target` let through, in one step."""
    with replacing(path, force) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
