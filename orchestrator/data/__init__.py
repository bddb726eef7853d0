"""Datasets and their splits, and sharded, resumable batch loading.

Sources: scikit-learn's bundled digits, seeded synthetic data, Parquet (local or s3://, streamed by
row group, each rank reading only the row groups dealt to it) and user `module:function` hooks. torch and pyarrow are imported only where batches are
built or files read, so that a preflight of a job stays light.

What lives where:
- info.py: DataInfo, and the rules every source keeps (class filters, a non-empty train split, lm token windows);
- splits.py: the seeded random streams and split assignment (assign_splits in memory, hashed_splits per streamed row);
- sources.py: BatchSource (sharded, resumable batches of one split), TensorSource, augmentation (shift_images);
- memory.py: the in-memory data sets (digits, synthetic, user hooks), their cache, class filter and split;
- parquet.py: Parquet files, their metadata and schemas, and ParquetSource (the per-epoch deal of row
  groups to ranks, the read-ahead thread, the kept validation/test shares);
- raydata.py: data.engine=ray, the train split read by Ray Data tasks (train_dataset) and a worker's shard of it (ShardSource);
- here: Splits and the two entry points, load_data and check_data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.data.info import DataInfo, _require_train
from orchestrator.data.memory import _split_arrays
from orchestrator.data.parquet import DEFAULT_SHUFFLE_BUFFER, ParquetSource, _ParquetTable
from orchestrator.data.raydata import ShardSource
from orchestrator.data.sources import BatchSource, TensorSource, _build_augment, shift_images
from orchestrator.data.splits import TEST, TRAIN, VAL, assign_splits, hashed_splits

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

__all__ = [
    "DataInfo",
    "Splits",
    "load_data",
    "check_data",
    "BatchSource",
    "shift_images",
    "assign_splits",
    "hashed_splits",
]


@dataclass
class Splits:
    """The train, validation and test batch sources of a job, and what they hold."""

    train: BatchSource
    val: BatchSource
    test: BatchSource
    info: DataInfo


def load_data(
    spec: JobSpec,
    base_dir: str | Path | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    train_shard: Any = None,
) -> Splits:
    """Build the train, validation and test batch sources of a job (base_dir: the job file's directory).

    `train_shard`: with data.engine=ray, this worker's shard of `raydata.train_dataset` (handed in by
    whoever runs the loop); the train split is then read from it, validation and test natively.
    """
    import torch  # imported here to keep start-up light

    bs, seed = spec.train.batch_size, spec.train.seed
    if spec.data.engine == "ray" and train_shard is None:
        raise ValueError("data.engine=ray: the train split comes from Ray Data; no dataset shard was handed in")
    if spec.data.name == "parquet":
        table = _ParquetTable(spec, base_dir, scan=True)
        info = table.info()
        _require_train(info, spec)
        augment = _build_augment(spec, info)
        if train_shard is not None:
            train: BatchSource = ShardSource(train_shard, info.sizes["train"], bs, seed, shuffle_buffer)
        else:
            train = ParquetSource(table, TRAIN, bs, seed, True, augment, shuffle_buffer)
        return Splits(
            train=train,
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


def check_data(spec: JobSpec, base_dir: str | Path | None = None) -> DataInfo:
    """Preflight the data: paths, columns, hooks and splits, reading Parquet metadata only; raises BadInput."""
    if spec.data.name == "parquet":
        table = _ParquetTable(spec, base_dir, scan=False)
        info = table.info()
        if info.sizes_exact:
            _require_train(info, spec)
        _build_augment(spec, info)
        return info
    return _split_arrays(spec, base_dir)[2]
