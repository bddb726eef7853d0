"""Parquet data, local or s3://: listing files, reading metadata and schemas, and streaming one row group at a time."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.data.checks import check_footer_nulls, column_values, read_row_group
from orchestrator.data.info import DataInfo, _check_classes, _num_windows, _windows
from orchestrator.data.sources import BatchSource, Legs, _cat, _check_position
from orchestrator.data.splits import _SALT_ORDER, SPLITS, TEST, TRAIN, VAL, _rng, _split_args, hashed_splits
from orchestrator.errors import BadInput
from orchestrator.hooks import _one_line

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

# Examples mixed together when shuffling streamed Parquet; bounds memory to about this many examples.
DEFAULT_SHUFFLE_BUFFER = 8192
# Row groups a background thread reads ahead of the one the step uses: overlaps download and decode with compute.
DEFAULT_READ_AHEAD = 2
# Decoded validation/test examples a rank keeps after its first pass, so later passes read nothing.
# Bounded so that a rank's memory does not grow with the data set: a larger share is streamed
# again by each pass (each rank reading only its own row groups).
DEFAULT_CACHE_BYTES = 64 * 2**20


def _storage_options(endpoint_url: str | None) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}


def _resolve_uri(path: str, base_dir) -> str:
    if "://" in path or Path(path).is_absolute() or base_dir is None:
        return path
    return str(Path(base_dir) / path)


def list_parquet_files(uri: str, endpoint_url: str | None = None) -> tuple[Any, list[dict]]:
    """The filesystem and the sorted Parquet files (fsspec info dicts) of a file, glob or directory URI."""
    import fsspec  # imported here to keep start-up light

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
        # A FIFO, socket or device ("other" locally): reading one would wait for a writer for ever.
        odd = next((i for i in files if i.get("type") not in ("file", None)), None)
        if odd is not None:
            raise BadInput(f"data.path: {_display(fs, odd['name'])}: not a regular file (a FIFO, socket or device)")
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

    def __init__(self, spec: JobSpec, base_dir, scan: bool):
        import pyarrow.parquet as pq  # imported here to keep start-up light

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
        # Every row group read from storage, with its stored (compressed) bytes of the columns read:
        # what benchmarks and tests count to check each rank reads only its share.
        self.reads: list[tuple[int, int]] = []
        self._reads_lock = threading.Lock()
        self.fs, infos = list_parquet_files(self.uri, d.endpoint_url)
        self.files = [i["name"] for i in infos]
        self.fingerprint = {"source": "parquet", "files": [_file_fingerprint(self.fs, i) for i in infos]}
        self.metas = []
        for name in self.files:
            try:
                with self.fs.open(name, "rb") as f:
                    self.metas.append(pq.read_metadata(f))
            except Exception as exc:  # not Parquet, truncated, unreadable
                raise BadInput(
                    f"data.path: {_display(self.fs, name)}: not a readable parquet file ({_one_line(exc)})"
                ) from None
            self._check_schema(name, self.metas[-1])
            fields = [("data.tokens", self.tokens)] if self.task == "lm" else [("data.label", self.label)]
            fields += [("data.features", c) for c in self.features if self.task != "lm"]
            check_footer_nulls(self.metas[-1], _display(self.fs, name), fields, self._column_index)
        groups = [
            (fi, gi, m.row_group(gi).num_rows) for fi, m in enumerate(self.metas) for gi in range(m.num_row_groups)
        ]
        self.groups = np.array([(fi, gi) for fi, gi, _ in groups], dtype=np.int64).reshape(-1, 2)
        rows = np.array([n for _, _, n in groups], dtype=np.int64)
        self.row_start = np.concatenate([[0], np.cumsum(rows)])[:-1]
        self.rows = rows
        self.num_classes = self._num_classes() if self.task == "classification" else None
        self.classes = d.classes
        _check_classes(self.classes, self.num_classes, self.task)
        self.exact = scan or (self.task != "lm" and self.classes is None)
        self.counts = self._count(scan)

    def __getstate__(self) -> dict:
        # Pickled into Ray Data's read tasks (data.engine=ray): without the lock, and each task counts its own reads.
        state = dict(self.__dict__)
        del state["_reads_lock"]
        state["reads"] = []
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reads_lock = threading.Lock()

    def _check_schema(self, name: str, meta) -> None:
        import pyarrow as pa  # imported here to keep start-up light

        schema = meta.schema.to_arrow_schema()
        where = _display(self.fs, name)
        fields = (
            [("data.tokens", self.tokens)]
            if self.task == "lm"
            else [("data.features", c) for c in self.features] + [("data.label", self.label)]
        )
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
        return [
            j
            for j in range(meta.num_columns)
            if meta.schema.column(j).path == name or meta.schema.column(j).path.startswith(name + ".")
        ]

    def _num_classes(self) -> int:
        import pyarrow.compute as pc  # imported here to keep start-up light

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
                    counts[g] = [
                        _num_windows(len(self._lm_tokens(codes, s, table)), self.seq_len) for s in (TRAIN, VAL, TEST)
                    ]
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
        fi, gi = (int(v) for v in self.groups[g])
        table = read_row_group(self.fs, self.files[fi], self.metas[fi], gi, columns, _display(self.fs, self.files[fi]))
        meta = self.metas[fi]
        stored = sum(
            meta.row_group(gi).column(j).total_compressed_size for c in columns for j in self._column_index(meta, c)
        )
        with self._reads_lock:  # the read-ahead thread and the step's thread both read
            self.reads.append((g, stored))
        return table

    def _lm_tokens(self, codes: np.ndarray, split: int, table) -> np.ndarray:
        """The tokens of one split of one row group: its rows' token lists, concatenated."""
        import pyarrow as pa  # imported here to keep start-up light
        import pyarrow.compute as pc

        col = table.column(self.tokens)
        rows = col.filter(pa.array(codes == split))
        flat = pc.list_flatten(rows).to_numpy() if len(rows) else np.zeros(0, dtype=np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.vocab_size):
            bad = int(flat.max()) if flat.max() >= self.vocab_size else int(flat.min())
            raise BadInput(
                f"data.vocab_size: token id {bad} in column {self.tokens!r} is outside 0..{self.vocab_size - 1}"
            )
        return flat

    def read_examples(self, g: int, split: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) arrays of one split of one row group, in row order."""
        codes = self._codes(g)
        table = self._read(g, self.columns)
        if self.task == "lm":
            w = _windows(self._lm_tokens(codes, split, table), self.seq_len)
            return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])
        mask = codes == split
        fi, gi = (int(v) for v in self.groups[g])
        where = _display(self.fs, self.files[fi])
        labels = column_values(table, self.label, "data.label", where, gi, finite=self.task == "regression")
        if self.classes is not None:
            mask &= np.isin(labels, self.classes)
        x = np.stack(
            [np.asarray(column_values(table, c, "data.features", where, gi, True), np.float32) for c in self.features],
            axis=1,
        )[mask]
        y = labels[mask].astype(np.int64 if self.task == "classification" else np.float32)
        return x, y

    def info(self) -> DataInfo:
        sizes = {name: int(self.counts[:, code].sum()) for code, name in enumerate(SPLITS)}
        shape = (self.seq_len,) if self.task == "lm" else (len(self.features),)
        return DataInfo(
            self.task,
            shape,
            self.num_classes,
            self.vocab_size if self.task == "lm" else None,
            False,
            sizes,
            self.fingerprint,
            self.exact,
        )


class _ReadAhead:
    """Row groups read by a background thread, `depth` ahead of the one being used, in the order asked for.

    One reader thread: reads of one rank go to storage one at a time, in the order the epoch needs
    them, while the step computes; at most depth + 1 decoded row groups wait in memory.
    """

    def __init__(self, read: Callable[[int], Any], groups: list[int], depth: int):
        self._read = read
        self._todo = iter(groups)
        self._depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="parquet-read-ahead") if depth > 0 else None
        self._pending: deque[Future] = deque()
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and len(self._pending) <= self._depth:
            g = next(self._todo, None)
            if g is None:
                return
            self._pending.append(self._pool.submit(self._read, g))

    def next(self) -> Any:
        """The next row group's examples (read now when there is no read-ahead)."""
        if self._pool is None:
            return self._read(next(self._todo))
        result = self._pending.popleft().result()
        self._fill()
        return result

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)


# A piece of a row group's examples: (row group, lo, hi) for the range lo..hi of its example index,
# or, after an elastic restart, the explicit keys left of it (row group, 0, 0, keys).
Piece = tuple[int, int, int, "np.ndarray | None"]


def _piece_len(p: Piece) -> int:
    return len(p[3]) if p[3] is not None else p[2] - p[1]


def _piece_keys(p: Piece) -> np.ndarray:
    g, lo, hi, keys = p
    return keys if keys is not None else (np.int64(g) << 32) | np.arange(lo, hi, dtype=np.int64)


def _cut(p: Piece, a: int, b: int) -> Piece:
    g, lo, _, keys = p
    return (g, lo + a, lo + b, None) if keys is None else (g, 0, 0, keys[a:b])


def _deal(pieces: list[Piece], world_size: int, rng: np.random.Generator) -> list[list[Piece]]:
    """The pieces in a seeded order, cut into `world_size` runs of exactly total // world_size examples.

    Every rank gets the same count; the last total % world_size examples of the order are left out
    (as DistributedSampler's drop_last does), different ones each epoch. A row group at a cut is
    split between two neighbouring ranks: each reads it, so a rank reads its share plus at most
    two row groups (the first and last rank, one).
    """
    total = sum(_piece_len(p) for p in pieces)
    each = total // world_size
    shares: list[list[Piece]] = [[] for _ in range(world_size)]
    if each == 0:
        return shares
    rank, room = 0, each
    for i in rng.permutation(len(pieces)):
        p, at, n = pieces[i], 0, _piece_len(pieces[i])
        while at < n and rank < world_size:
            take = min(room, n - at)
            shares[rank].append(_cut(p, at, at + take))
            at, room = at + take, room - take
            if room == 0:
                rank, room = rank + 1, each
        if rank == world_size:
            break
    return shares


def _by_group(keys: np.ndarray) -> list[Piece]:
    """Keys cut into one piece per row group, each keeping the order it had."""
    if not len(keys):
        return []
    groups = keys >> 32
    order = np.argsort(groups, kind="stable")
    cuts = np.flatnonzero(np.diff(groups[order])) + 1
    return [(int(k[0] >> 32), 0, 0, k) for k in np.split(keys[order], cuts)]


def _batched(parts: Iterator[tuple[Any, Any]], batch_size: int) -> Iterator[tuple[Any, Any]]:
    """Batches of `batch_size` (the last one shorter) cut across a stream of (x, y) tensor pairs."""
    pending: list[tuple[Any, Any]] = []
    pending_n = 0
    for x, y in parts:
        pending.append((x, y))
        pending_n += len(x)
        while pending_n >= batch_size:
            x, y = _cat(pending)
            yield x[:batch_size], y[:batch_size]
            pending, pending_n = (
                ([(x[batch_size:], y[batch_size:])], pending_n - batch_size) if pending_n > batch_size else ([], 0)
            )
    if pending_n:
        yield _cat(pending)


class ParquetSource(BatchSource):
    """A split of Parquet data, each rank reading only the row groups dealt to it; keys are (row group << 32) | example index.

    Train: every epoch, the row groups are put in a seeded order and cut into equal runs, one per
    rank (`_deal`); each rank shuffles its run through a bounded buffer. A background thread reads
    `read_ahead` row groups ahead of the step. Val/test: each rank takes a contiguous run of row
    groups, the same for every pass, kept in memory after its first pass when it fits in
    `cache_bytes`, else streamed again.
    """

    def __init__(
        self,
        table: _ParquetTable,
        split: int,
        batch_size: int,
        seed: int,
        train: bool,
        augment: Callable | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        read_ahead: int = DEFAULT_READ_AHEAD,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.table = table
        self.split = split
        self.counts = table.counts[:, split]
        self.shuffle_buffer = shuffle_buffer
        self.read_ahead = read_ahead
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        super().__init__(int(self.counts.sum()), batch_size, seed, train, augment)

    # -- the plan: which examples each rank takes, in which order ------------------------------

    def _shares(self, epoch: int, world_size: int, legs: Legs) -> list[list[Piece]]:
        """Each rank's pieces for what is left of the epoch after `legs`."""
        pieces: list[Piece] = [(int(g), 0, int(self.counts[g]), None) for g in np.flatnonzero(self.counts)]
        for leg, (w, done) in enumerate(legs):
            # What an earlier world size left: each rank's run after the batches it took.
            tails = [
                np.concatenate(
                    [keys.keys() for _, keys in self._chunks(share, epoch, leg, rank)] or [np.zeros(0, np.int64)]
                )[done * self.batch_size :]
                for rank, share in enumerate(self._deal_leg(pieces, epoch, leg, w))
            ]
            pieces = _by_group(np.concatenate(tails))
        return self._deal_leg(pieces, epoch, len(legs), world_size)

    def _deal_leg(self, pieces: list[Piece], epoch: int, leg: int, world_size: int) -> list[list[Piece]]:
        return _deal(pieces, world_size, _rng(self.seed, epoch, leg, _SALT_ORDER))

    def _chunks(self, share: list[Piece], epoch: int, leg: int, rank: int) -> Iterator[tuple[list[int], np.ndarray]]:
        """A rank's run as shuffled chunks: (its row groups, its keys); pieces are gathered until
        the buffer holds enough examples, and their examples are shuffled together."""
        gathered: list[Piece] = []
        held = 0
        for p in share:
            gathered.append(p)
            held += _piece_len(p)
            if held >= self.shuffle_buffer:
                yield self._chunk(gathered, epoch, leg, rank)
                gathered, held = [], 0
        if gathered:
            yield self._chunk(gathered, epoch, leg, rank)

    def _chunk(self, pieces: list[Piece], epoch: int, leg: int, rank: int) -> tuple[list[int], _LazyKeys]:
        # Each chunk its own seed (its first row group and range): a resumed epoch skips chunks without drawing their orders.
        g, lo, _, keys = pieces[0]
        first = int(keys[0]) if keys is not None else (g << 32) | lo
        rng = _rng(self.seed, epoch, leg, rank, first, _SALT_ORDER)
        return sorted({q[0] for q in pieces}), _LazyKeys(pieces, rng)

    # -- counts ---------------------------------------------------------------------------------

    def num_examples(self, world_size: int, rank: int = 0, legs: Legs = ()) -> int:
        if not self.train:
            return int(self.counts[self._eval_share(rank, world_size)].sum())
        left = self.size
        for w, done in legs:  # each rank of a leg had an equal run, and took `done` full batches of it
            left = w * max(0, left // w - done * self.batch_size)
        return left // world_size

    # -- reading --------------------------------------------------------------------------------

    def batches(
        self, epoch: int, rank: int, world_size: int, start_batch: int = 0, legs: Legs = ()
    ) -> Iterator[tuple[Any, Any]]:
        _check_position(rank, world_size, start_batch)
        if not self.train:
            yield from _batched(self._eval_parts(rank, world_size), self.batch_size)
            return
        share = self._shares(epoch, world_size, legs)[rank]
        skip = start_batch * self.batch_size
        chunks = []
        for groups, keys in self._chunks(share, epoch, len(legs), rank):
            if not chunks and skip >= len(keys):  # chunks before the resume point are not read at all
                skip -= len(keys)
                continue
            chunks.append((groups, keys))
        reader = _ReadAhead(self._read_group, [g for groups, _ in chunks for g in groups], self.read_ahead)

        def parts() -> Iterator[tuple[Any, Any]]:
            nonlocal skip
            for groups, keys in chunks:
                read = {g: reader.next() for g in groups}
                yield _gather(read, keys.keys()[skip:])
                skip = 0

        try:
            for index, (x, y) in enumerate(_batched(parts(), self.batch_size), start=start_batch):
                yield self._finish(x, y, epoch, rank, index)
        finally:
            reader.close()

    def _eval_share(self, rank: int, world_size: int) -> np.ndarray:
        """A contiguous run of the row groups holding this split, cut at about equal example counts."""
        groups = np.flatnonzero(self.counts)
        starts = np.concatenate([[0], np.cumsum(self.counts[groups])])[:-1]
        owner = np.minimum(starts * world_size // max(1, self.size), world_size - 1)
        return groups[owner == rank]

    def _eval_parts(self, rank: int, world_size: int) -> Iterator[tuple[Any, Any]]:
        import torch  # imported here to keep start-up light

        cached = self._cache.get((rank, world_size))
        if cached is not None:
            for x, y in cached:
                yield torch.from_numpy(x), torch.from_numpy(y)
            return
        groups = [int(g) for g in self._eval_share(rank, world_size)]
        share = int(self.counts[groups].sum())
        reader = _ReadAhead(self._read_group, groups, self.read_ahead)
        kept: list[tuple[np.ndarray, np.ndarray]] | None = []
        try:
            for _ in groups:
                x, y = reader.next()
                if kept is not None and not kept and (x.nbytes + y.nbytes) * share > self.cache_bytes * len(x):
                    # Decided on the first row group, before holding anything: too big to keep,
                    # every pass streams this share from storage.
                    kept = None
                if kept is not None:
                    kept.append((x, y))
                yield torch.from_numpy(x), torch.from_numpy(y)
        finally:
            reader.close()
        if kept is not None:  # a whole pass: a pass left early keeps nothing
            self._cache[(rank, world_size)] = kept

    def _read_group(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.table.read_examples(g, self.split)
        if len(x) != self.counts[g]:
            raise RuntimeError(
                f"{self.table.uri}: row group {g} changed while training (expected {self.counts[g]} examples, found {len(x)})"
            )
        return x, y


class _LazyKeys:
    """A chunk's keys, shuffled when first asked for: a resumed epoch skips chunks without building them."""

    def __init__(self, pieces: list[Piece], rng: np.random.Generator):
        self.pieces = pieces
        self.rng = rng
        self._keys: np.ndarray | None = None

    def __len__(self) -> int:
        return sum(_piece_len(p) for p in self.pieces)

    def keys(self) -> np.ndarray:
        if self._keys is None:
            self._keys = self.rng.permutation(np.concatenate([_piece_keys(p) for p in self.pieces]))
        return self._keys


def _gather(read: dict[int, tuple[np.ndarray, np.ndarray]], keys: np.ndarray):
    """(x, y) tensors of these keys, in key order, from row groups already read."""
    import torch  # imported here to keep start-up light

    groups = keys >> 32
    local = keys & 0xFFFFFFFF
    first = next(iter(read.values()))
    x = np.empty((len(keys),) + first[0].shape[1:], dtype=first[0].dtype)
    y = np.empty((len(keys),) + first[1].shape[1:], dtype=first[1].dtype)
    for g, (gx, gy) in read.items():
        where = groups == g
        x[where] = gx[local[where]]
        y[where] = gy[local[where]]
    return torch.from_numpy(x), torch.from_numpy(y)
