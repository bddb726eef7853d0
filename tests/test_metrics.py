"""Metrics against scikit-learn on seeded random data, and the ordering helpers."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from orchestrator.loop.step import compute_loss
from orchestrator.metrics import SplitState, compute_metrics, default_mode, is_better

CLS = ["loss", "accuracy", "f1", "roc_auc", "confusion_matrix"]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _classification_case(seed: int, n: int, num_classes: int, present: list[int]):
    rng = np.random.default_rng(seed)
    y = rng.choice(present, size=n)
    logits = rng.normal(size=(n, num_classes))
    # Some signal, so that the scores are not all near 0.5.
    logits[np.arange(n), y] += 1.0
    return torch.tensor(logits, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_sklearn_with_absent_classes(seed):
    # A 10-way head on a split that only has some of the classes (digits filtered to a subset).
    present = [0, 2, 3, 5, 7]
    logits, y = _classification_case(seed, 300, 10, present)
    m = compute_metrics("classification", CLS, logits, y, loss=0.25)

    yn, ln = y.numpy(), logits.double().numpy()
    pred = ln.argmax(1)
    assert m["loss"] == 0.25
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(yn, pred), abs=1e-12)
    # Predictions of classes absent from the targets count in the macro average, as in sklearn.
    assert set(pred) - set(present)
    assert m["f1"] == pytest.approx(skm.f1_score(yn, pred, average="macro"), abs=1e-12)
    probs = _softmax(ln[:, present])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(yn, probs, multi_class="ovr", labels=present), abs=1e-12)
    assert m["confusion_matrix"] == skm.confusion_matrix(yn, pred, labels=list(range(10))).tolist()
    assert np.array(m["confusion_matrix"]).shape == (10, 10)


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_all_classes_present(seed):
    logits, y = _classification_case(seed, 200, 4, [0, 1, 2, 3])
    m = compute_metrics("classification", ["roc_auc", "f1"], logits, y, loss=0.0)
    probs = _softmax(logits.double().numpy())
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y.numpy(), probs, multi_class="ovr"), abs=1e-12)
    assert m["f1"] == pytest.approx(skm.f1_score(y.numpy(), probs.argmax(1), average="macro"), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_is_class_one_probability(seed):
    logits, y = _classification_case(seed, 150, 2, [0, 1])
    m = compute_metrics("classification", ["roc_auc"], logits, y, loss=0.0)
    p1 = _softmax(logits.double().numpy())[:, 1]
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y.numpy(), p1), abs=1e-12)


def test_two_present_classes_in_a_larger_head():
    logits, y = _classification_case(3, 120, 10, [1, 4])
    m = compute_metrics("classification", ["roc_auc"], logits, y, loss=0.0)
    p4 = _softmax(logits.double().numpy()[:, [1, 4]])[:, 1]
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y.numpy() == 4, p4), abs=1e-12)


def test_auc_with_ties_matches_sklearn():
    rng = np.random.default_rng(7)
    # Few distinct rows, each repeated: many exactly tied scores, in every class column.
    rows = rng.integers(-2, 3, size=(6, 3)).astype(np.float64)
    idx = rng.integers(0, 6, size=200)
    logits = rows[idx]
    y = rng.integers(0, 3, size=200)
    m = compute_metrics("classification", ["roc_auc"], torch.tensor(logits), torch.tensor(y), loss=0.0)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, _softmax(logits), multi_class="ovr"), abs=1e-12)

    binary = np.stack([np.zeros(200), rng.integers(0, 3, size=200).astype(np.float64)], axis=1)
    yb = rng.integers(0, 2, size=200)
    mb = compute_metrics("classification", ["roc_auc"], torch.tensor(binary), torch.tensor(yb), loss=0.0)
    assert mb["roc_auc"] == pytest.approx(skm.roc_auc_score(yb, _softmax(binary)[:, 1]), abs=1e-12)
    constant = compute_metrics("classification", ["roc_auc"], torch.zeros(200, 2), torch.tensor(yb), loss=0.0)
    assert constant["roc_auc"] == pytest.approx(0.5)


def test_auc_undefined_with_one_class_or_non_finite_scores():
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    m = compute_metrics("classification", ["roc_auc", "accuracy"], logits, torch.full((20,), 3), loss=0.0)
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(float((logits.argmax(1) == 3).float().mean()))
    logits[0, 0] = float("nan")
    y = torch.tensor([0, 1] * 10)
    assert compute_metrics("classification", ["roc_auc"], logits, y, loss=0.0)["roc_auc"] is None


def test_f1_perfect_and_empty_split():
    y = torch.tensor([0, 1, 2, 2, 1])
    logits = torch.nn.functional.one_hot(y, 6).float()
    m = compute_metrics("classification", CLS, logits, y, loss=0.1)
    assert m["accuracy"] == 1.0 and m["f1"] == 1.0 and m["roc_auc"] == 1.0
    empty = compute_metrics("classification", CLS, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), loss=0.0)
    assert empty["accuracy"] is None and empty["f1"] is None and empty["roc_auc"] is None
    assert empty["confusion_matrix"] == [[0, 0, 0]] * 3


def test_classification_accepts_low_precision_outputs_with_grad():
    logits, y = _classification_case(4, 64, 3, [0, 1, 2])
    half = logits.to(torch.bfloat16).requires_grad_()
    m = compute_metrics("classification", ["accuracy"], half, y, loss=0.0)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y.numpy(), half.detach().float().argmax(1).numpy()))


def test_bad_labels_and_names_are_errors():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        compute_metrics("classification", ["accuracy"], torch.zeros(2, 3), torch.tensor([0, 3]), loss=0.0)
    with pytest.raises(ValueError, match="'mse' does not apply to classification"):
        compute_metrics("classification", ["mse"], torch.zeros(2, 3), torch.tensor([0, 1]), loss=0.0)
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("ranking", ["loss"], torch.zeros(2), torch.zeros(2), loss=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_regression_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=250)
    pred = y + rng.normal(scale=0.5, size=250)
    # (N, 1) outputs, as a one-unit head gives them.
    m = compute_metrics(
        "regression", ["loss", "mse", "mae", "r2"], torch.tensor(pred).unsqueeze(1), torch.tensor(y), loss=0.3
    )
    assert m["loss"] == 0.3
    assert m["mse"] == pytest.approx(skm.mean_squared_error(y, pred), rel=1e-12)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-12)
    assert m["r2"] == pytest.approx(skm.r2_score(y, pred), rel=1e-12)


def test_r2_constant_targets_follow_sklearn():
    y = np.full(10, 2.0)
    for pred in (y.copy(), y + 1.0):
        m = compute_metrics("regression", ["r2"], torch.tensor(pred), torch.tensor(y), loss=0.0)
        assert m["r2"] == skm.r2_score(y, pred)


def test_perplexity_is_exp_of_mean_token_cross_entropy():
    vocab = 50
    logits = torch.zeros(8, 16, vocab)
    targets = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1)).item()
    m = compute_metrics("lm", ["loss", "perplexity"], logits, targets, loss=loss)
    # A uniform model over the vocabulary is exactly as perplexed as the vocabulary is large.
    assert m["perplexity"] == pytest.approx(vocab, rel=1e-6)
    assert m["loss"] == loss
    assert compute_metrics("lm", ["perplexity"], logits, targets, loss=2.0)["perplexity"] == pytest.approx(
        math.exp(2.0)
    )
    assert compute_metrics("lm", ["perplexity"], logits, targets, loss=1e4)["perplexity"] == math.inf


@pytest.mark.parametrize(
    "name, mode",
    [
        ("loss", "min"),
        ("val_loss", "min"),
        ("val_mse", "min"),
        ("mae", "min"),
        ("val_perplexity", "min"),
        ("accuracy", "max"),
        ("val_accuracy", "max"),
        ("val_f1", "max"),
        ("roc_auc", "max"),
        ("val_r2", "max"),
    ],
)
def test_default_mode(name, mode):
    assert default_mode(name) == mode


def test_default_mode_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="val_bleu"):
        default_mode("val_bleu")


def test_is_better_with_min_delta():
    assert is_better(0.9, None, "min")
    assert is_better(0.9, 1.0, "min") and not is_better(1.0, 1.0, "min") and not is_better(1.1, 1.0, "min")
    assert is_better(1.1, 1.0, "max") and not is_better(1.0, 1.0, "max") and not is_better(0.9, 1.0, "max")
    # An improvement must exceed min_delta to count.
    assert not is_better(0.95, 1.0, "min", min_delta=0.1)
    assert is_better(0.85, 1.0, "min", min_delta=0.1)
    assert not is_better(1.05, 1.0, "max", min_delta=0.1)
    assert is_better(1.15, 1.0, "max", min_delta=0.1)
    assert not is_better(float("nan"), 1.0, "min") and not is_better(None, 1.0, "max")
    assert is_better(1.0, float("nan"), "min")
    with pytest.raises(ValueError, match="mode"):
        is_better(1.0, 2.0, "lower")


# --- Metric states: each rank's shard reduced to sums, counts and histograms, never the outputs ---


def _states(task, names, outputs, targets, loss_per_item, batch=37):
    state = SplitState(task, names)
    for i in range(0, len(targets), batch):
        n = targets[i : i + batch].numel() if task == "lm" else len(targets[i : i + batch])
        state.update(outputs[i : i + batch], targets[i : i + batch], loss_per_item * n, n)
    return state


@pytest.mark.parametrize(
    "seed, num_classes, present", [(0, 10, [0, 2, 3, 5, 7]), (1, 4, [0, 1, 2, 3]), (2, 2, [0, 1]), (3, 10, [1, 4])]
)
def test_state_of_one_rank_equals_the_whole_split_metrics(seed, num_classes, present):
    logits, y = _classification_case(seed, 1000, num_classes, present)
    exact = compute_metrics("classification", CLS, logits, y, loss=0.25)
    binned = _states("classification", CLS, logits, y, 0.25).compute()
    for name in ("loss", "accuracy", "f1"):
        assert binned[name] == pytest.approx(exact[name], abs=1e-12)
    assert binned["confusion_matrix"] == exact["confusion_matrix"]
    assert abs(binned["roc_auc"] - exact["roc_auc"]) <= 1e-3


def test_binned_auc_of_a_wide_head_keeps_its_bound_with_fewer_bins():
    # 600 present classes: fewer than AUROC_BINS bins a class, so the exchange stays bounded.
    logits, y = _classification_case(9, 6000, 600, list(range(600)))
    exact = compute_metrics("classification", ["roc_auc"], logits, y, loss=0.0)["roc_auc"]
    assert abs(_states("classification", ["roc_auc"], logits, y, 0.0).compute()["roc_auc"] - exact) <= 1e-3


def test_binned_auc_with_ties_saturated_and_non_finite_scores():
    rng = np.random.default_rng(7)
    rows = rng.integers(-2, 3, size=(6, 3)).astype(np.float64)
    logits, y = torch.tensor(rows[rng.integers(0, 6, size=400)]), torch.tensor(rng.integers(0, 3, size=400))
    exact = compute_metrics("classification", ["roc_auc"], logits, y, loss=0.0)["roc_auc"]
    # Exact ties stay ties: the same rows give the same log-odds, in one bin.
    assert _states("classification", ["roc_auc"], logits, y, 0.0).compute()["roc_auc"] == pytest.approx(
        exact, abs=1e-12
    )
    # A confident model: probabilities of exactly 0 and 1 in float64 (log-odds +-inf) in the end bins.
    sure = torch.nn.functional.one_hot(y, 3).double() * 800.0 + torch.randn(400, 3, dtype=torch.float64)
    sure[:20] = torch.flip(sure[:20], dims=[1])
    exact = compute_metrics("classification", ["roc_auc"], sure, y, loss=0.0)["roc_auc"]
    assert abs(_states("classification", ["roc_auc"], sure, y, 0.0).compute()["roc_auc"] - exact) <= 1e-3
    assert _states("classification", ["roc_auc"], torch.zeros(50, 2), torch.tensor([0, 1] * 25), 0.0).compute()[
        "roc_auc"
    ] == pytest.approx(0.5)
    one_class = _states("classification", ["roc_auc", "accuracy"], torch.randn(20, 5), torch.full((20,), 3), 0.0)
    assert one_class.compute()["roc_auc"] is None
    nan = torch.randn(20, 3)
    nan[5, 1] = float("nan")
    assert _states("classification", ["roc_auc"], nan, torch.tensor([0, 1] * 10), 0.0).compute()["roc_auc"] is None
    # A -inf logit is a probability of 0, still ordered: defined, as in compute_metrics.
    masked = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    masked[::3, 2] = float("-inf")
    y3 = torch.tensor([0, 1, 2, 2] * 10)
    exact = compute_metrics("classification", ["roc_auc"], masked, y3, loss=0.0)["roc_auc"]
    assert exact is not None
    assert abs(_states("classification", ["roc_auc"], masked, y3, 0.0).compute()["roc_auc"] - exact) <= 1e-3
    empty = SplitState("classification", CLS).compute()
    assert empty == {}


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_state_regression_and_lm_equal_the_whole_split_metrics(offset):
    rng = np.random.default_rng(5)
    # Targets far from zero: R² from sums of y and y² would cancel; the merged moments do not.
    y = rng.normal(scale=0.1, size=500) + offset
    pred = y + rng.normal(scale=0.05, size=500)
    names = ["loss", "mse", "mae", "r2"]
    exact = compute_metrics("regression", names, torch.tensor(pred).unsqueeze(1), torch.tensor(y), loss=0.3)
    state = _states("regression", names, torch.tensor(pred).unsqueeze(1), torch.tensor(y), 0.3).compute()
    for name in names:
        assert state[name] == pytest.approx(exact[name], rel=1e-9, abs=1e-12)
    const = SplitState("regression", ["r2"])
    const.update(torch.full((10,), 2.0), torch.full((10,), 2.0), 0.0, 10)
    assert const.compute()["r2"] == 1.0
    lm = SplitState("lm", ["loss", "perplexity"])
    lm.update(None, None, 2.0 * 30, 30)
    lm.update(None, None, 4.0 * 10, 10)
    assert lm.compute() == pytest.approx({"loss": 2.5, "perplexity": math.exp(2.5)})


def test_bad_labels_are_reported_at_compute_on_every_rank():
    state = SplitState("classification", ["accuracy"])
    state.update(torch.zeros(2, 3), torch.tensor([0, 3]), 0.0, 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        state.compute()
    with pytest.raises(ValueError, match="'mse' does not apply"):
        SplitState("classification", ["mse"])


class _Shards:
    """A split as a data source hands it out: rank r of w gets every w-th example."""

    def __init__(self, x, y, batch_size=64):
        self.x, self.y, self.batch_size = x, y, batch_size

    def batches(self, epoch, rank, world_size):
        x, y = self.x[rank::world_size], self.y[rank::world_size]
        for i in range(0, len(y), self.batch_size):
            yield x[i : i + self.batch_size], y[i : i + self.batch_size]


def _cases(n):
    logits, y = _classification_case(11, n, 10, [0, 2, 3, 5, 7])
    rng = np.random.default_rng(12)
    ry = torch.tensor(rng.normal(size=n) + 3.0)
    rp = (ry + torch.tensor(rng.normal(scale=0.5, size=n))).unsqueeze(1)
    tokens = torch.randint(0, 20, (max(1, n // 10), 8), generator=torch.Generator().manual_seed(13))
    lm_logits = torch.randn(tokens.shape[0], 8, 20, generator=torch.Generator().manual_seed(14))
    return {
        "classification": (logits, y, CLS),
        "regression": (rp, ry, ["loss", "mse", "mae", "r2"]),
        "lm": (lm_logits, tokens, ["loss", "perplexity"]),
    }


def _metrics_rank(rank, world, port, out_dir):
    import os

    import torch.distributed as dist

    from orchestrator.loop import LoopContext
    from orchestrator.loop.evaluate import evaluate
    from orchestrator.spec import build_spec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    reduced: list[int] = []
    real = (dist.all_reduce, dist.all_gather_object, dist.all_gather)
    real_all_reduce = real[0]

    def counting_all_reduce(t, *args, **kwargs):
        reduced.append(t.numel() * t.element_size())
        return real_all_reduce(t, *args, **kwargs)

    def no_gather(*args, **kwargs):
        raise AssertionError("validation gathered objects across ranks")

    dist.all_reduce, dist.all_gather_object, dist.all_gather = counting_all_reduce, no_gather, no_gather
    try:
        spec = build_spec(
            {"name": "t", "model": {"name": "mlp"}, "data": {"name": "digits"}}, [f"checkpoint.storage={out_dir}"]
        )
        ctx = LoopContext(run_uri=out_dir, rank=rank, world_size=world)
        results, payload = {}, {}
        for n in (1, 300, 3000):  # 1: rank 1's shard is empty
            for task, (outputs, targets, names) in _cases(n).items():
                reduced.clear()
                results[(n, task)] = evaluate(torch.nn.Identity(), _Shards(outputs, targets), spec, ctx, task, names)
                payload[(n, task)] = sum(reduced)
        torch.save({"results": results, "payload": payload}, os.path.join(out_dir, f"metrics{rank}.pt"))
    finally:
        dist.all_reduce, dist.all_gather_object, dist.all_gather = real
        dist.destroy_process_group()


def test_metrics_of_two_ranks_equal_one_rank_and_their_exchange_does_not_grow_with_the_split(tmp_path):
    import torch.multiprocessing as mp
    from ports import free_port

    from orchestrator.loop import LoopContext
    from orchestrator.loop.evaluate import evaluate
    from orchestrator.spec import build_spec

    mp.start_processes(_metrics_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"metrics{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["results"] == r1["results"]  # every rank gets the same numbers
    spec = build_spec(
        {"name": "t", "model": {"name": "mlp"}, "data": {"name": "digits"}}, [f"checkpoint.storage={tmp_path}"]
    )
    one = LoopContext(run_uri=str(tmp_path))
    for n in (1, 300, 3000):  # 1: rank 1's shard is empty
        for task, (outputs, targets, names) in _cases(n).items():
            two = r0["results"][(n, task)]
            single = evaluate(torch.nn.Identity(), _Shards(outputs, targets), spec, one, task, names)
            # Today's exact functions on the whole split, the loss as one process averages it.
            loss = sum(
                compute_loss(task, x, y).item() * (y.numel() if task == "lm" else len(y))
                for x, y in _Shards(outputs, targets).batches(0, 0, 1)
            ) / (targets.numel() if task == "lm" else len(targets))
            exact = compute_metrics(task, names, outputs.float(), targets, loss)
            assert set(two) == set(single) == set(exact) == set(names)
            for name in names:
                if exact[name] is None:  # ROC-AUC of one example's class
                    assert two[name] is None and single[name] is None
                elif name == "confusion_matrix":
                    assert two[name] == single[name] == exact[name]
                elif name == "roc_auc":
                    assert two[name] == pytest.approx(single[name], abs=1e-12)
                    assert abs(two[name] - exact[name]) <= 1e-3
                else:
                    assert two[name] == pytest.approx(single[name], rel=1e-6, abs=1e-9)
                    assert two[name] == pytest.approx(exact[name], rel=1e-6, abs=1e-9)
    # Ten times the examples, the same bytes all-reduced: states, not outputs, cross ranks.
    for task in ("classification", "regression", "lm"):
        assert r0["payload"][(300, task)] == r0["payload"][(3000, task)] > 0
