"""Write scikit-learn's bundled diabetes data to Parquet in several row groups, for the parquet example jobs.

Usage: python jobs/make_diabetes_parquet.py [OUT]   (default: jobs/data/diabetes.parquet)
The data ships with scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_diabetes

# Small row groups so that even this 442-row table is read the way large data is: one group at a time.
ROW_GROUP_SIZE = 64


def write_diabetes_parquet(out: Path) -> pa.Table:
    """Write the diabetes features (sklearn's names) and the `target` column to `out`."""
    data = load_diabetes()
    columns = {name: data.data[:, i] for i, name in enumerate(data.feature_names)}
    columns["target"] = data.target
    table = pa.table(columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out, row_group_size=ROW_GROUP_SIZE)
    return table


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "data" / "diabetes.parquet"
    table = write_diabetes_parquet(out)
    groups = pq.ParquetFile(out).num_row_groups
    print(f"wrote {out}: {table.num_rows} rows, {table.num_columns} columns, {groups} row groups")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
