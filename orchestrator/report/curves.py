"""ROC and precision-recall points, NumPy only: the same points and areas as scikit-learn's roc_curve, auc,
precision_recall_curve and average_precision_score (tests/test_charts.py checks), without its import (seconds).

NumPy is imported inside each function: listing runs, or a report with no test split, never loads it.
"""

from __future__ import annotations


def _binary_clf_curve(positive, score):
    """False and true positives at each distinct score, highest score first."""
    import numpy as np

    order = np.argsort(score, kind="mergesort")[::-1]
    score, positive = np.asarray(score)[order], np.asarray(positive, dtype=bool)[order]
    last = np.r_[np.nonzero(np.diff(score))[0], score.size - 1]  # the last example of each run of equal scores
    tps = np.cumsum(positive, dtype=np.float64)[last]
    return 1 + last - tps, tps


def roc_points(positive, score):
    """(false positive rates, true positive rates) of the ROC curve of scores `score` for the boolean labels `positive`."""
    import numpy as np

    fps, tps = _binary_clf_curve(positive, score)
    if fps.size > 2:  # points in line with their neighbours add nothing to the curve or its area
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]


def pr_points(positive, score):
    """(precision, recall) of the precision-recall curve, from the highest recall down to (1, 0)."""
    import numpy as np

    fps, tps = _binary_clf_curve(positive, score)
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted != 0)
    recall = tps / tps[-1] if tps[-1] else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def trapezoid_area(x, y) -> float:
    """The area under a curve through the points (x, y), x sorted (scikit-learn's `auc`)."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(abs(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2)))


def average_precision(precision, recall) -> float:
    """Precision averaged over the recall steps, with no interpolation (scikit-learn's average_precision_score)."""
    import numpy as np

    return float(-np.sum(np.diff(recall) * np.asarray(precision)[:-1]))


def _thin_curve(x, y, columns: int = 1000) -> tuple[list[float], list[float]]:
    """A curve in [0, 1] with monotone x, cut to what a plot shows: the first, last, lowest and highest point of each of
    `columns` slices of x (a micro-averaged curve has a point per example and class: millions)."""
    import numpy as np

    if x.size <= 4 * columns:
        return x.tolist(), y.tolist()
    bins = np.floor(np.clip(x, 0, 1) * columns)
    starts = np.r_[0, np.flatnonzero(np.diff(bins)) + 1]
    ends = np.r_[starts[1:] - 1, x.size - 1]
    group = np.repeat(np.arange(starts.size), ends - starts + 1)
    by_value = np.lexsort((y, group))  # each slice's points in order of y, slices in curve order
    keep = np.unique(np.r_[starts, ends, by_value[starts], by_value[ends]])
    return x[keep].tolist(), y[keep].tolist()
