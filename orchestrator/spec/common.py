"""What every part of the job file shares: names, limits, URI checks, SpecError and "did you mean"."""

from __future__ import annotations

import difflib
import re
from typing import Any

from orchestrator.errors import BadInput
from orchestrator.storage import redact

# A user hook: `package.module:function`, importable from the job file's directory.
HOOK_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
BUILTIN_MODELS = ("mlp", "cnn", "resnet", "gpt")
BUILTIN_DATA = ("digits", "synthetic", "parquet")
CLASSIFICATION_METRICS = ("loss", "accuracy", "f1", "roc_auc", "confusion_matrix")
REGRESSION_METRICS = ("loss", "mse", "mae", "r2")
LM_METRICS = ("loss", "perplexity")
ALL_METRICS = tuple(dict.fromkeys(CLASSIFICATION_METRICS + REGRESSION_METRICS + LM_METRICS))
FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\Z")
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
# Job files are a few KB; a cap keeps a wrong path (a data file, a binary) from being parsed at all.
MAX_JOB_FILE_BYTES = 1 << 20
# Seeds go to numpy's legacy seeding too, which takes 0..2**32-1.
MAX_SEED = 2**32 - 1
# Storage schemes the code opens and tests: local paths, file:// and S3 (s3a is the Hadoop spelling).
STORAGE_SCHEMES = ("file", "s3", "s3a")
MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "databricks")


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
# `s3:/bucket/x`, `s3:bucket`: a scheme without its `//` would otherwise be a local directory named `s3:`.
_MISTYPED_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?!//)")
# Schemes whose URI means nothing without a bucket or host after the `//`.
_NEEDS_HOST = ("s3", "s3a", "http", "https")
_QUERY_SECRET_RE = re.compile(r"(?i)[?&][^=&#]*(token|key|secret|password|passwd|signature|credential)[^=&#]*=")


def check_uri(value: str, schemes: tuple[str, ...], local: bool, what: str) -> str:
    """A URI of a known scheme (or a local path when `local`) without credentials in it; ValueError if not.

    Secrets come from the environment: a password in a job file would land in run.json, the report
    and the rendered manifests.
    """
    m = _SCHEME_RE.match(value)
    if m is None:
        typo = _MISTYPED_SCHEME_RE.match(value)
        rest = value[typo.end() :] if typo else ""
        if typo and (typo.group(1).lower() in schemes or rest.startswith("/")):
            root = "/" if typo.group(1).lower() == "file" else ""
            fixed = f"{typo.group(1)}://{root}{rest.lstrip('/')}"
            raise ValueError(
                f"{redact(value)!r}: a scheme is followed by '://' (did you mean {redact(fixed)!r}?)"
                + (f"; write ./{redact(value)} for a local directory" if local else "")
            )
        if local:
            return value
        raise ValueError(f"{redact(value)!r} is not a URI; use {' or '.join(s + '://' for s in schemes)}")
    scheme, netloc = m.group(1).lower(), m.group(2)
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(
            f"{redact(value)!r}: unsupported scheme {scheme!r} for {what}; use {'a local path, ' if local else ''}{allowed}"
        )
    if scheme in _NEEDS_HOST and not netloc:
        raise ValueError(
            f"{redact(value)!r} names no {'bucket' if scheme.startswith('s3') else 'host'} after {scheme}://"
        )
    if "@" in netloc or _QUERY_SECRET_RE.search(value):
        raise ValueError(f"{redact(value)!r}: credentials do not belong in a job file; they come from the environment")
    return value


class SpecError(BadInput):
    """A job file that cannot be run; `lines` holds one line per problem, each naming a field."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.lines = problems


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (`optim.lr`); empty dicts stay as `{}`."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj} if prefix else {}
