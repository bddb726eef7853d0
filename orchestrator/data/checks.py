"""What makes Parquet data unfit to train, named by file, row group and column: missing values, values that are
not finite, pages that do not decode.

Missing values show in a file's footer (its statistics), so preflight finds them; a NaN or an inf does not (the
statistics leave them out), so the rank that reads a row group finds them there, before the step sees them.
Either way it is a `DataError`: the data's fault, which a restart would only meet again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.errors import BadInput, DataError


def check_footer_nulls(meta, where: str, fields: list[tuple[str, str]], column_index) -> None:
    """BadInput at the first column chunk whose statistics count missing values (`fields`: (field name, column))."""
    for gi in range(meta.num_row_groups):
        for field_name, col in fields:
            for j in column_index(meta, col):
                stats = meta.row_group(gi).column(j).statistics
                if stats is not None and stats.has_null_count and stats.null_count:
                    raise BadInput(
                        f"{field_name}: column {col!r} of {where} has {stats.null_count} missing value(s) in row group "
                        f"{gi}; every example needs one (drop or fill those rows)"
                    )


def column_values(table, col: str, field_name: str, where: str, row_group: int, finite: bool) -> np.ndarray:
    """A column of a row group as numbers: DataError when a value is missing, or not finite where `finite`."""
    column = table.column(col)
    if column.null_count:
        raise DataError(
            f"{field_name}: column {col!r} of {where} has {column.null_count} missing value(s) in row group {row_group}"
        )
    values = column.to_numpy()
    if finite and values.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise DataError(
                f"{field_name}: column {col!r} of {where} has {bad} value(s) that are NaN or infinite in row group "
                f"{row_group}; a step on them makes the loss NaN"
            )
    return values


def read_row_group(fs, path: str, meta, row_group: int, columns: list[str], where: str):
    """One row group's columns as a pyarrow table; DataError naming the column when what was read does not decode.

    No read-ahead cache in the file (s3fs's default fetches up to 50 MB past each read: the rest of the file,
    for one row group); pre_buffer coalesces the row group's column chunks into few ranged requests, so what
    moves is what is decoded.
    """
    import pyarrow.parquet as pq  # imported here to keep start-up light

    def read(cols: list[str]):
        with fs.open(path, "rb", cache_type="none") as raw:
            watched = _WatchedFile(raw)
            try:
                return pq.ParquetFile(watched, metadata=meta, pre_buffer=True).read_row_group(row_group, columns=cols)
            except Exception as exc:
                if watched.failed is not None:
                    raise  # the storage's: retried, or reported, as any storage failure
                raise _Undecodable(exc) from None

    try:
        return read(columns)
    except _Undecodable as exc:
        bad = next((c for c in columns if _fails(read, c)), None)
        text = str(exc.args[0]).strip().splitlines()
        column = f", column {bad!r}" if bad is not None else ""
        raise DataError(
            f"data.path: {where}: row group {row_group}{column} cannot be decoded ({text[0] if text else 'corrupt'})"
        ) from None


class _Undecodable(Exception):
    pass


def _fails(read, column: str) -> bool:
    try:
        read([column])
    except _Undecodable:
        return True
    return False


class _WatchedFile:
    """The file pyarrow reads through, remembering whether a read failed: a failure to read is the storage's, a
    failure to decode what was read the data's (pyarrow raises OSError for both)."""

    def __init__(self, file: Any):
        self._file = file
        self.failed: BaseException | None = None

    def read(self, *args: Any) -> Any:
        try:
            return self._file.read(*args)
        except BaseException as exc:
            self.failed = exc
            raise

    def readinto(self, *args: Any) -> Any:
        try:
            return self._file.readinto(*args)
        except BaseException as exc:
            self.failed = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)
