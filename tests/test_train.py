"""The training loop driven in-process (no Ray): determinism, exact resume, early stopping, accumulation."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.loop import LoopContext, run_training
from orchestrator.spec import build_spec

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "name": "t",
    "model": {"name": "mlp", "hidden": 32, "layers": 1, "dropout": 0.2},
    "data": {"name": "digits", "augment": {"noise": 0.05}},
    "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
    "schedule": {"name": "warmup_cosine", "warmup_steps": 5},
    "train": {"epochs": 3, "batch_size": 64, "seed": 3, "log_every_n_steps": 5},
    "checkpoint": {"every_n_steps": 7, "keep_last": 10},
}


def spec_with(tmp_path, *overrides, raw=SMALL):
    return build_spec(raw, [f"checkpoint.storage={tmp_path}", *overrides])


def final_weights(run_uri):
    fs, root = storage.open_storage(run_uri)
    info, files = ckpt.restore_latest(fs, root)
    return ckpt.deserialize_weights(files[ckpt.WEIGHTS]), info


class Crash(Exception):
    pass


def test_same_seed_same_metrics_and_weights(tmp_path):
    a = run_training(spec_with(tmp_path), LoopContext(run_uri=str(tmp_path / "a")))
    b = run_training(spec_with(tmp_path), LoopContext(run_uri=str(tmp_path / "b")))
    assert a.metrics == b.metrics and a.steps == b.steps == 3 * 21
    wa, _ = final_weights(str(tmp_path / "a"))
    wb, _ = final_weights(str(tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = run_training(spec_with(tmp_path, "train.seed=4"), LoopContext(run_uri=str(tmp_path / "c")))
    assert c.metrics != a.metrics


@pytest.mark.parametrize("asynchronous", [True, False])
def test_crash_and_rerun_ends_with_identical_weights(tmp_path, asynchronous):
    spec = spec_with(tmp_path, f"checkpoint.async={str(asynchronous).lower()}", "validation.every_n_steps=10")
    run_training(spec, LoopContext(run_uri=str(tmp_path / "straight")))

    reports = []

    def crash_on_third_report(metrics):
        reports.append(metrics["step"])
        if len(reports) == 3:  # step 30, after checkpoints at 7, 14, 21, 28
            raise Crash()

    with pytest.raises(Crash):
        run_training(spec, LoopContext(run_uri=str(tmp_path / "crashed"), report=crash_on_third_report))
    _, info = final_weights(str(tmp_path / "crashed"))
    assert (
        info.step == 28
    )  # mid-epoch (21 steps an epoch): the data position matters  # a mid-epoch checkpoint survived the crash

    resumed = run_training(spec, LoopContext(run_uri=str(tmp_path / "crashed")))
    assert resumed.resumed_from.endswith(f"checkpoint_{info.step:08d}")
    straight, _ = final_weights(str(tmp_path / "straight"))
    again, _ = final_weights(str(tmp_path / "crashed"))
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)

    # metrics.jsonl continues the history with no step twice.
    lines = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    keys = [(e["split"], e["step"]) for e in lines]
    assert len(keys) == len(set(keys))
    straight_lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["split"], e["step"]) for e in straight_lines] == keys


def test_checkpoint_holds_everything_to_continue(tmp_path):
    run_training(spec_with(tmp_path, "train.epochs=1"), LoopContext(run_uri=str(tmp_path / "r")))
    fs, root = storage.open_storage(str(tmp_path / "r"))
    info, files = ckpt.restore_latest(fs, root)
    assert set(files) == {"model.safetensors", "state.pt", "rng.pt", "job.yaml"}
    state = ckpt.deserialize_state(files["state.pt"])
    assert set(state) == {"optimizer", "schedule", "scaler", "train"}
    assert state["train"]["step"] == 21 and state["train"]["epoch"] == 1 and state["train"]["batch"] == 0
    assert len(ckpt.deserialize_state(files["rng.pt"])) == 1
    # The weights are plain safetensors, readable without this package.
    weights = load_file(str(Path(info.path) / "model.safetensors"))
    assert any(k.endswith("weight") for k in weights)
    assert [c.step for c in ckpt.list_checkpoints(fs, root)] == [7, 14, 21]


def test_finished_run_does_not_train_again(tmp_path):
    spec = spec_with(tmp_path, "train.epochs=1")
    first = run_training(spec, LoopContext(run_uri=str(tmp_path / "r")))
    second = run_training(spec, LoopContext(run_uri=str(tmp_path / "r")))
    assert second.steps == first.steps and second.train_s < first.train_s


def test_keep_last_retention(tmp_path):
    run_training(
        spec_with(tmp_path, "checkpoint.keep_last=2", "checkpoint.keep_best=0"),
        LoopContext(run_uri=str(tmp_path / "r")),
    )
    fs, root = storage.open_storage(str(tmp_path / "r"))
    assert [c.step for c in ckpt.list_checkpoints(fs, root)] == [56, 63]


def test_the_best_checkpoint_is_kept_and_tested_by_default(tmp_path):
    # min_delta 0.5: the first validation (step 21) stays the best; keep_last=1 alone would delete it.
    spec = spec_with(
        tmp_path,
        "train.epochs=30",
        "early_stopping.metric=val_accuracy",
        "early_stopping.mode=max",
        "early_stopping.patience=2",
        "early_stopping.min_delta=0.5",
        "checkpoint.keep_last=1",
    )
    out = run_training(spec, LoopContext(run_uri=str(tmp_path / "r")))
    fs, root = storage.open_storage(str(tmp_path / "r"))
    assert [c.step for c in ckpt.list_checkpoints(fs, root)] == [21, 63]
    assert out.best.step == 21 and out.test.step == 21 and out.test.checkpoint.endswith("checkpoint_00000021")


def test_early_stopping(tmp_path):
    spec = spec_with(
        tmp_path,
        "train.epochs=30",
        "optim.lr=0.3",
        "early_stopping.metric=val_accuracy",
        "early_stopping.mode=max",
        "early_stopping.patience=2",
        "early_stopping.min_delta=0.5",
    )
    out = run_training(spec, LoopContext(run_uri=str(tmp_path / "r")))
    # min_delta 0.5 means nothing after the first validation counts as better: stop after 1 + 2 validations.
    assert out.stopped_early and out.steps == 3 * 21 and out.best.step == 21


def test_grad_accumulation_matches_a_larger_batch(tmp_path):
    raw = {
        **SMALL,
        "model": {"name": "mlp", "hidden": 16, "layers": 1},
        "data": {"name": "digits"},
        "optim": {"name": "sgd", "lr": 0.1},
        "schedule": {"name": "constant"},
    }
    big = run_training(
        build_spec(raw, [f"checkpoint.storage={tmp_path}", "train.batch_size=64", "train.epochs=1"]),
        LoopContext(run_uri=str(tmp_path / "big")),
    )
    acc = run_training(
        build_spec(
            raw, [f"checkpoint.storage={tmp_path}", "train.batch_size=32", "train.grad_accum_steps=2", "train.epochs=1"]
        ),
        LoopContext(run_uri=str(tmp_path / "acc")),
    )
    assert big.steps == acc.steps == 21
    wb, _ = final_weights(str(tmp_path / "big"))
    wa, _ = final_weights(str(tmp_path / "acc"))
    for k in wb:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    out = run_training(
        spec_with(tmp_path, f"train.precision={precision}", "train.epochs=2", "train.clip_grad_norm=1.0"),
        LoopContext(run_uri=str(tmp_path / precision)),
    )
    assert out.metrics["val_accuracy"] > 0.7


def test_transfer_learning_with_frozen_layers(tmp_path):
    wide = {**SMALL, "model": {"name": "mlp", "hidden": 64, "layers": 1}}
    source = build_spec(
        {**wide, "data": {"name": "digits", "classes": [0, 1, 2, 3, 4]}},
        [f"checkpoint.storage={tmp_path}", "train.epochs=2"],
    )
    run_training(source, LoopContext(run_uri=str(tmp_path / "source")))
    src_weights, _ = final_weights(str(tmp_path / "source"))
    frozen = [k for k in src_weights if k.startswith("net.1.")] or [sorted(src_weights)[0]]
    pattern = frozen[0].rsplit(".", 1)[0] + ".*"
    target = build_spec(
        {**wide, "data": {"name": "digits", "classes": [5, 6, 7, 8, 9]}},
        [
            f"checkpoint.storage={tmp_path}",
            "train.epochs=4",
            "optim.lr=0.05",
            f"model.init_from={tmp_path / 'source'}",
            f"model.freeze=['{pattern}']",
        ],
    )
    out = run_training(target, LoopContext(run_uri=str(tmp_path / "target")))
    tgt_weights, _ = final_weights(str(tmp_path / "target"))
    matched = [k for k in src_weights if k.startswith(pattern[:-1])]
    assert matched and all(torch.equal(src_weights[k], tgt_weights[k]) for k in matched)
    assert any(not torch.equal(src_weights[k], tgt_weights[k]) for k in src_weights if k not in matched)
    assert out.metrics["val_accuracy"] > 0.8


def test_freeze_pattern_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="model.freeze: no parameter matches"):
        run_training(spec_with(tmp_path, "model.freeze=['nothing.*']"), LoopContext(run_uri=str(tmp_path / "r")))


def test_s3_checkpoints_and_resume(tmp_path, bucket):
    spec = build_spec(SMALL, [f"checkpoint.storage=s3://{bucket}/runs", "train.epochs=1"])
    run_uri = f"s3://{bucket}/runs/t"
    out = run_training(spec, LoopContext(run_uri=run_uri))
    assert out.checkpoint == f"{run_uri}/checkpoint_00000021"
    fs, root = storage.open_storage(run_uri)
    assert [c.step for c in ckpt.list_checkpoints(fs, root)] == [7, 14, 21]
    assert fs.cat_file(f"{root}/metrics.jsonl").count(b"\n") >= 4
    again = run_training(
        build_spec(SMALL, [f"checkpoint.storage=s3://{bucket}/runs", "train.epochs=2"]), LoopContext(run_uri=run_uri)
    )
    assert again.resumed_from == f"{run_uri}/checkpoint_00000021" and again.steps == 42


def _ddp_rank(rank, world, port, run_uri, out_dir, extra=()):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        spec = build_spec(SMALL, [f"checkpoint.storage={out_dir}", "train.epochs=1", *extra])
        summary = run_training(spec, LoopContext(run_uri=run_uri, rank=rank, world_size=world, log=lambda m: None))
        torch.save(
            {"summary_steps": summary.steps, "metrics": summary.metrics}, os.path.join(out_dir, f"rank{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_agree(tmp_path):
    from ports import free_port

    run_uri = str(tmp_path / "ddp")
    mp.start_processes(
        _ddp_rank, args=(2, free_port(), run_uri, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (
        r0["summary_steps"] == r1["summary_steps"] == 11
    )  # 1294 examples: 647 a rank, 11 batches of 64 takes half the data per epoch
    assert r0["metrics"] == r1["metrics"]
    fs, root = storage.open_storage(run_uri)
    _, files = ckpt.restore_latest(fs, root)
    assert len(ckpt.deserialize_state(files["rng.pt"])) == 2  # both ranks' RNG states


def test_elastic_resume_on_fewer_workers_keeps_the_epoch_position(tmp_path):
    from ports import free_port

    run_uri = str(tmp_path / "elastic")
    mp.start_processes(
        _ddp_rank,
        args=(2, free_port(), run_uri, str(tmp_path), ["train.max_steps=5"]),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    # The two ranks consumed 5 batches each: 10 batches of the 21 a single worker takes per epoch.
    out = run_training(spec_with(tmp_path, "train.epochs=1"), LoopContext(run_uri=run_uri))
    assert out.resumed_from.endswith("checkpoint_00000005")
    assert out.steps == 5 + (21 - 10)


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path):
    raw = {**SMALL, "model": {"name": "mlp", "hidden": 32, "layers": 1}, "data": {"name": "digits"}}
    eager = run_training(
        build_spec(raw, [f"checkpoint.storage={tmp_path}", "train.epochs=1"]),
        LoopContext(run_uri=str(tmp_path / "eager")),
    )
    compiled = run_training(
        build_spec(raw, [f"checkpoint.storage={tmp_path}", "train.epochs=1", "train.compile=true"]),
        LoopContext(run_uri=str(tmp_path / "compiled")),
    )
    assert compiled.steps == eager.steps
    assert compiled.metrics["val_loss"] == pytest.approx(eager.metrics["val_loss"], rel=1e-3)
    # The checkpoint holds the module's own names, not torch.compile's wrapper prefix.
    assert not any(k.startswith("_orig_mod") for k in final_weights(str(tmp_path / "compiled"))[0])


@pytest.mark.slow  # two spawned DDP ranks and a resume (~45 s on 2 cores); the data layer's tests cover the plan
def test_elastic_resume_of_parquet_data_continues_with_what_the_two_ranks_left(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ports import free_port

    from orchestrator.data import load_data

    index = np.arange(1500)
    table = pa.table({"f0": np.sin(index), "f1": np.cos(index * 0.7), "label": (index % 3).astype(np.int64)})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=100)
    data = [
        "data.name=parquet",
        "data.task=classification",
        f"data.path={tmp_path / 'd.parquet'}",
        "data.features=[f0, f1]",
        "data.label=label",
    ]
    run_uri = str(tmp_path / "elastic-parquet")
    mp.start_processes(
        _ddp_rank,
        args=(2, free_port(), run_uri, str(tmp_path), [*data, "train.max_steps=5"]),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    # One worker takes what the two left of the epoch (each had its own run of row groups), and no more.
    out = run_training(spec_with(tmp_path, "train.epochs=1", *data), LoopContext(run_uri=run_uri))
    train = load_data(spec_with(tmp_path, *data)).train
    left = train.num_batches(1, ((2, 5),))
    assert left == -(-2 * (train.size // 2 - 5 * 64) // 64)  # ceil: the examples the two ranks had not taken
    assert out.resumed_from.endswith("checkpoint_00000005") and out.steps == 5 + left
