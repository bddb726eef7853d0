"""Datasets and their splits, and sharded, resumable batch loading.

Sources: scikit-learn's bundled digits, seeded synthetic data, Parquet (local or s3://, streamed by
row group) and user `module:function` hooks. torch and pyarrow are imported only where batches are
built or files read, so that a preflight of a job stays light.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
from orchestrator.errors import BadInput

if TYPE_CHECKING:
    import torch
    from orchestrator.spec import JobSpec

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
# Examples mixed together when shuffling streamed Parquet; bounds memory to about this many examples.
DEFAULT_SHUFFLE_BUFFER = 8192

# Distinct salts keep the random streams of splitting, ordering, augmentation and generation apart.
_SALT_SPLIT = 0x5B17
_SALT_ORDER = 0x0DE7
_SALT_AUGMENT = 0xA06E
_SALT_SYNTHETIC = 0x5E7D

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass
class DataInfo:
    """What a model and a loop need to know about the data, without the data."""

    task: str
    input_shape: tuple[int, ...]
    num_classes: Optional[int]
    vocab_size: Optional[int]
    is_image: bool
    sizes: dict[str, int]
    fingerprint: dict
    # False when check_data could only estimate sizes from Parquet metadata (class filter, lm tokens).
    sizes_exact: bool = True


@dataclass
class Splits:
    """The train, validation and test batch sources of a job, and what they hold."""

    train: "BatchSource"
    val: "BatchSource"
    test: "BatchSource"
    info: DataInfo


# ----------------------------------------------------------------------------------------------
# Seeds


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


# ----------------------------------------------------------------------------------------------
# Split assignment


def assign_splits(n: int, seed: int, test_split: float, val_split: float, folds: Optional[int] = None, fold: int = 0) -> np.ndarray:
    """Split code (TRAIN, VAL, TEST) per example of an in-memory dataset, with exact fractions."""
    perm = _rng(seed, _SALT_SPLIT).permutation(n)
    codes = np.full(n, TRAIN, dtype=np.int8)
    n_test = int(round(n * test_split))
    codes[perm[:n_test]] = TEST
    rest = perm[n_test:]
    # The test set depends on the seed and test_split only, so it stays fixed across folds.
    val = np.array_split(rest, folds)[fold] if folds else rest[: int(round(len(rest) * val_split))]
    codes[val] = VAL
    return codes


def hashed_splits(index: np.ndarray, seed: int, test_split: float, val_split: float, folds: Optional[int] = None, fold: int = 0) -> np.ndarray:
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


def _split_args(spec: "JobSpec") -> tuple:
    d = spec.data
    return (spec.train.seed, d.test_split, spec.validation.split, d.folds, d.fold)


# ----------------------------------------------------------------------------------------------
# Batch sources


class BatchSource(ABC):
    """The batches of one split: train is reshuffled per epoch and cut into equal rank shares; val/test are strided."""

    def __init__(self, size: int, batch_size: int, seed: int, train: bool, augment: Optional[Callable] = None):
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.train = train
        self._augment = augment

    def num_examples(self, world_size: int, rank: int = 0) -> int:
        """Examples this rank sees per epoch (train: the same on every rank)."""
        if self.train:
            return self.size // world_size
        return len(range(rank, self.size, world_size))

    def num_batches(self, world_size: int) -> int:
        """Batches per rank per epoch; for val/test, rank 0's count (a later rank may have one batch fewer)."""
        return math.ceil(self.num_examples(world_size, 0) / self.batch_size)

    def batches(self, epoch: int, rank: int, world_size: int, start_batch: int = 0) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        """Yield (x, y) batches of this rank from `start_batch` on, exactly as an uninterrupted epoch would."""
        import torch

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch {start_batch} is negative")
        bs = self.batch_size
        # Rank r's k-th example sits at global position k * world_size + r of the epoch's order.
        limit = self.num_examples(world_size, rank) * world_size if self.train else self.size
        begin = start_batch * bs * world_size
        batch_index = start_batch
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        pending_n = 0
        pos = 0
        for keys in self._key_chunks(epoch):
            lo, hi = max(begin, pos), min(limit, pos + len(keys))
            if lo < hi:
                first = lo + (rank - lo) % world_size
                chosen = keys[first - pos : hi - pos : world_size]
                if len(chosen):
                    pending.append(self._fetch(chosen))
                    pending_n += len(chosen)
                while pending_n >= bs:
                    x, y = _cat(pending)
                    yield self._finish(x[:bs], y[:bs], epoch, rank, batch_index)
                    batch_index += 1
                    pending, pending_n = ([(x[bs:], y[bs:])], pending_n - bs) if pending_n > bs else ([], 0)
            pos += len(keys)
            if pos >= limit:
                break
        if pending_n:
            x, y = _cat(pending)
            yield self._finish(x, y, epoch, rank, batch_index)

    def _finish(self, x, y, epoch: int, rank: int, batch_index: int):
        if self._augment is None:
            return x, y
        import torch

        # Its own generator, never the global RNG: a resumed epoch redraws the same augmentation.
        gen = torch.Generator().manual_seed(_seed_int(self.seed, epoch, rank, batch_index, _SALT_AUGMENT))
        return self._augment(x, gen), y

    @abstractmethod
    def _key_chunks(self, epoch: int) -> Iterator[np.ndarray]:
        """The epoch's order of example keys, in chunks; identical on every rank."""

    @abstractmethod
    def _fetch(self, keys: np.ndarray):
        """(x, y) tensors of the examples with these keys, in key order."""


def _cat(parts):
    import torch

    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class TensorSource(BatchSource):
    """A split held in memory as tensors (digits, synthetic, user data)."""

    def __init__(self, x: "torch.Tensor", y: "torch.Tensor", batch_size: int, seed: int, train: bool, augment: Optional[Callable] = None):
        super().__init__(len(x), batch_size, seed, train, augment)
        self.x = x
        self.y = y

    def _key_chunks(self, epoch: int) -> Iterator[np.ndarray]:
        if self.train:
            yield _rng(self.seed, epoch, _SALT_ORDER).permutation(self.size)
        else:
            yield np.arange(self.size)

    def _fetch(self, keys: np.ndarray):
        import torch

        idx = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64))
        return self.x[idx], self.y[idx]


class ParquetSource(BatchSource):
    """A split of Parquet data read one row group at a time; keys are (row group << 32) | example index."""

    def __init__(self, table: "_ParquetTable", split: int, batch_size: int, seed: int, train: bool,
                 augment: Optional[Callable] = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
        self.table = table
        self.split = split
        self.counts = table.counts[:, split]
        self.shuffle_buffer = shuffle_buffer
        super().__init__(int(self.counts.sum()), batch_size, seed, train, augment)

    def _keys_of(self, groups) -> np.ndarray:
        return np.concatenate([(np.int64(g) << 32) | np.arange(self.counts[g], dtype=np.int64) for g in groups])

    def _key_chunks(self, epoch: int) -> Iterator[np.ndarray]:
        groups = np.flatnonzero(self.counts)
        if not self.train:
            for g in groups:
                yield self._keys_of([g])
            return
        # A seeded permutation of row groups, then a bounded shuffle buffer: groups are gathered
        # until the buffer holds enough examples, and their examples are shuffled together.
        rng = _rng(self.seed, epoch, _SALT_ORDER)
        gathered, held = [], 0
        for g in rng.permutation(groups):
            gathered.append(g)
            held += int(self.counts[g])
            if held >= self.shuffle_buffer:
                yield rng.permutation(self._keys_of(gathered))
                gathered, held = [], 0
        if gathered:
            yield rng.permutation(self._keys_of(gathered))

    def _fetch(self, keys: np.ndarray):
        import torch

        groups = keys >> 32
        local = keys & 0xFFFFFFFF
        x = y = None
        for g in np.unique(groups):
            gx, gy = self.table.read_examples(int(g), self.split)
            if len(gx) != self.counts[g]:
                raise RuntimeError(f"{self.table.uri}: row group {g} changed while training (expected {self.counts[g]} examples, found {len(gx)})")
            if x is None:
                x = np.empty((len(keys),) + gx.shape[1:], dtype=gx.dtype)
                y = np.empty((len(keys),) + gy.shape[1:], dtype=gy.dtype)
            where = groups == g
            x[where] = gx[local[where]]
            y[where] = gy[local[where]]
        return torch.from_numpy(x), torch.from_numpy(y)


# ----------------------------------------------------------------------------------------------
# Augmentation


def _build_augment(spec: "JobSpec", info: DataInfo) -> Optional[Callable]:
    aug = spec.data.augment
    if aug.shift and not info.is_image:
        raise BadInput(f"data.augment.shift: needs image data (C, H, W); this data has inputs of shape {info.input_shape}")
    if aug.noise and info.task == "lm":
        raise BadInput("data.augment.noise: cannot add noise to token ids (lm data)")
    if not aug.shift and not aug.noise:
        return None
    shift, noise = aug.shift, aug.noise

    def augment(x, gen):
        if shift:
            x = shift_images(x, shift, gen)
        if noise:
            import torch

            x = x + noise * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return x

    return augment


def shift_images(x: "torch.Tensor", max_shift: int, gen: "torch.Generator") -> "torch.Tensor":
    """Shift each image of a (N, C, H, W) batch by its own random offset in [-max_shift, max_shift], filling with zeros."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    s = max_shift
    dy = torch.randint(-s, s + 1, (n,), generator=gen)
    dx = torch.randint(-s, s + 1, (n,), generator=gen)
    padded = F.pad(x, (s, s, s, s))
    rows = (torch.arange(h)[None, :] + s - dy[:, None])[:, None, :, None]
    cols = (torch.arange(w)[None, :] + s - dx[:, None])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(c)[None, :, None, None]
    return padded[batch, chan, rows, cols]


# ----------------------------------------------------------------------------------------------
# User hooks


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


# ----------------------------------------------------------------------------------------------
# In-memory sources


@dataclass
class _Arrays:
    x: np.ndarray
    y: np.ndarray
    task: str
    num_classes: Optional[int]
    vocab_size: Optional[int]
    fingerprint: dict = field(default_factory=dict)


def _digits() -> _Arrays:
    """scikit-learn's bundled digits, read from the CSV it ships: importing scikit-learn costs seconds, the file 50 ms."""
    import gzip
    import importlib.metadata
    import importlib.util

    package = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if package is None or package.origin is None:
        raise BadInput("data.name: digits needs scikit-learn (pip install scikit-learn)")
    with gzip.open(Path(package.origin).parent / "datasets" / "data" / "digits.csv.gz") as fh:
        table = np.loadtxt(fh, delimiter=",")
    x = (table[:, :-1] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return _Arrays(x, table[:, -1].astype(np.int64), "classification", 10, None,
                   {"source": "digits", "package": "scikit-learn", "version": importlib.metadata.version("scikit-learn")})


def _synthetic(spec: "JobSpec") -> _Arrays:
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
        return _Arrays(x, (cluster % d.num_classes).astype(np.int64), "classification", d.num_classes, None, fingerprint)
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


def _num_windows(tokens: int, seq_len: int) -> int:
    return max(0, (tokens - 1) // seq_len)


def _windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into (seq_len + 1)-token windows that overlap by one, so every token is a target."""
    count = _num_windows(len(stream), seq_len)
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx].astype(np.int64)


def _user_data(spec: "JobSpec", base_dir) -> _Arrays:
    import torch

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
            raise BadInput(f"data.name: {d.name!r} returned a dataset whose items are not (x, y) pairs: {_one_line(exc)}") from None
    else:
        raise BadInput(f"data.name: {d.name!r} returned {type(out).__name__}; expected (X, y) or a torch Dataset of (x, y) pairs")
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
            raise BadInput(f"data.name: {d.name!r} returned targets of shape {y.shape}; regression needs one value per example")
        return _Arrays(x.astype(np.float32), y.astype(np.float32).reshape(len(y)), task, None, None, fingerprint)
    if x.ndim != 2 or x.shape != y.shape:
        raise BadInput(f"data.name: {d.name!r} returned inputs {x.shape} and targets {y.shape}; lm needs two (N, seq_len) token arrays")
    top = int(max(x.max(), y.max()))
    if top >= d.vocab_size:
        raise BadInput(f"data.vocab_size: token id {top} is not below vocab_size={d.vocab_size}")
    return _Arrays(x.astype(np.int64), y.astype(np.int64), task, None, d.vocab_size, fingerprint)


_loaded: dict[str, _Arrays] = {}  # the last data set built in this process: preflight's, reused by a loop in the same process


def _in_memory(spec: "JobSpec", base_dir) -> _Arrays:
    key = repr((spec.data.model_dump(mode="json"), spec.train.seed, str(base_dir)))
    if key not in _loaded:
        name = spec.data.name
        arrays = _digits() if name == "digits" else _synthetic(spec) if name == "synthetic" else _user_data(spec, base_dir)
        _loaded.clear()
        _loaded[key] = arrays
    return _loaded[key]


def _class_mask(spec: "JobSpec", labels: np.ndarray, num_classes: Optional[int], task: str) -> Optional[np.ndarray]:
    classes = spec.data.classes
    if classes is None:
        return None
    _check_classes(classes, num_classes, task)
    return np.isin(labels, np.asarray(classes, dtype=np.int64))


def _check_classes(classes: Optional[list[int]], num_classes: Optional[int], task: str) -> None:
    if classes is None:
        return
    if task != "classification":
        raise BadInput(f"data.classes: only applies to classification, not {task}")
    bad = [c for c in classes if not 0 <= c < (num_classes or 0)]
    if bad:
        raise BadInput(f"data.classes: {bad[0]} is not a label of this data (labels are 0-{(num_classes or 1) - 1})")


def _info_from_arrays(arr: _Arrays, codes: np.ndarray) -> DataInfo:
    shape = tuple(int(s) for s in arr.x.shape[1:])
    sizes = {name: int((codes == code).sum()) for code, name in enumerate(SPLITS)}
    return DataInfo(arr.task, shape, arr.num_classes, arr.vocab_size, arr.task != "lm" and len(shape) == 3, sizes, arr.fingerprint)


def _split_arrays(spec: "JobSpec", base_dir) -> tuple[_Arrays, np.ndarray, DataInfo]:
    arr = _in_memory(spec, base_dir)
    # Split the whole dataset before filtering classes, so a class-filtered job's test examples
    # are never training examples of the unfiltered job with the same seed.
    codes = assign_splits(len(arr.x), *_split_args(spec))
    keep = _class_mask(spec, arr.y, arr.num_classes, arr.task)
    if keep is not None:
        codes = np.where(keep, codes, np.int8(-1))
    info = _info_from_arrays(arr, codes)
    _require_train(info, spec)
    _build_augment(spec, info)
    return arr, codes, info


def _require_train(info: DataInfo, spec: "JobSpec") -> None:
    if info.sizes["train"] == 0:
        raise BadInput(f"data: the train split of {spec.data.name} is empty ({info.sizes})")


# ----------------------------------------------------------------------------------------------
# Parquet


def _storage_options(endpoint_url: Optional[str]) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}


def _resolve_uri(path: str, base_dir) -> str:
    if "://" in path or Path(path).is_absolute() or base_dir is None:
        return path
    return str(Path(base_dir) / path)


def list_parquet_files(uri: str, endpoint_url: Optional[str] = None) -> tuple[Any, list[dict]]:
    """The filesystem and the sorted Parquet files (fsspec info dicts) of a file, glob or directory URI."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri, **_storage_options(endpoint_url))
        if any(ch in root for ch in "*?["):
            found = fs.glob(root, detail=True)
            files = [i for i in found.values() if i.get("type") == "file"]
        elif fs.isdir(root):
            files = [i for i in fs.find(root, detail=True).values() if i["name"].endswith((".parquet", ".parq", ".pq"))]
        elif fs.exists(root):
            files = [fs.info(root)]
        else:
            raise BadInput(f"data.path: {uri}: no such file")
    except BadInput:
        raise
    except FileNotFoundError:
        raise BadInput(f"data.path: {uri}: no such file") from None
    except Exception as exc:  # credentials, endpoint, permissions: one line naming the path
        raise BadInput(f"data.path: {uri}: {_one_line(exc)}") from None
    if not files:
        raise BadInput(f"data.path: {uri}: no parquet files match")
    return fs, sorted(files, key=lambda i: i["name"])


def _display(fs, name: str) -> str:
    """A file's name as a user wrote it: a plain path locally, with its protocol elsewhere."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return name if protocol in ("file", "local") else fs.unstrip_protocol(name)


def _file_fingerprint(fs, info: dict) -> dict:
    entry: dict[str, Any] = {"path": _display(fs, info["name"]), "size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        entry["etag"] = str(etag).strip('"')
    mtime = info.get("mtime", info.get("LastModified"))
    if mtime is not None:
        entry["mtime"] = mtime if isinstance(mtime, (int, float)) else str(mtime)
    return entry


class _ParquetTable:
    """The row groups of a Parquet dataset, their split counts, and reading one row group's examples."""

    def __init__(self, spec: "JobSpec", base_dir, scan: bool):
        import pyarrow.parquet as pq

        d = spec.data
        self.uri = _resolve_uri(d.path, base_dir)
        self.task = d.task
        self.features = list(d.features)
        self.label = d.label
        self.tokens = d.tokens
        self.seq_len = d.seq_len
        self.vocab_size = d.vocab_size
        self.split_args = _split_args(spec)
        self.columns = [d.tokens] if d.task == "lm" else self.features + [d.label]
        self.fs, infos = list_parquet_files(self.uri, d.endpoint_url)
        self.files = [i["name"] for i in infos]
        self.fingerprint = {"source": "parquet", "files": [_file_fingerprint(self.fs, i) for i in infos]}
        self.metas = []
        for name in self.files:
            try:
                with self.fs.open(name, "rb") as f:
                    self.metas.append(pq.read_metadata(f))
            except Exception as exc:  # not Parquet, truncated, unreadable
                raise BadInput(f"data.path: {_display(self.fs, name)}: not a readable parquet file ({_one_line(exc)})") from None
            self._check_schema(name, self.metas[-1])
        groups = [(fi, gi, m.row_group(gi).num_rows) for fi, m in enumerate(self.metas) for gi in range(m.num_row_groups)]
        self.groups = np.array([(fi, gi) for fi, gi, _ in groups], dtype=np.int64).reshape(-1, 2)
        rows = np.array([n for _, _, n in groups], dtype=np.int64)
        self.row_start = np.concatenate([[0], np.cumsum(rows)])[:-1]
        self.rows = rows
        self.num_classes = self._num_classes() if self.task == "classification" else None
        self.classes = d.classes
        _check_classes(self.classes, self.num_classes, self.task)
        self.exact = scan or (self.task != "lm" and self.classes is None)
        self.counts = self._count(scan)

    def _check_schema(self, name: str, meta) -> None:
        import pyarrow as pa

        schema = meta.schema.to_arrow_schema()
        where = _display(self.fs, name)
        fields = [("data.tokens", self.tokens)] if self.task == "lm" else [("data.features", c) for c in self.features] + [("data.label", self.label)]
        for field_name, col in fields:
            if col not in schema.names:
                shown = ", ".join(schema.names[:20]) + (", ..." if len(schema.names) > 20 else "")
                raise BadInput(f"{field_name}: column {col!r} not in parquet schema of {where} (columns: {shown})")
            t = schema.field(col).type
            if field_name == "data.tokens":
                ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
                want = "a list of integer token ids"
            elif field_name == "data.label" and self.task == "classification":
                ok, want = pa.types.is_integer(t), "integer class labels"
            else:
                ok, want = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t), "numeric"
            if not ok:
                raise BadInput(f"{field_name}: column {col!r} of {where} is {t}, not {want}")

    def _column_index(self, meta, name: str) -> list[int]:
        return [j for j in range(meta.num_columns) if meta.schema.column(j).path == name or meta.schema.column(j).path.startswith(name + ".")]

    def _num_classes(self) -> int:
        import pyarrow.compute as pc

        top, low = -1, 0
        for g, (fi, gi) in enumerate(self.groups):
            meta = self.metas[fi]
            stats = meta.row_group(gi).column(self._column_index(meta, self.label)[0]).statistics
            if stats is not None and stats.has_min_max:
                top, low = max(top, int(stats.max)), min(low, int(stats.min))
            else:
                # No statistics in the footer: read this row group's label column (one column only).
                col = self._read(g, [self.label]).column(0)
                mm = pc.min_max(col)
                if mm["max"].is_valid:
                    top, low = max(top, mm["max"].as_py()), min(low, mm["min"].as_py())
        if low < 0:
            raise BadInput(f"data.label: column {self.label!r} has a negative label ({low}); classes must be 0..K-1")
        return max(top + 1, 2)

    def _codes(self, g: int) -> np.ndarray:
        return hashed_splits(self.row_start[g] + np.arange(self.rows[g], dtype=np.int64), *self.split_args)

    def _count(self, scan: bool) -> np.ndarray:
        counts = np.zeros((len(self.groups), 3), dtype=np.int64)
        for g in range(len(self.groups)):
            codes = self._codes(g)
            if self.task == "lm":
                if scan:
                    table = self._read(g, [self.tokens])
                    counts[g] = [_num_windows(len(self._lm_tokens(codes, s, table)), self.seq_len) for s in (TRAIN, VAL, TEST)]
                else:
                    counts[g] = self._estimate_windows(g, codes)
                continue
            if self.classes is not None and scan:
                labels = self._read(g, [self.label]).column(0).to_numpy()
                codes = np.where(np.isin(labels, self.classes), codes, np.int8(-1))
            counts[g] = np.bincount(codes[codes >= 0], minlength=3)[:3]
        return counts

    def _estimate_windows(self, g: int, codes: np.ndarray) -> list[int]:
        fi, gi = self.groups[g]
        meta = self.metas[fi]
        values = sum(meta.row_group(gi).column(j).num_values for j in self._column_index(meta, self.tokens))
        share = np.bincount(codes, minlength=3)[:3] / max(1, len(codes))
        return [_num_windows(int(values * s), self.seq_len) for s in share]

    def _read(self, g: int, columns: list[str]):
        import pyarrow.parquet as pq

        fi, gi = (int(v) for v in self.groups[g])
        with self.fs.open(self.files[fi], "rb") as f:
            return pq.ParquetFile(f, metadata=self.metas[fi]).read_row_group(gi, columns=columns)

    def _lm_tokens(self, codes: np.ndarray, split: int, table) -> np.ndarray:
        """The tokens of one split of one row group: its rows' token lists, concatenated."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = table.column(self.tokens)
        rows = col.filter(pa.array(codes == split))
        flat = pc.list_flatten(rows).to_numpy() if len(rows) else np.zeros(0, dtype=np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.vocab_size):
            bad = int(flat.max()) if flat.max() >= self.vocab_size else int(flat.min())
            raise BadInput(f"data.vocab_size: token id {bad} in column {self.tokens!r} is outside 0..{self.vocab_size - 1}")
        return flat

    def read_examples(self, g: int, split: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) arrays of one split of one row group, in row order."""
        codes = self._codes(g)
        table = self._read(g, self.columns)
        if self.task == "lm":
            w = _windows(self._lm_tokens(codes, split, table), self.seq_len)
            return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])
        mask = codes == split
        labels = table.column(self.label).to_numpy()
        if self.classes is not None:
            mask &= np.isin(labels, self.classes)
        x = np.stack([np.asarray(table.column(c).to_numpy(), dtype=np.float32) for c in self.features], axis=1)[mask]
        y = labels[mask].astype(np.int64 if self.task == "classification" else np.float32)
        return x, y

    def info(self) -> DataInfo:
        sizes = {name: int(self.counts[:, code].sum()) for code, name in enumerate(SPLITS)}
        shape = (self.seq_len,) if self.task == "lm" else (len(self.features),)
        return DataInfo(self.task, shape, self.num_classes, self.vocab_size if self.task == "lm" else None,
                        False, sizes, self.fingerprint, self.exact)


# ----------------------------------------------------------------------------------------------
# Entry points


def load_data(spec: "JobSpec", base_dir: str | Path | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> Splits:
    """Build the train, validation and test batch sources of a job (base_dir: the job file's directory)."""
    import torch

    bs, seed = spec.train.batch_size, spec.train.seed
    if spec.data.name == "parquet":
        table = _ParquetTable(spec, base_dir, scan=True)
        info = table.info()
        _require_train(info, spec)
        augment = _build_augment(spec, info)
        return Splits(
            train=ParquetSource(table, TRAIN, bs, seed, True, augment, shuffle_buffer),
            val=ParquetSource(table, VAL, bs, seed, False),
            test=ParquetSource(table, TEST, bs, seed, False),
            info=info,
        )
    arr, codes, info = _split_arrays(spec, base_dir)
    x, y = torch.from_numpy(np.ascontiguousarray(arr.x)), torch.from_numpy(np.ascontiguousarray(arr.y))

    def source(code: int, train: bool) -> TensorSource:
        idx = torch.from_numpy(np.flatnonzero(codes == code))
        return TensorSource(x[idx], y[idx], bs, seed, train, _build_augment(spec, info) if train else None)

    return Splits(source(TRAIN, True), source(VAL, False), source(TEST, False), info)


def check_data(spec: "JobSpec", base_dir: str | Path | None = None) -> DataInfo:
    """Preflight the data: paths, columns, hooks and splits, reading Parquet metadata only; raises BadInput."""
    if spec.data.name == "parquet":
        table = _ParquetTable(spec, base_dir, scan=False)
        info = table.info()
        if info.sizes_exact:
            _require_train(info, spec)
        _build_augment(spec, info)
        return info
    return _split_arrays(spec, base_dir)[2]
