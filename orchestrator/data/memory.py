"""In-memory data sets: scikit-learn's digits, seeded synthetic data and user `module:function` data hooks, split and class-filtered."""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.data.info import DataInfo, _check_classes, _require_train, _windows
from orchestrator.data.sources import _build_augment
from orchestrator.data.splits import _SALT_SYNTHETIC, SPLITS, _rng, _split_args, assign_splits
from orchestrator.errors import BadInput
from orchestrator.hooks import _one_line, call_hook, import_hook

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec


@dataclass
class _Arrays:
    x: np.ndarray
    y: np.ndarray
    task: str
    num_classes: int | None
    vocab_size: int | None
    fingerprint: dict = field(default_factory=dict)


def _digits() -> _Arrays:
    """scikit-learn's bundled digits, read from the CSV it ships: importing scikit-learn costs seconds, the file 50 ms."""
    package = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if package is None or package.origin is None:
        raise BadInput("data.name: digits needs scikit-learn (pip install scikit-learn)")
    with gzip.open(Path(package.origin).parent / "datasets" / "data" / "digits.csv.gz") as fh:
        table = np.loadtxt(fh, delimiter=",")
    x = (table[:, :-1] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return _Arrays(
        x,
        table[:, -1].astype(np.int64),
        "classification",
        10,
        None,
        {"source": "digits", "package": "scikit-learn", "version": importlib.metadata.version("scikit-learn")},
    )


def _synthetic(spec: JobSpec) -> _Arrays:
    d = spec.data
    rng = _rng(spec.train.seed, _SALT_SYNTHETIC)
    n, f = d.samples, d.num_features
    fingerprint = {"source": "synthetic", "task": d.task, "seed": spec.train.seed, "samples": n, "generator": 1}
    if d.task == "classification":
        # Two clusters per class, so that classes are not linearly separable but a small MLP learns them.
        centers = rng.normal(size=(2 * d.num_classes, f)) * 2.0
        cluster = rng.integers(0, 2 * d.num_classes, size=n)
        x = (centers[cluster] + rng.normal(size=(n, f))).astype(np.float32)
        fingerprint.update(num_features=f, num_classes=d.num_classes)
        return _Arrays(
            x, (cluster % d.num_classes).astype(np.int64), "classification", d.num_classes, None, fingerprint
        )
    if d.task == "regression":
        # A random one-hidden-layer teacher: nonlinear, so a linear fit leaves error an MLP removes.
        w1 = rng.normal(size=(f, 16)) / math.sqrt(f)
        w2 = rng.normal(size=16)
        x = rng.normal(size=(n, f))
        y = np.tanh(2.0 * x @ w1) @ w2 + 0.05 * rng.normal(size=n)
        y = (y - y.mean()) / (y.std() + 1e-12)
        fingerprint.update(num_features=f)
        return _Arrays(x.astype(np.float32), y.astype(np.float32), "regression", None, None, fingerprint)
    # lm: a stream of phrases drawn from a small seeded set, so the next token is mostly predictable.
    v, t = d.vocab_size, d.seq_len
    n_phrases = max(2, min(16, v // 4))
    lengths = rng.integers(4, 13, size=n_phrases)
    table = rng.integers(0, v, size=(n_phrases, 12))
    needed = n * t + 1
    picks = rng.integers(0, n_phrases, size=needed // 4 + 1)
    mask = np.arange(12)[None, :] < lengths[picks][:, None]
    stream = table[picks][mask][:needed]
    windows = _windows(stream, t)
    fingerprint.update(vocab_size=v, seq_len=t)
    return _Arrays(windows[:, :-1].copy(), windows[:, 1:].copy(), "lm", None, v, fingerprint)


def _user_data(spec: JobSpec, base_dir) -> _Arrays:
    import torch  # imported here to keep start-up light

    d = spec.data
    func = import_hook(d.name, base_dir, "data.name")
    out = call_hook(func, d.name, "data.name", dict(d.options))
    if isinstance(out, tuple) and len(out) == 2:
        x, y = (np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for v in out)
    elif hasattr(out, "__getitem__") and hasattr(out, "__len__"):
        try:
            pairs = [out[i] for i in range(len(out))]
            x = np.stack([np.asarray(p[0]) for p in pairs])
            y = np.asarray([np.asarray(p[1]) for p in pairs])
        except Exception as exc:  # a dataset whose items are not (x, y) pairs
            raise BadInput(
                f"data.name: {d.name!r} returned a dataset whose items are not (x, y) pairs: {_one_line(exc)}"
            ) from None
    else:
        raise BadInput(
            f"data.name: {d.name!r} returned {type(out).__name__}; expected (X, y) or a torch Dataset of (x, y) pairs"
        )
    if len(x) != len(y):
        raise BadInput(f"data.name: {d.name!r} returned {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise BadInput(f"data.name: {d.name!r} returned no examples")
    integer = np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_
    task = d.task or ("classification" if integer else "regression")
    fingerprint = {"source": d.name, "options": dict(d.options), "examples": int(len(x))}
    module = sys.modules.get(d.name.partition(":")[0])
    if getattr(module, "__file__", None):
        fingerprint["file"] = module.__file__
        fingerprint["mtime"] = Path(module.__file__).stat().st_mtime
    if task == "classification":
        if not integer:
            raise BadInput(f"data.task: classification needs integer labels; {d.name!r} returned {y.dtype}")
        y = y.astype(np.int64).reshape(len(y))
        if y.min() < 0:
            raise BadInput(f"data.name: {d.name!r} returned a negative label ({y.min()})")
        return _Arrays(x.astype(np.float32), y, task, int(y.max()) + 1, None, fingerprint)
    if task == "regression":
        if y.size != len(y):
            raise BadInput(
                f"data.name: {d.name!r} returned targets of shape {y.shape}; regression needs one value per example"
            )
        return _Arrays(x.astype(np.float32), y.astype(np.float32).reshape(len(y)), task, None, None, fingerprint)
    if x.ndim != 2 or x.shape != y.shape:
        raise BadInput(
            f"data.name: {d.name!r} returned inputs {x.shape} and targets {y.shape}; lm needs two (N, seq_len) token arrays"
        )
    top = int(max(x.max(), y.max()))
    if top >= d.vocab_size:
        raise BadInput(f"data.vocab_size: token id {top} is not below vocab_size={d.vocab_size}")
    return _Arrays(x.astype(np.int64), y.astype(np.int64), task, None, d.vocab_size, fingerprint)


_loaded: dict[
    str, _Arrays
] = {}  # the last data set built in this process: preflight's, reused by a loop in the same process


def _in_memory(spec: JobSpec, base_dir) -> _Arrays:
    key = repr((spec.data.model_dump(mode="json"), spec.train.seed, str(base_dir)))
    if key not in _loaded:
        name = spec.data.name
        arrays = (
            _digits() if name == "digits" else _synthetic(spec) if name == "synthetic" else _user_data(spec, base_dir)
        )
        _loaded.clear()
        _loaded[key] = arrays
    return _loaded[key]


def _class_mask(spec: JobSpec, labels: np.ndarray, num_classes: int | None, task: str) -> np.ndarray | None:
    classes = spec.data.classes
    if classes is None:
        return None
    _check_classes(classes, num_classes, task)
    return np.isin(labels, np.asarray(classes, dtype=np.int64))


def _info_from_arrays(arr: _Arrays, codes: np.ndarray) -> DataInfo:
    shape = tuple(int(s) for s in arr.x.shape[1:])
    sizes = {name: int((codes == code).sum()) for code, name in enumerate(SPLITS)}
    return DataInfo(
        arr.task, shape, arr.num_classes, arr.vocab_size, arr.task != "lm" and len(shape) == 3, sizes, arr.fingerprint
    )


def _strata(spec: JobSpec, arr: _Arrays) -> np.ndarray | None:
    """The labels folds are stratified by: a classification job's with data.folds, unless data.stratify is false."""
    d = spec.data
    if not d.folds or d.stratify is False:
        return None
    if arr.task != "classification":
        if d.stratify:
            raise BadInput(f"data.stratify: stratified folds need class labels; {d.name!r} is a {arr.task} data set")
        return None
    return arr.y


def _split_arrays(spec: JobSpec, base_dir) -> tuple[_Arrays, np.ndarray, DataInfo]:
    arr = _in_memory(spec, base_dir)
    # Split the whole dataset before filtering classes, so a class-filtered job's test examples
    # are never training examples of the unfiltered job with the same seed.
    keep = _class_mask(spec, arr.y, arr.num_classes, arr.task)
    codes = assign_splits(len(arr.x), *_split_args(spec), labels=_strata(spec, arr), counted=keep)
    if keep is not None:
        codes = np.where(keep, codes, np.int8(-1))
    info = _info_from_arrays(arr, codes)
    _require_train(info, spec)
    _build_augment(spec, info)
    return arr, codes, info
