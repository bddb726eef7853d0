"""User-code hooks: importing a `module:function` named in a job file, calling it, and reporting its failure in one line.

Used by the data sets (data.name), the models (model.name) and the preflight (entrypoint).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.errors import BadInput


def import_hook(ref: str, base_dir: str | Path | None, field_name: str) -> Callable:
    """Import `module:function` from base_dir (put on sys.path), or raise BadInput naming the field."""
    module_name, _, func_name = ref.partition(":")
    where = str(Path(base_dir).resolve()) if base_dir is not None else str(Path.cwd())
    if where not in sys.path:
        sys.path.insert(0, where)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except Exception as exc:  # any failure of user code at import is bad input, reported in one line
        raise BadInput(f"{field_name}: cannot import {ref!r} from {where}: {_one_line(exc)}") from None
    if not callable(func):
        raise BadInput(f"{field_name}: {ref!r} is not callable")
    return func


def call_hook(func: Callable, ref: str, field_name: str, kwargs: dict[str, Any]):
    """Call a user hook, turning its failure into BadInput naming the field."""
    try:
        return func(**kwargs)
    except Exception as exc:  # the user's function failed: name it rather than show a traceback
        raise BadInput(f"{field_name}: {ref!r} failed: {_one_line(exc)}") from None


def accepts(func: Callable, name: str) -> bool:
    """Whether `func` has a parameter called `name`."""
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
