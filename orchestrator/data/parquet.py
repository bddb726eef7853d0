"""Parquet data, local or s3://: listing files, reading metadata and schemas, and streaming one row group at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.data.info import DataInfo, _check_classes, _num_windows, _windows
from orchestrator.data.sources import BatchSource
from orchestrator.data.splits import _SALT_ORDER, SPLITS, TEST, TRAIN, VAL, _rng, _split_args, hashed_splits
from orchestrator.errors import BadInput
from orchestrator.hooks import _one_line

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

# Examples mixed together when shuffling streamed Parquet; bounds memory to about this many examples.
DEFAULT_SHUFFLE_BUFFER = 8192


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
        import pyarrow.parquet as pq  # imported here to keep start-up light

        fi, gi = (int(v) for v in self.groups[g])
        with self.fs.open(self.files[fi], "rb") as f:
            return pq.ParquetFile(f, metadata=self.metas[fi]).read_row_group(gi, columns=columns)

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
        labels = table.column(self.label).to_numpy()
        if self.classes is not None:
            mask &= np.isin(labels, self.classes)
        x = np.stack([np.asarray(table.column(c).to_numpy(), dtype=np.float32) for c in self.features], axis=1)[mask]
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


class ParquetSource(BatchSource):
    """A split of Parquet data read one row group at a time; keys are (row group << 32) | example index."""

    def __init__(
        self,
        table: _ParquetTable,
        split: int,
        batch_size: int,
        seed: int,
        train: bool,
        augment: Callable | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ):
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
        import torch  # imported here to keep start-up light

        groups = keys >> 32
        local = keys & 0xFFFFFFFF
        x = y = None
        for g in np.unique(groups):
            gx, gy = self.table.read_examples(int(g), self.split)
            if len(gx) != self.counts[g]:
                raise RuntimeError(
                    f"{self.table.uri}: row group {g} changed while training (expected {self.counts[g]} examples, found {len(gx)})"
                )
            if x is None:
                x = np.empty((len(keys),) + gx.shape[1:], dtype=gx.dtype)
                y = np.empty((len(keys),) + gy.shape[1:], dtype=gy.dtype)
            where = groups == g
            x[where] = gx[local[where]]
            y[where] = gy[local[where]]
        return torch.from_numpy(x), torch.from_numpy(y)
