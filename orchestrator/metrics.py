"""Validation metrics of the three tasks, and metric ordering.

Two ways to the same numbers: `compute_metrics` from a whole split's outputs (the test split, which
rank 0 evaluates alone and keeps for the report's plots), and `SplitState`, which each rank fills
from its own shard and reduces across ranks with a few all_reduce calls whose size does not depend
on the number of examples (validation, on every rank). The states give loss, accuracy, macro-F1,
the confusion matrix, MSE, MAE, R² and perplexity exactly (to float64 rounding); ROC-AUC from
binned score histograms, within 1e-3 of the exact value (see `SplitState`).

NumPy only at run time: the values match scikit-learn's (the tests check that) without making
every worker import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    _check_names(task, names)
    if task == "classification":
        return _classification(names, outputs, targets, loss)
    if task == "regression":
        return _regression(names, outputs, targets, loss)
    return {name: float(loss) if name == "loss" else _perplexity(loss) for name in names}


def _check_names(task: str, names: list[str]) -> None:
    allowed = _TASK_METRICS.get(task)
    if allowed is None:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(_TASK_METRICS)}")
    for name in names:
        if name not in allowed:
            raise ValueError(f"metric {name!r} does not apply to {task}; use {', '.join(allowed)}")


def _perplexity(loss: float) -> float:
    # exp overflows past ~709; a diverged run reports inf rather than crashing the loop.
    try:
        return math.exp(float(loss))
    except OverflowError:
        return math.inf


def _to_numpy(t: torch.Tensor, dtype) -> np.ndarray:
    # float64 so that sums over a large split do not drift and ties stay exact ties.
    return t.detach().to("cpu", torch.float64).numpy().astype(dtype, copy=False)


def _classification_arrays(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(logits as float64, labels as int64) of a classification batch or split, its shapes checked."""
    if outputs.ndim != 2:
        raise ValueError(f"classification outputs must be logits of shape (N, C), got {tuple(outputs.shape)}")
    logits = _to_numpy(outputs, np.float64)
    y = _to_numpy(targets.reshape(-1), np.int64)
    if y.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} outputs but {y.shape[0]} targets")
    return logits, y


def _check_labels(y: np.ndarray, num_classes: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"target labels must lie in [0, {num_classes}) for a {num_classes}-way output, got [{y.min()}, {y.max()}]"
        )


def _regression_arrays(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, targets) of a regression batch or split as float64 vectors, their sizes checked."""
    pred = _to_numpy(outputs.reshape(-1), np.float64)
    y = _to_numpy(targets.reshape(-1), np.float64)
    if pred.shape != y.shape:
        raise ValueError(f"{pred.size} predictions but {y.size} targets (regression outputs must be (N,) or (N, 1))")
    return pred, y


def _classification(
    names: list[str], outputs: torch.Tensor, targets: torch.Tensor, loss: float
) -> dict[str, MetricValue]:
    logits, y = _classification_arrays(outputs, targets)
    n, num_classes = logits.shape
    _check_labels(y, num_classes)
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
    pred, y = _regression_arrays(outputs, targets)
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


# ROC-AUC from histograms: the bins of each class's score, per class and per side (positive/negative).
AUROC_BINS = 10_000
# Bounds the one histogram all_reduce (4 bytes a cell, 16 MiB) for heads with hundreds of classes:
# past ~200 present classes each class gets fewer bins than AUROC_BINS.
_MAX_HISTOGRAM_CELLS = 1 << 22

Reduce = Callable[[torch.Tensor, str], torch.Tensor]
"""Reduces a tensor across ranks with "sum" or "max" and returns the result (every rank gets the same)."""


def reduce_locally(t: torch.Tensor, op: str) -> torch.Tensor:
    """The reduction of one rank: nothing to combine."""
    return t


class SplitState:
    """A split's metric state on one rank: `update` per batch, `compute` reduces it across ranks.

    What crosses ranks is sums and counts (a C x C confusion matrix, loss and error sums, per-class
    score histograms), never the outputs, so a rank's cost does not grow with the world size; the
    collectives depend only on reduced values, so every rank makes the same calls. Exact, to
    float64 rounding: loss, accuracy, macro-F1 and the confusion matrix (confusion counts), MSE,
    MAE, R² (error sums and the targets' mean and squared deviations, merged as Chan et al.),
    perplexity. ROC-AUC is binned: each rank keeps its own shard's logits (what it would have
    gathered before, now 1/N of it), the classes present in the whole split are agreed first (the
    scores are a softmax over those, as `compute_metrics` does), then each present class's log-odds
    go into AUROC_BINS equal bins between the split's smallest and largest finite value (a
    probability of exactly 0 or 1 in float64 into a bin of its own at either end); a positive
    and a negative in one bin count as a tie (one half). The area is within
    sum(pos_b * neg_b) / (2 * P * N) of the exact one, under 1e-3 unless many positives and
    negatives share a bin's width (1/10,000 of the log-odds range).
    """

    def __init__(self, task: str, names: list[str]):
        _check_names(task, names)
        self.task, self.names = task, list(names)
        self.loss_sum, self.count = 0.0, 0
        self.error: str | None = None
        self.num_classes = 0
        self.confusion: np.ndarray | None = None
        self.keep_scores = task == "classification" and "roc_auc" in names
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        # regression: the targets' count, mean and sum of squared deviations; residual sums
        self.n_y, self.mean_y, self.m2_y = 0, 0.0, 0.0
        self.abs_err, self.sq_err = 0.0, 0.0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, loss_sum: float, count: int) -> None:
        """Add a batch: its outputs and targets as `compute_metrics` takes them, its summed loss over `count` items."""
        self.loss_sum += float(loss_sum)
        self.count += int(count)
        if self.error is not None:
            return
        try:
            if self.task == "classification":
                self._update_classification(outputs, targets)
            elif self.task == "regression":
                self._update_regression(outputs, targets)
        except ValueError as e:
            # Raised on every rank at `compute`: a rank that raised here alone would leave the
            # others waiting in a collective.
            self.error = str(e)

    def _update_classification(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        logits, y = _classification_arrays(outputs, targets)
        n, c = logits.shape
        if self.confusion is None:
            self.num_classes = c
            self.confusion = np.zeros((c, c), dtype=np.int64)
        elif c != self.num_classes:
            raise ValueError(f"classification outputs changed width from {self.num_classes} to {c}")
        if n == 0:
            return
        _check_labels(y, c)
        pred = logits.argmax(axis=1)
        self.confusion += np.bincount(y * c + pred, minlength=c * c).reshape(c, c)
        if self.keep_scores:
            self.logits.append(logits.astype(np.float32) if outputs.dtype != torch.float64 else logits)
            self.labels.append(y)

    def _update_regression(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        pred, y = _regression_arrays(outputs, targets)
        if y.size == 0:
            return
        err = pred - y
        self.abs_err += float(np.sum(np.abs(err)))
        self.sq_err += float(np.sum(err**2))
        n_b, mean_b = y.size, float(y.mean())
        m2_b = float(np.sum((y - mean_b) ** 2))
        self.n_y, self.mean_y, self.m2_y = _merge_moments(self.n_y, self.mean_y, self.m2_y, n_b, mean_b, m2_b)

    def compute(self, reduce: Reduce = reduce_locally) -> dict[str, MetricValue]:
        """The named metrics of the whole split (every rank gets the same); {} when no rank saw an example."""
        head = reduce(
            torch.tensor([float(self.num_classes), float(self.error is not None)], dtype=torch.float64), "max"
        )
        if head[1] > 0:
            raise ValueError(self.error or "bad outputs or targets on another rank (its log names them)")
        if self.task == "classification":
            return self._compute_classification(int(head[0]), reduce)
        if self.task == "regression":
            return self._compute_regression(reduce)
        totals = reduce(torch.tensor([float(self.count), self.loss_sum], dtype=torch.float64), "sum")
        if totals[0] == 0:
            return {}
        loss = float(totals[1] / totals[0])
        return {name: loss if name == "loss" else _perplexity(loss) for name in self.names}

    def _compute_classification(self, c: int, reduce: Reduce) -> dict[str, MetricValue]:
        confusion = self.confusion if self.confusion is not None else np.zeros((c, c), dtype=np.int64)
        # Counts stay exact in float64 up to 2**53, far beyond any split.
        packed = torch.from_numpy(np.concatenate([[float(self.count), self.loss_sum], confusion.reshape(-1)]))
        packed = reduce(packed.to(torch.float64), "sum").numpy()
        if packed[0] == 0:
            return {}
        cm = packed[2:].reshape(c, c).round().astype(np.int64)
        n = int(cm.sum())
        out: dict[str, MetricValue] = {}
        for name in self.names:
            if name == "loss":
                out[name] = float(packed[1] / packed[0])
            elif name == "confusion_matrix":
                out[name] = cm.tolist()
            elif n == 0:
                out[name] = None
            elif name == "accuracy":
                out[name] = float(np.trace(cm) / n)
            elif name == "f1":
                out[name] = _macro_f1_from_confusion(cm)
            elif name == "roc_auc":
                out[name] = self._binned_roc_auc(cm.sum(axis=1), c, reduce)
        return out

    def _binned_roc_auc(self, label_counts: np.ndarray, c: int, reduce: Reduce) -> float | None:
        present = np.flatnonzero(label_counts)
        if present.size < 2:
            return None
        logits = np.concatenate(self.logits) if self.logits else np.zeros((0, c), np.float32)
        y = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        sub = logits[:, present].astype(np.float64)
        # Binary: the second present class's score, as compute_metrics scores it; else one-vs-rest each.
        scored = present[1:] if present.size == 2 else present
        z = _log_odds(sub)[:, -scored.size :]
        finite = np.isfinite(z)
        hi = np.where(finite, z, -np.inf).max(axis=0, initial=-np.inf)
        lo = np.where(finite, z, np.inf).min(axis=0, initial=np.inf)
        bounds = reduce(torch.from_numpy(np.concatenate([[float(np.isnan(z).any())], hi, -lo])), "max").numpy()
        if bounds[0] > 0:
            # A NaN or +inf logit makes its row's probabilities NaN: no ordering, as compute_metrics says.
            return None
        k = scored.size
        hi, lo = bounds[1 : 1 + k], -bounds[1 + k :]
        bins = max(100, min(AUROC_BINS, _MAX_HISTOGRAM_CELLS // (2 * k)))
        width = bins + 2  # and one bin for each saturated end
        # int32 halves the exchange; a bin would need 2**31 examples to overflow.
        hist = np.zeros((k, 2, width), dtype=np.int32)
        for i, cls in enumerate(scored):
            idx = _bin_index(z[:, i], lo[i], hi[i], bins)
            hist[i] = np.bincount((y == cls).astype(np.int64) * width + idx, minlength=2 * width).reshape(2, width)
        hist = reduce(torch.from_numpy(hist.reshape(-1)), "sum").numpy().reshape(k, 2, width).astype(np.float64)
        aucs = [_binned_auc(hist[i, 1], hist[i, 0]) for i in range(k)]
        return float(np.mean(aucs))

    def _compute_regression(self, reduce: Reduce) -> dict[str, MetricValue]:
        sums = reduce(
            torch.tensor(
                [float(self.count), self.loss_sum, float(self.n_y), self.n_y * self.mean_y, self.abs_err, self.sq_err],
                dtype=torch.float64,
            ),
            "sum",
        ).numpy()
        if sums[0] == 0:
            return {}
        n = sums[2]
        out: dict[str, MetricValue] = {}
        ss_tot = None
        if "r2" in self.names and n > 0:
            mean = sums[3] / n
            # Each rank's deviations about its own mean plus its mean's offset from the split's:
            # no sum of y² that would cancel catastrophically for targets far from zero.
            local = self.m2_y + self.n_y * (self.mean_y - mean) ** 2
            ss_tot = float(reduce(torch.tensor([local], dtype=torch.float64), "sum")[0])
        for name in self.names:
            if name == "loss":
                out[name] = float(sums[1] / sums[0])
            elif n == 0:
                out[name] = None
            elif name == "mse":
                out[name] = float(sums[5] / n)
            elif name == "mae":
                out[name] = float(sums[4] / n)
            elif name == "r2":
                ss_res = float(sums[5])
                if ss_tot == 0.0:
                    out[name] = 1.0 if ss_res == 0.0 else 0.0
                else:
                    out[name] = 1.0 - ss_res / ss_tot
        return out


def _merge_moments(n_a: int, mean_a: float, m2_a: float, n_b: int, mean_b: float, m2_b: float):
    # Chan et al.'s pairwise update of count, mean and sum of squared deviations.
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


def _macro_f1_from_confusion(cm: np.ndarray) -> float:
    # The classes in the targets or the predictions, as _macro_f1 (and sklearn) take them.
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    labels = np.flatnonzero(cm.sum(axis=0) + cm.sum(axis=1))
    return float(np.mean([2.0 * tp[c] / (2.0 * tp[c] + fp[c] + fn[c]) for c in labels]))


def _log_odds(sub: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of each column's softmax probability, p computed as `compute_metrics` does.

    The same order and the same ties as p (0 and 1 become -inf and +inf), spread evenly where p saturates.
    """
    s = sub - sub.max(axis=1, keepdims=True) if sub.shape[0] else sub
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        return np.log(p) - np.log1p(-p)


def _bin_index(z: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    # Bins 1..bins split [lo, hi]; a probability of exactly 0 or 1 (log-odds -inf, +inf) gets a
    # bin of its own at either end, so it ties only with its equals, as in the exact area.
    idx = np.empty(z.shape, dtype=np.int64)
    idx[z == -np.inf] = 0
    idx[z == np.inf] = bins + 1
    finite = np.isfinite(z)
    if hi > lo:
        idx[finite] = 1 + np.floor(np.clip((z[finite] - lo) / (hi - lo) * bins, 0, bins - 1)).astype(np.int64)
    else:
        idx[finite] = 1
    return idx


def _binned_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    # Each positive beats the negatives of lower bins and ties (one half) those of its own bin.
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (pos.sum() * neg.sum()))


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
