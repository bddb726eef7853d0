"""data.engine=ray: the train split of Parquet data read by Ray Data tasks, split across workers, behind the BatchSource interface."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from commands import run_command

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.data import load_data
from orchestrator.data.raydata import ShardSource, train_dataset
from orchestrator.loop import LoopContext, run_training
from orchestrator.rundir import RunDir
from orchestrator.runrecord import RunStatus, summary_from_checkpoints
from orchestrator.spec import build_spec

# One xdist worker for the module: its tests share one Ray in this process.
pytestmark = pytest.mark.xdist_group("ray_data")

ROOT = Path(__file__).resolve().parents[1]


def run_job(*args: str) -> dict:
    """`orchestrator run ...` as a user runs it; its JSON summary."""
    # Under pytest's own 600 s: a hang fails here, with its stacks, rather than at pytest's limit without them.
    res = run_command([sys.executable, "-m", "orchestrator", "run", *args], cwd=ROOT, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_parts(root, rows=(260, 240), row_group_size=100):
    """Rows whose feature f0 is their index / 1000 (a key), a label learnable from f1, in two files of several row groups."""
    root.mkdir()
    start = 0
    for i, n in enumerate(rows):
        index = np.arange(start, start + n)
        f1 = np.random.default_rng(i).normal(size=n)
        table = pa.table({"f0": index / 1000.0, "f1": f1, "label": (f1 > 0).astype(np.int64)})
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=row_group_size)
        start += n
    return root


def job(path, engine="ray", batch_size=8, **train):
    return build_spec(
        {
            "name": "rd",
            "data": {
                "name": "parquet",
                "task": "classification",
                "path": str(path),
                "features": ["f0", "f1"],
                "label": "label",
                "engine": engine,
            },
            "model": {"name": "mlp", "hidden": 16, "layers": 1},
            "optim": {"lr": 0.01},
            "train": {"batch_size": batch_size, "log_every_n_steps": 1000, **train},
            "early_stopping": None,
            "checkpoint": {"every_n_epochs": 1},
        }
    )


def native_train_keys(spec) -> set[float]:
    train = load_data(spec.model_copy(update={"data": spec.data.model_copy(update={"engine": "native"})})).train
    return {float(v) for x, _ in train.batches(0, 0, 1) for v in x[:, 0].tolist()}


@ray.remote(num_cpus=0)
def consume_shard(source: ShardSource, rank: int) -> dict[tuple[int, int], tuple[int, list[float]]]:
    """One worker's three epochs from its split: the batch count and the key of every row it saw, per epoch."""
    out = {}
    # Ray's split coordinator starts an epoch when every split asks for it. Epoch 0 is resumed at batch 5:
    # each worker stops its pass early, and the next epochs still start.
    for epoch, start in ((0, 5), (1, 0), (2, 0)):
        got = list(source.batches(epoch, rank, 2, start_batch=start))
        out[epoch, rank] = (len(got), [float(v) for x, _ in got for v in x[:, 0].tolist()])
    return out


@pytest.mark.slow
def test_two_workers_see_each_train_row_at_most_once_per_epoch_in_equal_shares(tmp_path, ray_local):
    spec = job(write_parts(tmp_path / "parts"))
    train_keys = native_train_keys(spec)
    size = len(train_keys)
    shards = train_dataset(spec).streaming_split(2, equal=True)
    sources = [ShardSource(s, size, 8, 0) for s in shards]
    full = sources[0].num_batches(2)
    # Each worker in its own process, as Ray Train's workers are: two threads of one process reading two
    # splits once hung in Ray Data's iterator (one split's epoch never ended).
    results = ray.get([consume_shard.remote(sources[rank], rank) for rank in (0, 1)], timeout=240)
    batches = {key: n for r in results for key, (n, _) in r.items()}
    seen = {key: keys for r in results for key, (_, keys) in r.items()}
    assert len(seen) == 6
    assert batches[0, 0] == batches[0, 1] == full - 5
    for epoch in (1, 2):
        a, b = seen[epoch, 0], seen[epoch, 1]
        # Ray's equal split: the same count on each worker (the native reader's size // world size, its
        # batch count too), no row twice, only train rows (the validation and test rows never leak in).
        assert len(a) == len(b) == size // 2
        assert batches[epoch, 0] == batches[epoch, 1] == full
        assert len(set(a) | set(b)) == len(a) + len(b) and set(a) | set(b) <= train_keys
    # A new order each epoch.
    assert seen[1, 0] != seen[2, 0]


def test_noise_is_added_by_the_ray_data_tasks(tmp_path, ray_local):
    spec = job(write_parts(tmp_path / "parts"))
    noisy = spec.model_copy(
        update={"data": spec.data.model_copy(update={"augment": spec.data.augment.model_copy(update={"noise": 0.5})})}
    )
    rows = [(x, y) for x, y in ShardSource(train_dataset(noisy), len(native_train_keys(spec)), 64, 0).batches(0, 0, 1)]
    keys = [float(v) for x, _ in rows for v in x[:, 0].tolist()]
    assert len(keys) == len(native_train_keys(spec))
    # f0 is index / 1000 before the noise: with noise of 0.5, hardly any row keeps its key.
    assert len(set(keys) & native_train_keys(spec)) < 5


class ReadOnlyShard:
    """Stands in for a worker's Ray Data iterator: read-only numpy batches (as Ray's are), collated as Ray collates
    them when the caller passes a `collate_fn`."""

    def __init__(self, rows: int):
        self.x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
        self.y = np.arange(rows, dtype=np.int64)
        for a in (self.x, self.y):
            a.flags.writeable = False

    def iter_torch_batches(self, *, batch_size, collate_fn=None, **_):
        from ray.data.collate_fn import NumpyBatchCollateFn

        assert isinstance(collate_fn, NumpyBatchCollateFn), "the shard's batches must be collated by ShardSource's own"
        for i in range(0, len(self.y), batch_size):
            yield collate_fn({"x": self.x[i : i + batch_size], "y": self.y[i : i + batch_size]})


def test_the_shards_batches_are_tensors_over_memory_of_their_own():
    # Ray's own conversion hands torch the read-only buffers and hides torch's warning with a thread-unsafe
    # catch_warnings (the warning escaped in the suite); in-place ops on such tensors would write into Ray's buffers.
    shard = ReadOnlyShard(40)
    batches = list(ShardSource(shard, 40, 8, 0, shuffle_buffer=8).batches(0, 0, 1))
    assert len(batches) == 5
    x = np.concatenate([b[0].numpy() for b in batches])
    assert np.array_equal(x, shard.x) and np.array_equal(np.concatenate([b[1].numpy() for b in batches]), shard.y)
    for bx, by in batches:
        assert not np.shares_memory(bx.numpy(), shard.x) and not np.shares_memory(by.numpy(), shard.y)
        bx.add_(1)  # the loop may change a batch in place
    assert shard.x[0, 0] == 0
    # Arrays that are already writable (a shuffle buffer's own) are not copied again.
    from orchestrator.data.raydata import _writable_tensors

    own = np.ones(3, dtype=np.float32)
    assert np.shares_memory(_writable_tensors()({"x": own})["x"].numpy(), own)


def test_ray_engine_resumes_mid_epoch_at_epoch_granularity_and_trains_like_native(tmp_path, ray_local):
    parts = write_parts(tmp_path / "parts")
    native = run_training(job(parts, "native", epochs=2), LoopContext(run_uri=str(tmp_path / "native")))
    # Stopped mid-epoch (a checkpoint at step 5 of epoch 0), then resumed: the epoch's other
    # batches come from a new pass, the run ends with the native step count, the checkpoint says so.
    run_uri = str(tmp_path / "ray")
    stopped = job(parts, epochs=2, max_steps=5)
    first = run_training(stopped, LoopContext(run_uri=run_uri, train_shard=train_dataset(stopped)))
    assert first.steps == 5 and first.epochs == 0
    said: list[str] = []
    spec = job(parts, epochs=2)
    resumed = run_training(spec, LoopContext(run_uri=run_uri, train_shard=train_dataset(spec), log=said.append))
    assert resumed.resumed_from.endswith("checkpoint_00000005")
    assert resumed.steps == native.steps and resumed.epochs == native.epochs == 2
    assert any("epoch 0 continues with batches from a new pass" in line for line in said)
    fs, root = storage.open_storage(run_uri)
    _, files = ckpt.restore_latest(fs, root)
    assert ckpt.deserialize_state(files["state.pt"])["train"]["redrawn"] == [[0, 5]]
    summary = summary_from_checkpoints(RunDir.open(run_uri), RunStatus.FINISHED).to_dict()
    assert (
        summary["redrawn"] == [[0, 5]]
        and "redrawn"
        not in summary_from_checkpoints(RunDir.open(str(tmp_path / "native")), RunStatus.FINISHED).to_dict()
    )
    # The same kind of result: the label is the sign of f1, both learn it (0.5 is chance).
    assert native.metrics["val_accuracy"] > 0.85 and resumed.metrics["val_accuracy"] > 0.85


def test_the_ray_engine_needs_its_shard(tmp_path):
    with pytest.raises(ValueError, match="no dataset shard was handed in"):
        load_data(job(write_parts(tmp_path / "parts")))


@pytest.mark.slow
def test_the_diabetes_job_on_two_workers_stopped_mid_epoch_resumes_redrawn_and_learns(tmp_path):
    """The example Parquet job through `orchestrator run`: Ray Train's streaming split to 2 workers, a checkpoint
    inside epoch 0, a resume from it."""
    common = [
        "data.engine=ray",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",  # the other CPU of this machine is Ray Data's
        "train.epochs=5",
        "optim.lr=0.01",  # learns in 5 epochs what the example's 0.003 learns in 12: each epoch is a Ray Data pass
        f"checkpoint.storage={tmp_path}",
        "--json",
    ]
    first = run_job("jobs/diabetes_parquet.yaml", *common, "train.max_steps=3")
    assert first["status"] == "finished" and first["steps"] == 3 and first["epochs"] == 0 and "redrawn" not in first
    # As a crash would leave it: the run not finished, its newest checkpoint inside epoch 0.
    record_path = tmp_path / "diabetes-parquet" / "run.json"
    record = json.loads(record_path.read_text())
    record["status"] = "failed"
    record_path.write_text(json.dumps(record))
    resumed = run_job("jobs/diabetes_parquet.yaml", *common, "--extend")  # no max_steps now: a longer horizon
    # 319 train rows: 159 a worker, 5 batches of 32 an epoch, as the native reader counts them.
    assert resumed["resumed_from"].endswith("checkpoint_00000003") and resumed["steps"] == 5 * 5
    assert resumed["epochs"] == 5 and resumed["redrawn"] == [[0, 3]]
    # It learns (0 is predicting the mean; native reaches r2 0.38 on 2 workers in 12 epochs at lr 0.003).
    assert resumed["metrics"]["val_r2"] > 0.2
