"""Seeds and split assignment: the seeded random streams, and which split (train, val, test) each example belongs to."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from orchestrator.errors import BadInput

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2

# Distinct salts keep the random streams of splitting, ordering, augmentation and generation apart.
_SALT_SPLIT = 0x5B17
_SALT_ORDER = 0x0DE7
_SALT_AUGMENT = 0xA06E
_SALT_SYNTHETIC = 0x5E7D

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _seed_words(*parts: int) -> list[int]:
    # SeedSequence takes non-negative words; train.seed may be negative.
    return [int(p) % 2**64 for p in parts]


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(_seed_words(*parts)))


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence(_seed_words(*parts)).generate_state(1, dtype=np.uint64)[0])


def _uniform_hash(index: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) value per global row index (splitmix64), the same on every machine."""
    salt = np.uint64(_seed_int(seed, _SALT_SPLIT))
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + salt
        z = z * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def assign_splits(
    n: int,
    seed: int,
    test_split: float,
    val_split: float,
    folds: int | None = None,
    fold: int = 0,
    labels: np.ndarray | None = None,
    counted: np.ndarray | None = None,
) -> np.ndarray:
    """Split code (TRAIN, VAL, TEST) per example of an in-memory dataset, with exact fractions.

    With `folds`, fold `fold` of the non-test examples is the validation set; with `labels` the folds are
    stratified (`stratified_folds`), and `counted` (a mask: the examples the job keeps) names whose classes
    must each have `folds` examples outside the test split.
    """
    perm = _rng(seed, _SALT_SPLIT).permutation(n)
    codes = np.full(n, TRAIN, dtype=np.int8)
    n_test = int(round(n * test_split))
    codes[perm[:n_test]] = TEST
    rest = perm[n_test:]
    # The test set depends on the seed and test_split only, so it stays fixed across folds (and stratified or not).
    if folds and labels is not None:
        val = rest[stratified_folds(rest, labels, folds, counted) == fold]
    elif folds:
        val = np.array_split(rest, folds)[fold]
    else:
        val = rest[: int(round(len(rest) * val_split))]
    codes[val] = VAL
    return codes


def stratified_folds(pool: np.ndarray, labels: np.ndarray, folds: int, counted: np.ndarray | None = None) -> np.ndarray:
    """The fold of each example of `pool` (indices in seeded random order): every class dealt over the folds in turn.

    The pool is sorted by class (stably: the random order stays within a class) and numbered 0..k-1 over and over,
    so each fold holds floor or ceil of n_c/k examples of class c, and the folds differ in size by one at most.
    BadInput when a class has fewer examples than folds (some fold would hold none of it).
    """
    pool_labels = labels[pool]
    kept = pool_labels if counted is None else pool_labels[counted[pool]]
    classes, counts = np.unique(kept, return_counts=True)
    if len(classes) and counts.min() < folds:
        small = int(np.argmin(counts))
        raise BadInput(
            f"data.folds: {folds} is more than the smallest class has examples outside the test split "
            f"(class {classes[small]}: {counts[small]}); use at most {counts[small]} folds"
        )
    order = np.argsort(pool_labels, kind="stable")
    out = np.empty(len(pool), dtype=np.int64)
    out[order] = np.arange(len(pool)) % folds
    return out


def hashed_splits(
    index: np.ndarray, seed: int, test_split: float, val_split: float, folds: int | None = None, fold: int = 0
) -> np.ndarray:
    """Split code per global row index of streamed data: computable for any row without reading others."""
    u = _uniform_hash(index, seed)
    codes = np.full(len(index), TRAIN, dtype=np.int8)
    is_test = u < test_split
    v = (u - test_split) / (1.0 - test_split)
    if folds:
        is_val = np.minimum((v * folds).astype(np.int64), folds - 1) == fold
    else:
        is_val = v < val_split
    codes[is_val] = VAL
    codes[is_test] = TEST
    return codes


def _split_args(spec: JobSpec) -> tuple:
    d = spec.data
    return (spec.train.seed, d.test_split, spec.validation.split, d.folds, d.fold)
