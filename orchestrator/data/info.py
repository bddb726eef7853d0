"""What a data set holds, and the rules every source keeps: class filters, a non-empty train split, lm token windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.errors import BadInput

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec


@dataclass
class DataInfo:
    """What a model and a loop need to know about the data, without the data."""

    task: str
    input_shape: tuple[int, ...]
    num_classes: int | None
    vocab_size: int | None
    is_image: bool
    sizes: dict[str, int]
    fingerprint: dict
    # False when check_data could only estimate sizes from Parquet metadata (class filter, lm tokens).
    sizes_exact: bool = True


def _require_train(info: DataInfo, spec: JobSpec) -> None:
    if info.sizes["train"] == 0:
        raise BadInput(f"data: the train split of {spec.data.name} is empty ({info.sizes})")


def _check_classes(classes: list[int] | None, num_classes: int | None, task: str) -> None:
    if classes is None:
        return
    if task != "classification":
        raise BadInput(f"data.classes: only applies to classification, not {task}")
    bad = [c for c in classes if not 0 <= c < (num_classes or 0)]
    if bad:
        raise BadInput(f"data.classes: {bad[0]} is not a label of this data (labels are 0-{(num_classes or 1) - 1})")


def _num_windows(tokens: int, seq_len: int) -> int:
    return max(0, (tokens - 1) // seq_len)


def _windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into (seq_len + 1)-token windows that overlap by one, so every token is a target."""
    count = _num_windows(len(stream), seq_len)
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx].astype(np.int64)
