"""Data: splits, sharding, resumable order, augmentation, Parquet streaming (local and S3), hooks."""

from __future__ import annotations

import os
import textwrap
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.data import assign_splits, check_data, load_data, shift_images
from orchestrator.errors import BadInput
from orchestrator.spec import build_spec


def make_spec(data: dict, **sections):
    return build_spec({"data": data, **sections})


def synthetic_spec(samples=600, batch_size=16, seed=0, **data):
    return make_spec(
        {"name": "synthetic", "task": "classification", "samples": samples, "num_features": 4, **data},
        train={"batch_size": batch_size, "seed": seed},
    )


def keys(x: torch.Tensor) -> list[tuple]:
    """Identify examples by their (unique, continuous) first two features."""
    flat = x.reshape(len(x), -1)
    return [tuple(row) for row in flat[:, :2].tolist()]


def epoch_keys(source, epoch=0, rank=0, world=1, start_batch=0, legs=()) -> list[tuple]:
    out = []
    for x, _ in source.batches(epoch, rank, world, start_batch, legs):
        out += keys(x)
    return out


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=False)
    )


# ----------------------------------------------------------------------------------------------
# Built-in sources and splits


def test_digits_shapes_sizes_and_fingerprint():
    splits = load_data(make_spec({"name": "digits"}, train={"batch_size": 32}))
    info = splits.info
    assert (info.task, info.input_shape, info.num_classes, info.is_image) == ("classification", (1, 8, 8), 10, True)
    assert sum(info.sizes.values()) == 1797
    assert info.sizes["test"] == 180 and info.sizes["val"] == round(1617 * 0.2)
    assert info.fingerprint["source"] == "digits" and info.fingerprint["package"] == "scikit-learn"
    x, y = next(splits.train.batches(0, 0, 1))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64
    assert check_data(make_spec({"name": "digits"})).sizes == info.sizes


def test_splits_are_disjoint_and_cover_everything():
    splits = load_data(synthetic_spec(samples=500))
    parts = {name: epoch_keys(getattr(splits, name)) for name in ("train", "val", "test")}
    assert {k: len(v) for k, v in parts.items()} == splits.info.sizes
    sets = {k: set(v) for k, v in parts.items()}
    assert sum(len(s) for s in sets.values()) == 500
    assert len(sets["train"] | sets["val"] | sets["test"]) == 500


def test_train_shards_are_disjoint_with_equal_batch_counts():
    splits = load_data(synthetic_spec(samples=500, batch_size=16))
    n, world = splits.info.sizes["train"], 3
    shards = [epoch_keys(splits.train, 0, r, world) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    counts = [len(list(splits.train.batches(0, r, world))) for r in range(world)]
    assert counts == [splits.train.num_batches(world)] * world
    assert len(set().union(*map(set, shards))) == world * (n // world)


def test_train_order_depends_on_seed_and_epoch_only():
    a, b = load_data(synthetic_spec()), load_data(synthetic_spec())
    assert epoch_keys(a.train, 1) == epoch_keys(b.train, 1)
    assert epoch_keys(a.train, 1) != epoch_keys(a.train, 2)
    assert sorted(epoch_keys(a.train, 1)) == sorted(epoch_keys(a.train, 2))
    other_seed = load_data(synthetic_spec(seed=1))
    assert epoch_keys(other_seed.train, 1) != epoch_keys(a.train, 1)


def test_start_batch_resumes_exactly():
    splits = load_data(synthetic_spec(batch_size=16))
    for rank in range(2):
        full = list(splits.train.batches(3, rank, 2))
        assert same_batches(list(splits.train.batches(3, rank, 2, start_batch=4)), full[4:])
    assert list(splits.train.batches(3, 0, 2, start_batch=len(full))) == []


def test_val_is_strided_unshuffled_and_covers_all_ranks():
    splits = load_data(synthetic_spec(samples=503))
    world = 4
    shards = [epoch_keys(splits.val, 0, r, world) for r in range(world)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert sum(map(len, shards)) == splits.info.sizes["val"] == len(set().union(*map(set, shards)))
    assert epoch_keys(splits.val, 0) == epoch_keys(splits.val, 5)
    assert splits.val.num_batches(world) == len(list(splits.val.batches(0, 0, world)))


def test_kfold_folds_are_disjoint_cover_the_non_test_data_and_keep_test_fixed():
    k = 4
    runs = [load_data(synthetic_spec(samples=400, folds=k, fold=i)) for i in range(k)]
    vals = [set(epoch_keys(r.val)) for r in runs]
    tests = [set(epoch_keys(r.test)) for r in runs]
    assert all(t == tests[0] for t in tests)
    assert sum(map(len, vals)) == len(set().union(*vals)) == 400 - len(tests[0])
    for r, v in zip(runs, vals, strict=False):
        assert set(epoch_keys(r.train)) == set().union(*vals) - v


def fold_labels(source) -> np.ndarray:
    return torch.cat([y for _, y in source.batches(0, 0, 1)]).numpy()


def test_stratified_folds_keep_the_class_proportions_and_leave_the_test_split_out():
    # Digits: 10 classes of about 180 examples; 5 folds of the non-test part.
    k = 5
    base = load_data(make_spec({"name": "digits", "test_split": 0.1}))
    runs = [load_data(make_spec({"name": "digits", "test_split": 0.1, "folds": k, "fold": i})) for i in range(k)]
    assert all(r.info.sizes["test"] == base.info.sizes["test"] for r in runs)

    def images(source):
        return {x.numpy().tobytes() for xb, _ in source.batches(0, 0, 1) for x in xb}

    test = images(base.test)
    vals = [images(r.val) for r in runs]
    assert all(images(r.test) == test for r in runs)  # the same test split as the job without folds
    assert all(not (v & test) for v in vals)  # and in no validation fold
    assert sum(map(len, vals)) == len(set().union(*vals))  # no example in two validation folds
    pool = np.concatenate([fold_labels(r.val) for r in runs])
    counts = np.stack([np.bincount(fold_labels(r.val), minlength=10) for r in runs])
    assert counts.sum() == len(pool) == sum(r.info.sizes["train"] + r.info.sizes["val"] for r in runs) / k
    # Each fold holds floor or ceil of its share of every class: within one example per class.
    share = np.bincount(pool, minlength=10) / k
    assert np.all(np.abs(counts - share) < 1), counts
    sizes = [r.info.sizes["val"] for r in runs]
    assert max(sizes) - min(sizes) <= 1


def test_unstratified_folds_drift_where_stratified_ones_do_not():
    # The same seed without stratification: random folds miss the proportions by several examples (what stratifying fixes).
    k = 5
    plain = [load_data(make_spec({"name": "digits", "folds": k, "fold": i, "stratify": False})).val for i in range(k)]
    counts = np.stack([np.bincount(fold_labels(v), minlength=10) for v in plain])
    share = counts.sum(axis=0) / k
    assert np.abs(counts - share).max() >= 2


def test_folds_beyond_the_smallest_class_or_stratified_without_classes_are_bad_input():
    # Digits keep about 160 examples of each class outside the test split; synthetic with 3 classes and 30 examples: ~9.
    with pytest.raises(
        BadInput,
        match=r"^data\.folds: 12 is more than the smallest class has examples outside the test split \(class \d: \d+\); use at most \d+ folds$",
    ):
        check_data(synthetic_spec(samples=30, num_classes=3, folds=12))
    check_data(synthetic_spec(samples=30, num_classes=3, folds=12, stratify=False))  # unstratified: allowed
    # Under a class filter only the kept classes count: a rare class left out does not limit the folds.
    labels = np.array([0] * 50 + [1] * 50 + [2] * 2)
    with pytest.raises(BadInput, match=r"^data\.folds: 5 is more .* \(class 2: 2\)"):
        assign_splits(len(labels), 0, 0.0, 0.2, 5, 0, labels=labels)
    codes = assign_splits(len(labels), 0, 0.0, 0.2, 5, 0, labels=labels, counted=labels < 2)
    assert np.bincount(labels[codes == 1], minlength=3)[:2].tolist() == [10, 10]
    with pytest.raises(
        BadInput, match=r"^data\.stratify: stratified folds need class labels; 'mod:make' is a regression"
    ):
        from orchestrator.data.memory import _Arrays, _strata

        spec = make_spec({"name": "mod:make", "folds": 3, "stratify": True})
        _strata(spec, _Arrays(np.zeros((9, 2)), np.zeros(9), "regression", None, None))


def test_classes_filter_keeps_labels_and_the_same_test_examples():
    full = load_data(make_spec({"name": "digits"}))
    part = load_data(make_spec({"name": "digits", "classes": [0, 1, 2, 3, 4]}))
    assert part.info.num_classes == 10
    labels = torch.cat([y for _, y in part.train.batches(0, 0, 1)])
    assert set(labels.tolist()) == {0, 1, 2, 3, 4}
    assert part.info.sizes["train"] < full.info.sizes["train"]

    def images(source):
        return {x.numpy().tobytes() for xb, _ in source.batches(0, 0, 1) for x in xb}

    # Splitting before filtering: the 0-4 job never trains on the full job's test images.
    assert images(part.test) <= images(full.test)
    with pytest.raises(BadInput, match=r"^data\.classes: 12 is not a label"):
        check_data(make_spec({"name": "digits", "classes": [1, 12]}))


def test_augmentation_changes_train_only_is_reproducible_and_leaves_global_rng_alone():
    plain = load_data(make_spec({"name": "digits"}, train={"batch_size": 32}))
    aug = load_data(make_spec({"name": "digits", "augment": {"shift": 2, "noise": 0.05}}, train={"batch_size": 32}))
    state = torch.get_rng_state()
    first = list(aug.train.batches(1, 0, 2))
    assert torch.equal(state, torch.get_rng_state())
    reference = list(plain.train.batches(1, 0, 2))
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(first, reference, strict=False))
    assert not any(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(first, reference, strict=False))
    assert same_batches(first, list(aug.train.batches(1, 0, 2)))
    assert same_batches(list(aug.train.batches(1, 0, 2, start_batch=3)), first[3:])
    assert same_batches(list(aug.val.batches(0, 0, 1)), list(plain.val.batches(0, 0, 1)))


def test_shift_images_translates_with_zero_fill():
    x = torch.rand(16, 2, 6, 7) + 1.0
    out = shift_images(x, 2, torch.Generator().manual_seed(0))
    for img, got in zip(x, out, strict=False):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                want = torch.zeros_like(img)
                src = img[:, max(0, -dy) : 6 - max(0, dy), max(0, -dx) : 7 - max(0, dx)]
                want[:, max(0, dy) : max(0, dy) + src.shape[1], max(0, dx) : max(0, dx) + src.shape[2]] = src
                matches.append(torch.equal(got, want))
        assert any(matches)


def test_shift_needs_images():
    with pytest.raises(BadInput, match=r"^data\.augment\.shift: needs image data"):
        check_data(synthetic_spec(augment={"shift": 1}))


def test_synthetic_lm_windows_are_shifted_and_learnable():
    spec = make_spec(
        {"name": "synthetic", "task": "lm", "samples": 300, "vocab_size": 64, "seq_len": 16},
        model={"name": "gpt", "context": 16},
        train={"batch_size": 8},
    )
    splits = load_data(spec)
    assert splits.info.input_shape == (16,) and splits.info.vocab_size == 64
    x, y = next(splits.train.batches(0, 0, 1))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # A bigram table fitted on train predicts val far better than chance (perplexity << vocab size).
    counts = np.ones((64, 64))
    for xb, yb in splits.train.batches(0, 0, 1):
        np.add.at(counts, (xb.flatten().numpy(), yb.flatten().numpy()), 1)
    probs = counts / counts.sum(1, keepdims=True)
    nll = [-np.log(probs[xb.flatten().numpy(), yb.flatten().numpy()]).mean() for xb, yb in splits.val.batches(0, 0, 1)]
    assert np.exp(np.mean(nll)) < 64 / 4


def test_synthetic_regression_targets_are_standardized_float():
    splits = load_data(make_spec({"name": "synthetic", "task": "regression", "samples": 400}))
    x, y = next(splits.train.batches(0, 0, 1))
    assert x.dtype == y.dtype == torch.float32 and y.shape == (len(x),)
    assert splits.info.num_classes is None and 0.5 < float(y.std()) < 1.5


# ----------------------------------------------------------------------------------------------
# Parquet


def write_table(path, n=500, row_group_size=40, start=0):
    index = np.arange(start, start + n)
    table = pa.table(
        {
            "f0": index.astype(np.float64),
            "f1": np.sin(index),
            "unused": np.zeros(n),
            "label": (index % 3).astype(np.int64),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def parquet_spec(path, batch_size=16, **data):
    base = {"name": "parquet", "task": "classification", "path": str(path), "features": ["f0", "f1"], "label": "label"}
    return make_spec({**base, **data}, train={"batch_size": batch_size})


@pytest.fixture
def parquet_file(tmp_path):
    write_table(tmp_path / "all.parquet")
    return tmp_path / "all.parquet"


def test_parquet_streams_one_row_group_at_a_time_with_needed_columns(parquet_file, monkeypatch):
    calls = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        calls.append((i, tuple(columns or ())))
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole file"))
    splits = load_data(parquet_spec(parquet_file), shuffle_buffer=100)
    assert calls == []  # counts come from metadata and the split hash
    assert splits.info.num_classes == 3 and sum(splits.info.sizes.values()) == 500
    list(splits.train.batches(0, 0, 1))
    assert calls and all(cols == ("f0", "f1", "label") for _, cols in calls)


def test_parquet_check_reads_metadata_only(parquet_file, monkeypatch):
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda *a, **k: pytest.fail("read data"))
    info = check_data(parquet_spec(parquet_file))
    assert info.sizes_exact and info.input_shape == (2,) and info.num_classes == 3
    assert info.fingerprint["files"][0]["path"] == str(parquet_file) and info.fingerprint["files"][0]["size"] > 0


def test_parquet_train_epoch_covers_train_split_and_shards_are_equal(parquet_file):
    splits = load_data(parquet_spec(parquet_file), shuffle_buffer=100)
    n = splits.info.sizes["train"]
    one = epoch_keys(splits.train, 0)
    assert len(one) == len(set(one)) == n
    assert not set(one) & set(epoch_keys(splits.val)) and not set(one) & set(epoch_keys(splits.test))
    assert one != epoch_keys(splits.train, 1) and one == epoch_keys(
        load_data(parquet_spec(parquet_file), shuffle_buffer=100).train, 0
    )
    shards = [epoch_keys(splits.train, 2, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [n // 3] * 3 and len(set().union(*map(set, shards))) == 3 * (n // 3)
    assert [len(list(splits.train.batches(2, r, 3))) for r in range(3)] == [splits.train.num_batches(3)] * 3
    full = list(splits.train.batches(2, 1, 3))
    assert same_batches(list(splits.train.batches(2, 1, 3, start_batch=5)), full[5:])


def test_parquet_directory_and_glob_match_a_single_file(tmp_path, parquet_file):
    parts = tmp_path / "parts"
    parts.mkdir()
    write_table(parts / "part-0.parquet", n=250, start=0)
    write_table(parts / "part-1.parquet", n=250, start=250)
    single = load_data(parquet_spec(parquet_file))
    for path in (parts, parts / "*.parquet"):
        multi = load_data(parquet_spec(path))
        assert multi.info.sizes == single.info.sizes
        assert len(multi.info.fingerprint["files"]) == 2
        assert epoch_keys(multi.val) == epoch_keys(single.val)


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"path": "nope.parquet"}, r"^data\.path: .*nope\.parquet: no such file$"),
        ({"path": "*.nothing"}, r"^data\.path: .*: no parquet files match$"),
        (
            {"features": ["f0", "foo"]},
            r"^data\.features: column 'foo' not in parquet schema .*\(columns: f0, f1, unused, label\)$",
        ),
        ({"label": "missing"}, r"^data\.label: column 'missing' not in parquet schema"),
        ({"label": "f1"}, r"^data\.label: column 'f1' .* is double, not integer class labels$"),
    ],
)
def test_parquet_bad_input_names_the_field_in_one_line(tmp_path, parquet_file, data, pattern):
    path = tmp_path / data.pop("path") if "path" in data else parquet_file
    with pytest.raises(BadInput, match=pattern) as err:
        check_data(parquet_spec(path, **data))
    assert "\n" not in str(err.value)


def test_parquet_relative_path_resolves_against_base_dir(tmp_path, parquet_file):
    info = check_data(parquet_spec("all.parquet"), base_dir=tmp_path)
    assert sum(info.sizes.values()) == 500


def test_parquet_classes_filter_and_regression(parquet_file):
    spec = parquet_spec(parquet_file, classes=[0, 2])
    assert not check_data(spec).sizes_exact
    splits = load_data(spec)
    labels = torch.cat([y for _, y in splits.train.batches(0, 0, 1)])
    assert set(labels.tolist()) == {0, 2} and len(labels) == splits.info.sizes["train"]
    reg = load_data(parquet_spec(parquet_file, task="regression", label="f1"))
    x, y = next(reg.train.batches(0, 0, 1))
    assert y.dtype == torch.float32 and y.shape == (16,) and reg.info.num_classes is None


def test_parquet_lm_windows(tmp_path):
    rows = [list(range(i * 10, i * 10 + 10)) for i in range(60)]  # tokens 0..599, each row continues the last
    pq.write_table(
        pa.table({"tokens": pa.array(rows, type=pa.list_(pa.int64()))}), tmp_path / "lm.parquet", row_group_size=20
    )
    spec = make_spec(
        {
            "name": "parquet",
            "task": "lm",
            "path": str(tmp_path / "lm.parquet"),
            "tokens": "tokens",
            "vocab_size": 600,
            "seq_len": 8,
            "test_split": 0.0,
        },
        model={"name": "gpt", "context": 8},
        train={"batch_size": 4},
    )
    splits = load_data(spec)
    assert splits.info.input_shape == (8,) and splits.info.vocab_size == 600
    xs, ys = zip(*splits.train.batches(0, 0, 1), strict=False)
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(x) == splits.info.sizes["train"] and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    small = make_spec({**spec.data.model_dump(), "vocab_size": 100}, model={"name": "gpt", "context": 8})
    with pytest.raises(BadInput, match=r"^data\.vocab_size: token id \d+ .* outside 0\.\.99"):
        load_data(small)


@pytest.fixture
def parquet_parts(tmp_path):
    """500 rows in two files, row groups of 40 (the last of each file shorter)."""
    parts = tmp_path / "parts"
    parts.mkdir()
    write_table(parts / "part-0.parquet", n=260, start=0)
    write_table(parts / "part-1.parquet", n=240, start=260)
    return parts


def split_keys(splits, name) -> set:
    return set(epoch_keys(getattr(splits, name)))


def reads_of(table, action) -> list[tuple[int, int]]:
    """The row groups (and stored bytes) `action` read from storage."""
    before = len(table.reads)
    action()
    return table.reads[before:]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_parquet_ranks_read_disjoint_shares_of_the_train_split(parquet_parts, world):
    splits = load_data(parquet_spec(parquet_parts, batch_size=8), shuffle_buffer=50)
    table, train = splits.train.table, splits.train
    everything = {(float(np.float32(i)), float(np.float32(np.sin(i)))) for i in range(500)}
    train_set = everything - split_keys(splits, "val") - split_keys(splits, "test")
    assert len(train_set) == splits.info.sizes["train"] == train.size
    rows_per_rank = table.rows.sum() / world
    # Stored bytes of the columns a step reads, per row group, from the files' footers.
    stored = np.array(
        [sum(table.metas[f].row_group(g).column(j).total_compressed_size for j in (0, 1, 3)) for f, g in table.groups]
    )
    for epoch in (0, 1):
        shares, reads = [], []
        for rank in range(world):
            got: list = []
            reads.append(reads_of(table, lambda r=rank, g=got, e=epoch: g.extend(epoch_keys(train, e, r, world))))
            shares.append(got)
            assert len(list(train.batches(epoch, rank, world))) == train.num_batches(world)
        # Equal shares, disjoint, covering the split but for the last size % world of the epoch's order.
        assert [len(s) for s in shares] == [train.size // world] * world
        union = set().union(*map(set, shares))
        assert len(union) == world * (train.size // world) and union <= train_set
        for rank, read in enumerate(reads):
            groups = [g for g, _ in read]
            assert len(groups) == len(set(groups))  # each row group read once
            # A rank reads its share plus the row groups cut between it and its neighbours (one at an end rank).
            cut = 1 if rank in (0, world - 1) else 2
            assert table.rows[groups].sum() <= rows_per_rank + cut * table.rows.max()
            assert sum(b for _, b in read) <= stored.sum() / world + cut * stored.max()
    # A new order each epoch: the shares change, not only their order.
    assert set(epoch_keys(train, 0, 0, world)) != set(epoch_keys(train, 1, 0, world)) or world == 1


def test_parquet_resume_on_the_same_world_size_is_bit_identical_and_skips_done_chunks(parquet_parts):
    train = load_data(parquet_spec(parquet_parts, batch_size=8, augment={"noise": 0.1}), shuffle_buffer=50).train
    full = list(train.batches(1, 1, 3))
    resumed: list = []
    read = reads_of(train.table, lambda: resumed.extend(train.batches(1, 1, 3, start_batch=9)))
    assert same_batches(resumed, full[9:]) and len(full) == train.num_batches(3)
    assert len(read) < len(reads_of(train.table, lambda: list(train.batches(1, 1, 3))))
    assert list(train.batches(1, 1, 3, start_batch=len(full))) == []


def test_parquet_resume_on_another_world_size_takes_what_is_left_once(parquet_parts):
    train = load_data(parquet_spec(parquet_parts, batch_size=8), shuffle_buffer=50).train
    bs = train.batch_size
    first = [epoch_keys(train, 2, r, 2) for r in range(2)]  # 2 ranks took 5 batches each, then a restart on 3
    done = {k for share in first for k in share[: 5 * bs]}
    left = {k for share in first for k in share[5 * bs :]}
    legs = ((2, 5),)
    after = [epoch_keys(train, 2, r, 3, legs=legs) for r in range(3)]
    assert [len(a) for a in after] == [train.num_examples(3, r, legs) for r in range(3)]
    assert len({train.num_batches(3, legs)} | {len(list(train.batches(2, r, 3, legs=legs))) for r in range(3)}) == 1
    union = set().union(*map(set, after))
    assert sum(map(len, after)) == len(union) and not union & done
    assert union <= left and len(left - union) < 3  # all that was left, but for fewer than 3 examples
    # Bit-identical within the new leg, and a second restart (on 1 worker) continues with what the 3 left.
    assert same_batches(list(train.batches(2, 2, 3, 2, legs)), list(train.batches(2, 2, 3, legs=legs))[2:])
    done |= {k for a in after for k in a[: 2 * bs]}
    last = epoch_keys(train, 2, 0, 1, legs=((2, 5), (3, 2)))
    assert len(last) == len(set(last)) and not set(last) & done
    assert set(last) == {k for a in after for k in a[2 * bs :]}


def test_parquet_val_and_test_are_read_once_each_rank_its_own_row_groups(parquet_parts):
    splits = load_data(parquet_spec(parquet_parts, batch_size=8))
    table = splits.val.table
    val_one = set(epoch_keys(splits.val))
    ranks, reads = [], []
    for rank in range(3):
        got: list = []
        reads.append(reads_of(table, lambda r=rank, g=got: g.extend(epoch_keys(splits.val, 0, r, 3))))
        ranks.append(got)
    assert sum(map(len, ranks)) == len(set().union(*map(set, ranks))) and set().union(*map(set, ranks)) == val_one
    assert [len(r) for r in ranks] == [splits.val.num_examples(3, r) for r in range(3)]
    groups = [{g for g, _ in read} for read in reads]
    assert not groups[0] & groups[1] and not groups[1] & groups[2] and len(set().union(*groups)) == len(table.groups)
    # Later passes (every validation, every epoch) come from memory.
    for rank in range(3):
        again = reads_of(table, lambda r=rank: epoch_keys(splits.val, 5, r, 3))
        assert again == [] and epoch_keys(splits.val, 0, rank, 3) == ranks[rank]
    test_once = reads_of(table, lambda: epoch_keys(splits.test))
    assert len(test_once) == len(table.groups) and reads_of(table, lambda: epoch_keys(splits.test)) == []


def test_parquet_val_too_big_to_keep_is_streamed_each_pass(parquet_parts):
    from orchestrator.data import parquet

    splits = load_data(parquet_spec(parquet_parts, batch_size=8))
    splits.val.cache_bytes = 100  # less than one row group's validation examples
    first = reads_of(splits.val.table, lambda: epoch_keys(splits.val, 0, 1, 2))
    assert first and reads_of(splits.val.table, lambda: epoch_keys(splits.val, 0, 1, 2)) == first
    assert parquet.DEFAULT_CACHE_BYTES >= 2**20


def test_read_ahead_reads_in_a_background_thread_at_most_depth_ahead():
    import threading

    from orchestrator.data.parquet import _ReadAhead

    started = []
    release = threading.Event()

    def read(g):
        started.append((g, threading.current_thread().name))
        release.wait(10)
        return g

    reader = _ReadAhead(read, list(range(10)), depth=2)
    try:
        release.set()
        for f in list(reader._pending):
            f.result(10)
        # Nothing taken yet: the first group and two ahead of it, and no more, read off the step's thread.
        assert [g for g, _ in started] == [0, 1, 2]
        assert all(name.startswith("parquet-read-ahead") for _, name in started)
        assert [reader.next() for _ in range(10)] == list(range(10))
    finally:
        reader.close()
    inline = _ReadAhead(lambda g: threading.current_thread().name, [0], depth=0)
    assert inline.next() == threading.current_thread().name


def test_parquet_on_s3_via_endpoint_url(s3_server, bucket, parquet_file):
    s3_server.client().upload_file(str(parquet_file), bucket, "ds/all.parquet")
    local = load_data(parquet_spec(parquet_file, batch_size=8), shuffle_buffer=50)
    remote = load_data(
        parquet_spec(f"s3://{bucket}/ds/", batch_size=8, endpoint_url=s3_server.endpoint), shuffle_buffer=50
    )
    assert remote.info.sizes == local.info.sizes
    assert remote.info.fingerprint["files"][0]["path"] == f"s3://{bucket}/ds/all.parquet"
    assert "etag" in remote.info.fingerprint["files"][0]
    # The same sharded plan, the same read-ahead path: rank 1 of 2 gets the same batches, and reads only its share.
    assert same_batches(list(remote.train.batches(0, 1, 2)), list(local.train.batches(0, 1, 2)))
    assert same_batches(list(remote.train.batches(0, 1, 2, start_batch=3)), list(local.train.batches(0, 1, 2))[3:])
    assert len({g for g, _ in remote.train.table.reads}) < len(remote.train.table.groups)
    with pytest.raises(BadInput, match=rf"^data\.path: s3://{bucket}/x\.parquet: no such file$"):
        check_data(parquet_spec(f"s3://{bucket}/x.parquet", endpoint_url=s3_server.endpoint))


# ----------------------------------------------------------------------------------------------
# User datasets


def write_module(tmp_path, body: str) -> str:
    name = f"userdata_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def test_user_dataset_arrays_with_options(tmp_path):
    mod = write_module(
        tmp_path,
        """
        import numpy as np
        def make(n, features):
            x = np.arange(n * features, dtype=np.float64).reshape(n, features)
            return x, np.arange(n) % 4
    """,
    )
    spec = make_spec({"name": f"{mod}:make", "options": {"n": 100, "features": 3}})
    splits = load_data(spec, base_dir=tmp_path)
    assert (splits.info.task, splits.info.input_shape, splits.info.num_classes) == ("classification", (3,), 4)
    assert sum(splits.info.sizes.values()) == 100
    x, y = next(splits.train.batches(0, 0, 1))
    assert x.dtype == torch.float32 and y.dtype == torch.int64


def test_user_dataset_torch_dataset_regression(tmp_path):
    mod = write_module(
        tmp_path,
        """
        import torch
        def make():
            return torch.utils.data.TensorDataset(torch.randn(50, 1, 4, 4), torch.randn(50))
    """,
    )
    info = check_data(make_spec({"name": f"{mod}:make"}), base_dir=tmp_path)
    assert (info.task, info.input_shape, info.is_image, info.num_classes) == ("regression", (1, 4, 4), True, None)


def test_user_dataset_errors_are_one_line_naming_data_name(tmp_path):
    with pytest.raises(BadInput, match=r"^data\.name: cannot import 'no_such_mod_x:make' from .*: ModuleNotFoundError"):
        check_data(make_spec({"name": "no_such_mod_x:make"}), base_dir=tmp_path)
    mod = write_module(
        tmp_path,
        """
        def make():
            return 42
    """,
    )
    with pytest.raises(BadInput, match=r"^data\.name: .* returned int; expected \(X, y\)"):
        check_data(make_spec({"name": f"{mod}:make"}), base_dir=tmp_path)
    with pytest.raises(BadInput, match=r"^data\.name: .* failed: TypeError"):
        check_data(make_spec({"name": f"{mod}:make", "options": {"unexpected": 1}}), base_dir=tmp_path)


def test_diabetes_script_writes_streamable_parquet(tmp_path):
    import importlib.util

    script = os.path.join(os.path.dirname(__file__), "..", "jobs", "make_diabetes_parquet.py")
    spec_ = importlib.util.spec_from_file_location("make_diabetes_parquet", script)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    out = tmp_path / "diabetes.parquet"
    assert module.main([str(out)]) == 0
    meta = pq.read_metadata(out)
    assert meta.num_rows == 442 and meta.num_row_groups > 1
    features = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    info = check_data(
        make_spec({"name": "parquet", "task": "regression", "path": str(out), "features": features, "label": "target"})
    )
    assert info.input_shape == (10,) and sum(info.sizes.values()) == 442
