"""The report's SVG charts and its NumPy-only ROC and precision-recall curves, checked without training anything."""

from __future__ import annotations

import base64
import re
from xml.etree import ElementTree

import numpy as np
import pytest
from sklearn import metrics as skm

from orchestrator.report import charts
from orchestrator.report.curves import _thin_curve, average_precision, pr_points, roc_points, trapezoid_area
from orchestrator.report.run_page import _class_curves

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']


def svg_of(figure_html: str) -> ElementTree.Element:
    """The SVG document embedded in a report figure, parsed (a parse error fails the test: the SVG must be well-formed)."""
    data = re.search(r'src="data:image/svg\+xml;base64,([^"]+)"', figure_html).group(1)
    return ElementTree.fromstring(base64.b64decode(data))


def texts_of(svg: ElementTree.Element) -> list[str]:
    return ["".join(e.itertext()) for e in svg.iter() if e.tag.endswith("text")]


def scored_labels(rng, n: int, classes: int, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax-like scores that favour the true class, rounded so that many scores tie."""
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += rng.uniform(0.5, 2.5)
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, np.round(scores, decimals)


@pytest.mark.parametrize("seed", range(6))
def test_roc_and_precision_recall_points_and_areas_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels, scores = scored_labels(rng, int(rng.integers(30, 600)), 4, int(rng.integers(1, 4)))
    for c in range(4):
        positive, score = labels == c, scores[:, c]
        fpr, tpr = roc_points(positive, score)
        sk_fpr, sk_tpr, _ = skm.roc_curve(positive, score)
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)
        assert trapezoid_area(fpr, tpr) == pytest.approx(skm.auc(sk_fpr, sk_tpr), abs=1e-12)
        precision, recall = pr_points(positive, score)
        sk_precision, sk_recall, _ = skm.precision_recall_curve(positive, score)
        np.testing.assert_allclose(precision, sk_precision)
        np.testing.assert_allclose(recall, sk_recall)
        assert average_precision(precision, recall) == pytest.approx(
            skm.average_precision_score(positive, score), abs=1e-12
        )


@pytest.mark.parametrize("classes", [2, 5, 12])
def test_curve_legends_show_scikit_learns_auc_and_ap_to_three_decimals(classes):
    rng = np.random.default_rng(classes)
    labels, scores = scored_labels(rng, 400, classes, 2)
    roc, pr = (svg_of(f) for f in _class_curves({"labels": labels.tolist(), "scores": scores.tolist()}))
    if classes == 2:
        curves = [("class 1", labels == 1, scores[:, 1])]
    elif classes <= 10:
        curves = [(f"class {c}", labels == c, scores[:, c]) for c in range(classes)]
    else:  # past MAX_CLASS_CURVES classes: one micro-averaged curve
        curves = [("micro-average", np.eye(classes, dtype=bool)[labels].ravel(), scores.ravel())]
    for name, positive, score in curves:
        fpr, tpr, _ = skm.roc_curve(positive, score)
        assert f"{name} (AUC {skm.auc(fpr, tpr):.3f})" in texts_of(roc)
        assert f"{name} (AP {skm.average_precision_score(positive, score):.3f})" in texts_of(pr)


def test_a_long_curve_is_thinned_to_what_the_plot_shows_keeping_its_extremes():
    rng = np.random.default_rng(0)
    x = np.sort(rng.random(200_000))
    y = rng.random(200_000)
    tx, ty = _thin_curve(x, y)
    assert len(tx) <= 4 * 1000 and tx[0] == x[0] and tx[-1] == x[-1] and tx == sorted(tx)
    assert min(ty) == y.min() and max(ty) == y.max()
    points = [(float(a), float(b)) for a, b in zip(x[:5000] * 400, y[:5000] * 300, strict=False)]
    thin = charts.thin(points)
    assert len(thin) < len(points) and thin[0] == points[0] and thin[-1] == points[-1]
    assert min(p[1] for p in thin) == min(p[1] for p in points) and max(p[1] for p in thin) == max(p[1] for p in points)


def test_ticks_are_round_numbers_inside_the_range():
    assert [label for _, label in charts.linear_ticks(0.85, 0.98)] == [
        "0.850",
        "0.875",
        "0.900",
        "0.925",
        "0.950",
        "0.975",
    ]
    assert [label for _, label in charts.linear_ticks(-1.1, 1.1)] == ["-1.0", "-0.5", "0.0", "0.5", "1.0"]
    assert [label for _, label in charts.linear_ticks(0, 25000)] == ["0", "5000", "10000", "15000", "20000", "25000"]
    assert [label for _, label in charts.log_ticks(0.0004, 0.05)] == ["0.001", "0.01"]
    assert [label for _, label in charts.log_ticks(0.03, 0.3)] == ["0.05", "0.1", "0.2"]
    assert [label for _, label in charts.log_ticks(1e-7, 1e-3)] == ["1e-7", "1e-6", "1e-5", "1e-4", "0.001"]
    minor = [v for v, _ in charts.minor_log_ticks(0.0004, 0.05)]
    assert minor[0] == pytest.approx(0.0004) and 0.002 in minor and all(0.0004 <= v <= 0.05 for v in minor)


def test_every_text_of_a_chart_is_escaped_and_the_svg_stays_well_formed():
    ax = charts.Axes(
        title=HOSTILE[0],
        xlabel=HOSTILE[1],
        ylabel=HOSTILE[0],
        legend_loc="best",
        xticks=[(0.0, HOSTILE[0]), (1.0, HOSTILE[1])],
        colorbar=(charts.VIRIDIS, 0.0, 1.0, HOSTILE[1]),
    )
    ax.line([0, 1], [0, 1], "#000", HOSTILE[1], marker="o")
    ax.points([0.5], [0.5], "#f00", HOSTILE[0], marker="star", size=8)
    ax.text([0.2], [0.2], ["a & b\x00\x07 <c>"])
    svg = ElementTree.fromstring(charts.figure([ax], 600, 400).encode())
    tags = {e.tag.rsplit("}", 1)[-1] for e in svg.iter()}
    assert not tags & {"script", "img", "foreignObject", "a", "image"}
    assert not [a for e in svg.iter() for a in e.attrib if a.lower().startswith("on")]
    texts = texts_of(svg)
    for hostile in HOSTILE:
        assert texts.count(hostile) >= 2, texts  # as text: in a tick and the legend (or a label)
    assert "a & b\ufffd\ufffd <c>" in texts
    assert charts.esc('<a href="x">&\x0b') == "&lt;a href=&quot;x&quot;&gt;&amp;\ufffd"


def test_heatmap_draws_only_the_cells_that_are_not_blank():
    n = 200
    ax = charts.Axes(xlim=(-0.5, n - 0.5), ylim=(n - 0.5, -0.5), square=True, xticks=[], yticks=[])
    share = np.eye(n).tolist()
    ax.cells(share, charts.BLUES, [[""] * n for _ in range(n)])
    svg = ElementTree.fromstring(charts.figure([ax], 600, 600).encode())
    cells = [e for e in svg.iter() if e.tag.endswith("rect") and e.get("fill") == charts.BLUES(1.0)]
    assert len(cells) == n and len(list(svg.iter())) < 3 * n
