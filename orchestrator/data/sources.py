"""Batch sources: sharded, resumable batches of one split, held in memory or streamed, and their augmentation."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.data.info import DataInfo
from orchestrator.data.splits import _SALT_AUGMENT, _SALT_ORDER, _rng, _seed_int
from orchestrator.errors import BadInput

if TYPE_CHECKING:
    import torch

    from orchestrator.spec import JobSpec


# The earlier legs of an epoch: (world size, batches each rank took) before each elastic restart.
Legs = tuple[tuple[int, int], ...]


class BatchSource(ABC):
    """The batches of one split: train is reshuffled per epoch and cut into equal rank shares; val/test are strided."""

    # Whether `batches(start_batch=...)` continues an epoch exactly where it stopped; when False, a
    # resume takes the rest of the epoch from a new pass over it (the checkpoint records that).
    exact_resume = True

    def __init__(self, size: int, batch_size: int, seed: int, train: bool, augment: Callable | None = None):
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.train = train
        self._augment = augment

    def num_examples(self, world_size: int, rank: int = 0, legs: Legs = ()) -> int:
        """Examples this rank sees per epoch (train: the same on every rank; after `legs`, what is left of the epoch)."""
        if self.train:
            return (self.size - self._consumed(legs)) // world_size
        return len(range(rank, self.size, world_size))

    def num_batches(self, world_size: int, legs: Legs = ()) -> int:
        """Batches per rank per epoch (after `legs`, what is left of it); for val/test, rank 0's count (a later rank may have one batch fewer)."""
        return math.ceil(self.num_examples(world_size, 0, legs) / self.batch_size)

    def _consumed(self, legs: Legs) -> int:
        # A leg's ranks took equal, full batches from the front of the (strided) epoch order: a prefix of it.
        return min(self.size, sum(w * b * self.batch_size for w, b in legs))

    @abstractmethod
    def batches(
        self, epoch: int, rank: int, world_size: int, start_batch: int = 0, legs: Legs = ()
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches of this rank from `start_batch` on, exactly as an uninterrupted epoch would.

        `legs`: (world size, batches each rank took) of the earlier world sizes of this epoch (an elastic
        restart); the batches are then those of what they left, each example once.
        """

    def _finish(self, x, y, epoch: int, rank: int, batch_index: int):
        if self._augment is None:
            return x, y
        import torch  # imported here to keep start-up light

        # Its own generator, never the global RNG: a resumed epoch redraws the same augmentation.
        gen = torch.Generator().manual_seed(_seed_int(self.seed, epoch, rank, batch_index, _SALT_AUGMENT))
        return self._augment(x, gen), y


def _check_position(rank: int, world_size: int, start_batch: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch {start_batch} is negative")


def _cat(parts):
    import torch  # imported here to keep start-up light

    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class TensorSource(BatchSource):
    """A split held in memory as tensors (digits, synthetic, user data)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, train: bool, augment: Callable | None = None
    ):
        super().__init__(len(x), batch_size, seed, train, augment)
        self.x = x
        self.y = y

    def batches(
        self, epoch: int, rank: int, world_size: int, start_batch: int = 0, legs: Legs = ()
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One global order of the epoch, identical on every rank, dealt out strided: rank r takes every world_size-th."""

        _check_position(rank, world_size, start_batch)
        bs = self.batch_size
        # Rank r's k-th example sits at global position offset + k * world_size + r of the epoch's order.
        offset = self._consumed(legs) if self.train else 0
        limit = offset + self.num_examples(world_size, rank, legs) * world_size if self.train else self.size
        begin = offset + start_batch * bs * world_size
        batch_index = start_batch
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        pending_n = 0
        pos = 0
        for keys in self._key_chunks(epoch):
            lo, hi = max(begin, pos), min(limit, pos + len(keys))
            if lo < hi:
                first = lo + (rank - lo + offset) % world_size
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

    def _key_chunks(self, epoch: int) -> Iterator[np.ndarray]:
        """The epoch's order of example indices, in chunks."""
        if self.train:
            yield _rng(self.seed, epoch, _SALT_ORDER).permutation(self.size)
        else:
            yield np.arange(self.size)

    def _fetch(self, keys: np.ndarray):
        """(x, y) of the examples at these indices, in their order."""
        import torch  # imported here to keep start-up light

        idx = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64))
        return self.x[idx], self.y[idx]


# ----------------------------------------------------------------------------------------------
# Augmentation


def _build_augment(spec: JobSpec, info: DataInfo) -> Callable | None:
    aug = spec.data.augment
    if aug.shift and not info.is_image:
        raise BadInput(
            f"data.augment.shift: needs image data (C, H, W); this data has inputs of shape {info.input_shape}"
        )
    if aug.noise and info.task == "lm":
        raise BadInput("data.augment.noise: cannot add noise to token ids (lm data)")
    if not aug.shift and not aug.noise:
        return None
    shift, noise = aug.shift, aug.noise

    def augment(x, gen):
        if shift:
            x = shift_images(x, shift, gen)
        if noise:
            import torch  # imported here to keep start-up light

            x = x + noise * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return x

    return augment


def shift_images(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image of a (N, C, H, W) batch by its own random offset in [-max_shift, max_shift], filling with zeros."""
    import torch  # imported here to keep start-up light
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
