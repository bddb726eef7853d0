"""Validation metrics of the three tasks, computed from a whole split's outputs, and metric ordering.

NumPy only at run time: the values match scikit-learn's (the tests check that) without making
every worker import it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MetricValue = float | list | None

_TASK_METRICS = {
    "classification": ("loss", "accuracy", "f1", "roc_auc", "confusion_matrix"),
    "regression": ("loss", "mse", "mae", "r2"),
    "lm": ("loss", "perplexity"),
}
_MIN_METRICS = ("loss", "mse", "mae", "perplexity")
_MAX_METRICS = ("accuracy", "f1", "roc_auc", "r2")
_SPLIT_PREFIXES = ("val_", "train_", "test_")


def compute_metrics(
    task: str, names: list[str], outputs: torch.Tensor, targets: torch.Tensor, loss: float
) -> dict[str, MetricValue]:
    """The named metrics of a split: `outputs` are logits (N, C), predictions (N,) or unused (lm); `loss` is its mean loss.

    A metric that is undefined on this split (AUC with one class present, anything on zero examples) is None.
    """
    allowed = _TASK_METRICS.get(task)
    if allowed is None:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(_TASK_METRICS)}")
    for name in names:
        if name not in allowed:
            raise ValueError(f"metric {name!r} does not apply to {task}; use {', '.join(allowed)}")
    if task == "classification":
        return _classification(names, outputs, targets, loss)
    if task == "regression":
        return _regression(names, outputs, targets, loss)
    return {name: float(loss) if name == "loss" else _perplexity(loss) for name in names}


def _perplexity(loss: float) -> float:
    # exp overflows past ~709; a diverged run reports inf rather than crashing the loop.
    try:
        return math.exp(float(loss))
    except OverflowError:
        return math.inf


def _to_numpy(t: torch.Tensor, dtype) -> np.ndarray:
    # float64 so that sums over a large split do not drift and ties stay exact ties.
    return t.detach().to("cpu", torch.float64).numpy().astype(dtype, copy=False)


def _classification(
    names: list[str], outputs: torch.Tensor, targets: torch.Tensor, loss: float
) -> dict[str, MetricValue]:
    if outputs.ndim != 2:
        raise ValueError(f"classification outputs must be logits of shape (N, C), got {tuple(outputs.shape)}")
    logits = _to_numpy(outputs, np.float64)
    y = _to_numpy(targets.reshape(-1), np.int64)
    n, num_classes = logits.shape
    if y.shape[0] != n:
        raise ValueError(f"{n} outputs but {y.shape[0]} targets")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"target labels must lie in [0, {num_classes}) for a {num_classes}-way output, got [{y.min()}, {y.max()}]"
        )
    pred = logits.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    out: dict[str, MetricValue] = {}
    for name in names:
        if name == "loss":
            out[name] = float(loss)
        elif name == "confusion_matrix":
            cm = np.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(
                num_classes, num_classes
            )
            out[name] = cm.tolist()
        elif n == 0:
            out[name] = None
        elif name == "accuracy":
            out[name] = float(np.mean(pred == y))
        elif name == "f1":
            out[name] = _macro_f1(y, pred)
        elif name == "roc_auc":
            out[name] = _roc_auc(y, logits)
    return out


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    # sklearn's default labels: every class seen in the targets or the predictions, so each
    # per-class denominator (2tp + fp + fn) is positive.
    labels = np.union1d(y, pred)
    scores = []
    for c in labels:
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        scores.append(2.0 * tp / (2.0 * tp + fp + fn))
    return float(np.mean(scores))


def _roc_auc(y: np.ndarray, logits: np.ndarray) -> float | None:
    present = np.unique(y)
    if present.size < 2:
        return None
    # Softmax over the present classes only: a 10-way head trained on digits 0-4 still gives
    # rows that sum to 1 over the classes the split can be scored on.
    sub = logits[:, present]
    sub = sub - sub.max(axis=1, keepdims=True)
    probs = np.exp(sub)
    probs /= probs.sum(axis=1, keepdims=True)
    if not np.isfinite(probs).all():
        return None
    if present.size == 2:
        return _binary_auc(y == present[1], probs[:, 1])
    return float(np.mean([_binary_auc(y == c, probs[:, i]) for i, c in enumerate(present)]))


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    # Mann-Whitney U with average ranks: ties count one half, exactly as the trapezoidal ROC area.
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    ranks = _average_ranks(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    run_starts_mask = np.r_[True, xs[1:] != xs[:-1]]
    run_id = np.cumsum(run_starts_mask) - 1
    starts = np.flatnonzero(run_starts_mask)
    ends = np.r_[starts[1:], xs.size]
    # The 1-based ranks start+1 .. end share their mean.
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def _regression(names: list[str], outputs: torch.Tensor, targets: torch.Tensor, loss: float) -> dict[str, MetricValue]:
    pred = _to_numpy(outputs.reshape(-1), np.float64)
    y = _to_numpy(targets.reshape(-1), np.float64)
    if pred.shape != y.shape:
        raise ValueError(f"{pred.size} predictions but {y.size} targets (regression outputs must be (N,) or (N, 1))")
    out: dict[str, MetricValue] = {}
    for name in names:
        if name == "loss":
            out[name] = float(loss)
        elif y.size == 0:
            out[name] = None
        elif name == "mse":
            out[name] = float(np.mean((pred - y) ** 2))
        elif name == "mae":
            out[name] = float(np.mean(np.abs(pred - y)))
        elif name == "r2":
            out[name] = _r2(y, pred)
    return out


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        # sklearn's finite convention for constant targets: perfect is 1, anything else 0.
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def default_mode(metric_name: str) -> str:
    """Which way a metric improves, "min" or "max"; a val_/train_/test_ prefix is ignored."""
    base = metric_name
    for prefix in _SPLIT_PREFIXES:
        if base.startswith(prefix):
            base = base[len(prefix) :]
            break
    if base in _MIN_METRICS:
        return "min"
    if base in _MAX_METRICS:
        return "max"
    raise ValueError(
        f"no default mode for metric {metric_name!r}; known: {', '.join(_MIN_METRICS + _MAX_METRICS)} (with a val_ prefix); set the mode explicitly"
    )


def is_better(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` improves on `best` by more than `min_delta` in direction `mode`; any value beats no best, None/NaN never wins."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta
