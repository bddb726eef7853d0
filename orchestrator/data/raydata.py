"""data.engine=ray: the train split of Parquet data read and decoded by Ray Data, split across the workers by Ray Train.

Driver side, `train_dataset`: a lazy Ray Data dataset over the row groups. Each epoch Ray Data puts
them in a new seeded order and its tasks, on any node's CPUs, read one row group each and keep its
train rows (the same hashed split as the native reader: validation and test rows never leak into
training). Ray Train's DataConfig `streaming_split`s it across the worker group (equal=True: every
worker gets the same number of rows, the dataset truncated by fewer than world size rows).

Worker side, `ShardSource`: the BatchSource the loop iterates, built on the worker's shard (anything
with `iter_torch_batches`: Ray Data's DataIterator, or a Dataset). The loop knows no Ray.

Not read with `ray.data.read_parquet`: the split of a row is a hash of its index in the data set,
and read_parquet's rows carry no index; reading by row group keeps the split identical to native.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.data.parquet import DEFAULT_SHUFFLE_BUFFER, _ParquetTable
from orchestrator.data.sources import BatchSource, Legs, _build_augment, _check_position
from orchestrator.data.splits import _SALT_ORDER, TRAIN, _seed_int

if TYPE_CHECKING:
    import torch

    from orchestrator.spec import JobSpec


def train_dataset(spec: JobSpec, base_dir: str | Path | None = None):
    """The train split of a Parquet job as a lazy Ray Data dataset of rows {"x", "y"} (needs a running Ray)."""
    import ray.data  # imported here: only the ray engine needs Ray Data

    table = _ParquetTable(spec, base_dir, scan=False)
    augment = _build_augment(spec, table.info())
    # Row groups known (from the footers) to hold no train rows are not scheduled at all.
    groups = [g for g in range(len(table.groups)) if not table.exact or table.counts[g, TRAIN] > 0]
    read = _row_group_reader(table, augment)
    dataset = (
        ray.data.from_items([{"group": g} for g in groups], override_num_blocks=len(groups))
        # A new order of row groups each epoch (each execution), drawn from the job's seed.
        .randomize_block_order(seed=ray.data.RandomSeedConfig(seed=spec.train.seed, reseed_after_execution=True))
        # One row group per call: a task reads and decodes it wherever Ray Data has CPUs.
        .map_batches(read, batch_size=1, batch_format="numpy")
    )
    # This dataset's own settings (Ray Data copied the context at creation): its progress bars,
    # drawn by Ray's split coordinator, would break through the run's console each epoch.
    dataset.context.enable_progress_bars = False
    dataset.context.print_on_execution_start = False
    return dataset


def _row_group_reader(table: _ParquetTable, augment: Callable | None) -> Callable[[dict], dict]:
    def read(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [table.read_examples(int(g), TRAIN) for g in batch["group"]]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if augment is not None and len(x):
            import torch  # imported here: in the Ray Data task that augments

            # Fresh entropy per call: which task reads which row group in which epoch is Ray Data's
            # choice, so there is no position to seed from (the engine's order is not reproducible).
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**63))
            x = augment(torch.from_numpy(x), gen).numpy()
        return {"x": x, "y": y}

    return read


def _writable_tensors():
    """Ray Data's batches as tensors over memory of their own (a `NumpyBatchCollateFn`, run in Ray's fetch threads).

    The arrays Ray Data hands over are read-only (Arrow buffers, the object store). Ray's own conversion gives torch
    those buffers and hides torch's warning about it with `warnings.catch_warnings`, which is not thread-safe: its
    fetch threads restore each other's filters, and the warning escaped (an error under `-W error`; seen in the
    suite). A tensor over read-only memory is also a trap for any in-place op in a user's loop. A copy of a batch
    costs little next to decoding it, and it is made in the fetch threads, off the training thread.
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    class WritableTensors(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            import torch

            return {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in batch.items()}

    return WritableTensors()


class ShardSource(BatchSource):
    """The train split as this worker's shard of a Ray Data dataset: each epoch one pass over the shard.

    `size` is the train split's example count; every worker gets size // world_size of them per epoch
    (Ray's equal split), the batch counts of the native reader. Resume is at epoch granularity: the
    rest of an interrupted epoch is taken from a new pass over it (`exact_resume` is False).
    """

    exact_resume = False

    def __init__(self, shard: Any, size: int, batch_size: int, seed: int, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
        super().__init__(size, batch_size, seed, True)
        self.shard = shard
        self.shuffle_buffer = shuffle_buffer

    def batches(
        self, epoch: int, rank: int, world_size: int, start_batch: int = 0, legs: Legs = ()
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from a new pass over the shard; after a resume (`start_batch`, `legs`), the
        number of batches the epoch had left, taken from the front of that pass."""
        _check_position(rank, world_size, start_batch)
        left = self.num_batches(world_size, legs) - start_batch
        if left <= 0:
            return
        batches = iter(
            self.shard.iter_torch_batches(
                batch_size=self.batch_size,
                device="cpu",  # as every source: the loop moves batches to its device
                local_shuffle_buffer_size=min(self.shuffle_buffer, max(self.size // world_size, 1)),
                local_shuffle_seed=_seed_int(self.seed, epoch, rank, _SALT_ORDER),
                collate_fn=_writable_tensors(),
            )
        )
        try:
            # islice: nothing past the epoch's last batch is pulled from Ray Data.
            for batch in itertools.islice(batches, left):
                yield batch["x"], batch["y"]
        finally:
            # Ends this split's epoch at once (Ray's coordinator waits for every split to finish one).
            close = getattr(batches, "close", None)
            if close is not None:
                close()
