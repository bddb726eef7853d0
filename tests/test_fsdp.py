"""scaling.strategy=fsdp: FSDP2 on CPU/gloo ranks started as real processes, sharded checkpoints, resume and transfer.

The reference for the sharded runs is one process taking the same global batch: two ranks of 64
examples (strided from one epoch order) see what one process of 128 sees, and both average the
gradient over them, so parameters agree to float rounding (tolerance 1e-6; measured ~3e-8).
"""

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from commands import run_command
from ports import free_port

from orchestrator import checkpoint as ckpt
from orchestrator import storage, weights
from orchestrator.loop import LoopContext, run_training
from orchestrator.spec import build_spec

ROOT = Path(__file__).resolve().parents[1]
# No dropout or augmentation: the ranks' own RNG streams would make them differ from the reference.
RAW = {
    "name": "f",
    "model": {"name": "mlp", "hidden": 32, "layers": 1, "freeze": ["net.1.bias"]},
    "data": {"name": "digits"},
    "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
    "schedule": {"name": "constant", "warmup_steps": 2},  # the LR of a step, whatever max_steps says
    "train": {"epochs": 2, "batch_size": 64, "seed": 3, "grad_accum_steps": 2, "clip_grad_norm": 0.5},
    "checkpoint": {"every_n_steps": 3, "every_n_epochs": None, "keep_last": 10},
}
FSDP = ["scaling.strategy=fsdp"]
# 1294 training examples: 11 micro-batches of 64 a rank (of 128 for one process), 6 steps an epoch, 12 in all.
STEPS = 12
ATOL = 1e-6


def spec_of(storage_root, *overrides):
    return build_spec(RAW, [f"checkpoint.storage={storage_root}", *overrides])


def _rank(rank, world, port, run_uri, storage_root, out_dir, overrides, kill_at=None):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if kill_at is not None and rank == 1:
        _die_while_writing(kill_at)
    lines = []
    try:
        out = run_training(
            spec_of(storage_root, *overrides),
            LoopContext(run_uri=run_uri, rank=rank, world_size=world, log=lines.append),
        )
        with open(os.path.join(out_dir, f"result{rank}.json"), "w") as fh:
            json.dump({"steps": out.steps, "metrics": out.metrics, "resumed_from": out.resumed_from, "log": lines}, fh)
    finally:
        dist.destroy_process_group()


def _die_while_writing(step: int) -> None:
    """This rank is SIGKILLed halfway through writing its shard of the checkpoint at `step`."""
    from orchestrator import sharded_checkpoint

    write = sharded_checkpoint.storage.write_bytes

    def write_then_die(fs, path, data, transfers=None):
        if f"checkpoint_{step:08d}/shard_" in path:
            write(fs, path, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        write(fs, path, data, transfers)

    sharded_checkpoint.storage.write_bytes = write_then_die


def train_ranks(world, run_uri, storage_root, *overrides, kill_at=None, out_dir=None):
    """`world` ranks of the job as spawned processes; each writes result<rank>.json to `out_dir` (default: the run)."""
    mp.start_processes(
        _rank,
        args=(world, free_port(), run_uri, storage_root, out_dir or run_uri, [*FSDP, *overrides], kill_at),
        nprocs=world,
        join=True,
        start_method="spawn",
    )


def checkpoints(run_uri):
    fs, root = storage.open_storage(run_uri)
    return fs, ckpt.list_checkpoints(fs, root)


def weights_at(run_uri, step):
    fs, found = checkpoints(run_uri)
    return weights.read_model_weights(fs, next(c for c in found if c.step == step))


def assert_close(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A two-rank fsdp run of 12 steps, checkpointed every 3."""
    root = tmp_path_factory.mktemp("fsdp")
    run_uri = str(root / "straight")
    os.makedirs(run_uri)
    train_ranks(2, run_uri, str(root))
    return run_uri


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job in one process, each micro-batch the two ranks' together."""
    root = tmp_path_factory.mktemp("reference")
    run_uri = str(root / "ref")
    out = run_training(spec_of(root, "train.batch_size=128"), LoopContext(run_uri=run_uri, log=lambda m: None))
    return run_uri, out


def test_two_sharded_ranks_train_as_one_process_on_their_joint_batch(straight, reference):
    ref_uri, ref = reference
    r0, r1 = (json.load(open(os.path.join(straight, f"result{r}.json"))) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == ref.steps == STEPS
    assert r0["metrics"] == r1["metrics"]
    assert r0["metrics"]["val_loss"] == pytest.approx(ref.metrics["val_loss"], rel=1e-5)
    # Clipping (by the norm of every rank's shards together), accumulation and the frozen bias all hold.
    for step in (3, 6, 9, 12):  # each async save after the first copied into the last one's host buffers
        assert_close(weights_at(straight, step), weights_at(ref_uri, step))
    test = json.load(open(os.path.join(straight, "test.json")))
    ref_test = json.load(open(os.path.join(ref_uri, "test.json")))
    assert test["metrics"]["test_loss"] == pytest.approx(ref_test["metrics"]["test_loss"], rel=1e-5)
    assert test["labels"] == ref_test["labels"]  # the ranks' test outputs gathered back in the split's order


def test_a_sharded_checkpoint_is_every_ranks_shard_under_one_manifest(straight):
    fs, found = checkpoints(straight)
    assert [c.step for c in found] == [3, 6, 9, 12]
    info = found[-1]
    assert info.manifest.layout == "sharded"
    names = set(info.manifest.files)
    assert names == {"shard_00000_000.safetensors", "shard_00001_000.safetensors"} | {
        "dcp.json",
        "state.pt",
        "rng.pt",
        "job.yaml",
    }
    files = ckpt.read_verified(fs, info)  # every file matches its size and sha256
    from safetensors.torch import load

    rank0, rank1 = load(files["shard_00000_000.safetensors"]), load(files["shard_00001_000.safetensors"])
    # Each rank wrote half of each weight (its FSDP shard): rows 0-15 and 16-31 of the hidden layer.
    assert rank0["model.net.1.weight@0,0"].shape == rank1["model.net.1.weight@16,0"].shape == (16, 64)
    assert len(ckpt.deserialize_state(files["rng.pt"])) == 2


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])  # s3: ~40 s more
def test_a_rank_killed_mid_save_leaves_no_checkpoint_and_the_rerun_resumes_bit_for_bit(
    straight, tmp_path, where, request
):
    out_dir = str(tmp_path)
    storage_root = f"s3://{request.getfixturevalue('bucket')}/runs" if where == "s3" else out_dir
    run_uri = f"{storage_root}/killed"
    with pytest.raises(mp.ProcessExitedException):
        train_ranks(2, run_uri, storage_root, kill_at=6, out_dir=out_dir)
    fs, found = checkpoints(run_uri)
    assert [c.step for c in found] == [3]  # checkpoint_6 was being written: no manifest, invisible
    half_written = storage.join(found[0].path.rsplit("/", 1)[0], "checkpoint_00000006", "shard_00001_000.safetensors")
    assert fs.exists(half_written)

    train_ranks(2, run_uri, storage_root, out_dir=out_dir)
    result = json.load(open(os.path.join(out_dir, "result0.json")))
    assert result["resumed_from"].endswith("checkpoint_00000003") and result["steps"] == STEPS
    again, first = weights_at(run_uri, STEPS), weights_at(straight, STEPS)
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert [c.step for c in checkpoints(run_uri)[1]] == [3, 6, 9, 12]  # the rewritten checkpoint_6 among them


def test_a_ranks_pieces_spread_over_files_of_a_bounded_size(tmp_path, monkeypatch):
    from orchestrator import sharded_checkpoint

    monkeypatch.setattr(sharded_checkpoint, "SHARD_FILE_BYTES", 8192)  # the hidden layer's weight (8 KB) alone
    run_uri = str(tmp_path / "files")
    run = [*FSDP, "train.batch_size=128"]
    run_training(spec_of(tmp_path, *run, "train.max_steps=3"), LoopContext(run_uri=run_uri, log=lambda m: None))
    fs, found = checkpoints(run_uri)
    shards = sorted(n for n in found[-1].manifest.files if n.startswith("shard_"))
    assert len(shards) > 2 and all(fs.size(f"{found[-1].path}/{n}") < 3 * 8192 for n in shards)
    out = run_training(spec_of(tmp_path, *run, "train.max_steps=6"), LoopContext(run_uri=run_uri, log=lambda m: None))
    assert out.resumed_from.endswith("checkpoint_00000003")
    single = str(tmp_path / "single")
    monkeypatch.setattr(sharded_checkpoint, "SHARD_FILE_BYTES", 64 * 2**20)
    run_training(spec_of(tmp_path, *run, "train.max_steps=6"), LoopContext(run_uri=single, log=lambda m: None))
    assert all(torch.equal(weights_at(run_uri, 6)[k], v) for k, v in weights_at(single, 6).items())


def test_a_corrupt_piece_makes_the_restore_fall_back_to_the_checkpoint_before(tmp_path, caplog):
    run_uri = str(tmp_path / "corrupt")
    run = [*FSDP, "train.batch_size=128", "checkpoint.async=false"]  # the save that returns committed, too
    run_training(spec_of(tmp_path, *run, "train.max_steps=6"), LoopContext(run_uri=run_uri, log=lambda m: None))
    shard = tmp_path / "corrupt" / "checkpoint_00000006" / "shard_00000_000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last piece: the file keeps its size, the manifest its word
    shard.write_bytes(bytes(data))
    out = run_training(spec_of(tmp_path, *run, "train.max_steps=9"), LoopContext(run_uri=run_uri, log=lambda m: None))
    assert out.resumed_from.endswith("checkpoint_00000003")
    assert "does not match its CRC-32" in caplog.text


@pytest.mark.parametrize("asynchronous", ["true", "false"])
def test_a_sharded_run_whose_lease_is_anothers_commits_nothing(tmp_path, asynchronous):
    from orchestrator.lease import LeaseLost

    run_uri = str(tmp_path / "taken")
    os.makedirs(run_uri)
    holder = {"host": "elsewhere", "pid": 1, "since": "2026-12-06T00:00:00+00:00", "token": "theirs"}
    (tmp_path / "lease.json").write_text(json.dumps(holder))
    ctx = LoopContext(run_uri=run_uri, lease={"uri": str(tmp_path / "lease.json"), "token": "ours"}, log=print)
    with pytest.raises(LeaseLost):
        spec = spec_of(tmp_path, *FSDP, "train.batch_size=128", "train.max_steps=4", f"checkpoint.async={asynchronous}")
        run_training(spec, ctx)
    assert checkpoints(run_uri)[1] == [] and not os.path.exists(os.path.join(run_uri, "checkpoint_00000003"))


def _resumed_copy(straight, dest, step):
    """A copy of the straight run as it stood after `step`: later checkpoints never written."""
    dest = str(dest)
    shutil.copytree(straight, dest)
    for c in checkpoints(dest)[1]:
        if c.step > step:
            shutil.rmtree(c.path)
    return dest


def test_two_ranks_resume_on_one_with_the_same_optimizer_state(straight, tmp_path):
    run_uri = _resumed_copy(straight, tmp_path / "one", 6)
    lines = []
    # One process of 128 examples continues the epoch the two ranks of 64 would have: the same batches.
    out = run_training(
        spec_of(tmp_path, *FSDP, "train.batch_size=128", "train.max_steps=9"),
        LoopContext(run_uri=run_uri, log=lines.append),
    )
    assert out.resumed_from.endswith("checkpoint_00000006") and out.steps == 9
    # Adam's moments came along: without them the next three steps would move the weights elsewhere.
    assert_close(weights_at(run_uri, 9), weights_at(straight, 9))
    assert read_share(lines) == pytest.approx(1.0, abs=0.02)  # one rank needs all of it, once


def read_share(lines):
    """The share of the checkpoint's stored bytes that the rank saying `lines` read to resume."""
    said = next(line for line in lines if line.startswith("resumed from"))
    read, total = re.search(r"this rank read ([\d.e+-]+) of the ([\d.e+-]+) MB of tensors in its shards", said).groups()
    return float(read) / float(total)


@pytest.mark.slow  # four spawned ranks (~35 s on 2 busy cores)
def test_two_ranks_resume_on_four_each_reading_its_quarter(straight, tmp_path):
    run_uri = _resumed_copy(straight, tmp_path / "four", 6)
    train_ranks(4, run_uri, str(tmp_path), "train.batch_size=32", "train.max_steps=9")
    result = json.load(open(os.path.join(run_uri, "result0.json")))
    assert result["resumed_from"].endswith("checkpoint_00000006")
    # A quarter of each weight and of its Adam moments, read by byte ranges (and the few values every rank needs).
    assert 0.25 <= read_share(result["log"]) <= 0.3
    assert_close(weights_at(run_uri, 9), weights_at(straight, 9))


# ----------------------------------------------------------------------------------------------
# Transfer: export, init_from, and a run that changes strategy between its checkpoints


def test_export_streams_a_sharded_checkpoint_into_one_safetensors_file(straight, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "w.safetensors"
    res = run_command(
        [sys.executable, "-m", "orchestrator", "export", f"{straight}/checkpoint_00000012", "--out", str(out)],
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    exported, saved = load_file(out), weights_at(straight, 12)
    assert exported.keys() == saved.keys() == {"net.1.weight", "net.1.bias", "net.4.weight", "net.4.bias"}
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    from safetensors import safe_open

    with safe_open(out, "pt") as fh:  # where the weights came from, in the header as for a full checkpoint
        assert fh.metadata()["step"] == "12" and fh.metadata()["model"] == "mlp"


def test_init_from_takes_the_weights_of_a_sharded_checkpoint(straight, tmp_path):
    from orchestrator.data import load_data
    from orchestrator.loop.parts import apply_init_and_freeze
    from orchestrator.models import build_model

    spec = spec_of(tmp_path, f"model.init_from={straight}/checkpoint_00000012", "model.freeze=[]")
    model = build_model(spec, load_data(spec).info)
    said = []
    apply_init_and_freeze(model, spec, said.append)
    assert said == [f"initialised 4 of the model's 4 tensors from {straight}/checkpoint_00000012"]
    saved = weights_at(straight, 12)
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


def test_a_run_moves_from_ddp_to_fsdp_and_back_between_checkpoints(straight, tmp_path):
    run_uri = str(tmp_path / "moving")
    one = ["train.batch_size=128"]  # one process on the two ranks' joint batch, as the reference

    def run(*overrides):
        return run_training(spec_of(tmp_path, *one, *overrides), LoopContext(run_uri=run_uri, log=lambda m: None))

    run("train.max_steps=6")
    assert checkpoints(run_uri)[1][-1].manifest.layout == "full"
    # A full checkpoint's weights and Adam state, each rank taking its shard of them...
    assert run(*FSDP, "train.max_steps=9").resumed_from.endswith("checkpoint_00000006")
    assert checkpoints(run_uri)[1][-1].manifest.layout == "sharded"
    assert_close(weights_at(run_uri, 9), weights_at(straight, 9))
    # ...and a sharded one's, whole, back in a DDP run.
    assert run("train.max_steps=12").resumed_from.endswith("checkpoint_00000009")
    assert_close(weights_at(run_uri, 12), weights_at(straight, 12))


# ----------------------------------------------------------------------------------------------
# One rank in this process (a one-rank process group of its own): blocks, precision, the loop's features


def _sharded_parts(tmp_path, raw, *overrides):
    from torch.distributed import destroy_process_group

    from orchestrator.loop.parts import build_parts
    from orchestrator.loop.sharding import ensure_process_group

    ctx = LoopContext(run_uri=str(tmp_path / "parts"))
    assert ensure_process_group(ctx)
    try:
        parts = build_parts(build_spec(raw, [*FSDP, *overrides]), ctx, lambda m: None)
        x, _ = next(iter(parts.splits.train.batches(0, 0, 1)))
        return parts, parts.model(x[:2])
    finally:
        destroy_process_group()


GPT = {
    "model": {"name": "gpt", "hidden": 16, "layers": 2, "heads": 2, "context": 8},
    "data": {"name": "synthetic", "task": "lm", "vocab_size": 16, "seq_len": 8, "samples": 64},
    "train": {"batch_size": 8},
}
IMAGES = {"data": {"name": "digits"}, "train": {"batch_size": 8}}


@pytest.mark.parametrize(
    "raw, overrides, blocks",
    [
        (GPT, [], ["", "tok_emb", "blocks.0", "blocks.1", "head"]),
        (GPT, ["scaling.fsdp.blocks=['blocks.1']"], ["", "blocks.1"]),
        ({**IMAGES, "model": {"name": "resnet", "hidden": 8, "layers": 2}}, [], ["", "blocks.0", "blocks.1"]),
        ({**IMAGES, "model": {"name": "cnn", "hidden": 8, "layers": 2}}, [], ["", "features.0", "features.4"]),
        ({**IMAGES, "model": {"name": "mlp", "hidden": 8, "layers": 2}}, [], ["", "net.1", "net.4", "net.7"]),
    ],
)
def test_each_block_of_a_model_is_sharded_on_its_own_then_the_root(tmp_path, raw, overrides, blocks):
    from torch.distributed.fsdp import FSDPModule

    parts, _ = _sharded_parts(tmp_path, raw, *overrides)
    assert [name for name, m in parts.model.named_modules() if isinstance(m, FSDPModule)] == blocks


def test_a_background_saves_host_copy_reuses_the_last_saves_buffers(tmp_path):
    from torch.distributed import destroy_process_group
    from torch.distributed.tensor import DTensor

    from orchestrator.loop.parts import build_parts
    from orchestrator.loop.sharding import ensure_process_group, snapshot_state

    ensure_process_group(LoopContext(run_uri=str(tmp_path / "parts")))
    try:
        parts = build_parts(build_spec(RAW, FSDP), LoopContext(run_uri=str(tmp_path / "parts")), lambda m: None)
        staging: dict = {}
        first = snapshot_state(parts.model, parts.optimizer, staging)
        name = next(k for k, v in first["model"].items() if isinstance(v, DTensor))
        param = dict(parts.model.named_parameters())[name]
        with torch.no_grad():
            param.add_(1.0)  # the model moves on after the save
        second = snapshot_state(parts.model, parts.optimizer, staging)
        a, b = first["model"][name].to_local(), second["model"][name].to_local()
        assert a.data_ptr() == b.data_ptr()  # the same host buffer, not a new allocation
        assert torch.equal(b, param.to_local().detach()) and b.data_ptr() != param.to_local().data_ptr()
        live = snapshot_state(parts.model, parts.optimizer)["model"][name]  # no staging: the live tensors
        assert live.to_local().data_ptr() == param.to_local().data_ptr()
    finally:
        destroy_process_group()


def test_bf16_is_fsdps_parameter_dtype_and_a_block_pattern_must_match(tmp_path):
    _, logits = _sharded_parts(tmp_path, GPT, "train.precision=bf16")
    assert logits.dtype == torch.bfloat16  # the gathered parameters are cast for compute; the shards stay fp32
    _, logits = _sharded_parts(tmp_path, GPT)
    assert logits.dtype == torch.float32
    with pytest.raises(ValueError, match=r"scaling.fsdp.blocks: no module of gpt matches \['layers.\*'\]"):
        _sharded_parts(tmp_path, GPT, "scaling.fsdp.blocks=['blocks.*', 'layers.*']")


def test_early_stopping_retention_and_the_test_of_the_best_under_fsdp(tmp_path):
    raw = {**RAW, "early_stopping": {"metric": "val_loss", "patience": 2, "min_delta": 0.15}}
    common = ["train.batch_size=128", "validation.every_n_steps=1", "checkpoint.every_n_steps=1"]
    common += ["checkpoint.keep_last=1", "checkpoint.keep_best=1"]
    outs = {}
    for strategy in ("ddp", "fsdp"):
        outs[strategy] = run_training(
            build_spec(raw, [f"checkpoint.storage={tmp_path}", f"scaling.strategy={strategy}", *common]),
            LoopContext(run_uri=str(tmp_path / strategy), log=lambda m: None),
        )
    ddp, fsdp = outs["ddp"], outs["fsdp"]
    assert fsdp.stopped_early and fsdp.steps == ddp.steps < STEPS
    assert fsdp.best.step == ddp.best.step < fsdp.steps
    assert fsdp.best.value == pytest.approx(ddp.best.value)
    # The newest and the best are kept; the best is the one tested.
    assert [c.step for c in checkpoints(str(tmp_path / "fsdp"))[1]] == [fsdp.best.step, fsdp.steps]
    assert fsdp.test.step == fsdp.best.step
    assert fsdp.test.metrics["test_loss"] == pytest.approx(ddp.test.metrics["test_loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# The same job with strategy fsdp through sweeps, cv, submit and Kubernetes


def test_sweeps_cv_submit_and_kubernetes_take_a_job_with_strategy_fsdp(tmp_path):
    import yaml

    from orchestrator import cluster, k8s
    from orchestrator.cv import load_cv
    from orchestrator.errors import BadInput
    from orchestrator.sweep import build_sweep_submission, load_sweep

    jobs = ROOT / "jobs"
    fsdp = ["checkpoint.storage=s3://bucket/runs", "scaling.strategy=fsdp", "scaling.num_workers=2"]
    sweep = load_sweep(str(jobs / "sweep_digits_asha.yaml"), fsdp)
    assert sweep.spec.scaling.strategy == "fsdp" and sweep.job["scaling"]["strategy"] == "fsdp"
    assert "scaling.strategy=fsdp" in build_sweep_submission(sweep, fsdp)["entrypoint"]
    cv = load_cv(str(jobs / "cv_digits.yaml"), fsdp)
    assert cv.spec.scaling.strategy == "fsdp"
    with pytest.raises(BadInput, match="sweep.scheduler: pbt hands a trial's whole checkpoint to another"):
        load_sweep(str(jobs / "sweep_digits_lr.yaml"), [*fsdp[:2], "sweep.scheduler.name=pbt"])

    spec = build_spec(yaml.safe_load((jobs / "digits_mlp.yaml").read_text()), fsdp)
    submission = cluster.build_submission(spec, jobs / "digits_mlp.yaml", fsdp, submission_id="s")
    assert "digits_mlp.yaml checkpoint.storage=s3://bucket/runs scaling.strategy=fsdp" in submission["entrypoint"]
    rendered = {m["kind"]: m for m in k8s.render_manifests(spec, k8s.job_file_text(spec))}
    configmap, rayjob = rendered["ConfigMap"], rendered["RayJob"]
    job = yaml.safe_load(next(iter(configmap["data"].values())))
    assert job["scaling"]["strategy"] == "fsdp" and job["scaling"]["fsdp"]["reshard_after_forward"] is True
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2


# ----------------------------------------------------------------------------------------------
# Slow: compile, batch norm across ranks, bf16 at two ranks


@pytest.mark.slow  # torch.compile of each block on two busy cores (~1-2 min)
def test_compiled_blocks_train_as_the_eager_ones(tmp_path):
    raw = {**RAW, "model": {"name": "mlp", "hidden": 32, "layers": 1}}
    outs = [
        run_training(
            build_spec(raw, [f"checkpoint.storage={tmp_path}", *FSDP, "train.max_steps=4", *extra]),
            LoopContext(run_uri=str(tmp_path / f"c{len(extra)}"), log=lambda m: None),
        )
        for extra in ([], ["train.compile=true"])
    ]
    assert outs[1].metrics["val_loss"] == pytest.approx(outs[0].metrics["val_loss"], rel=1e-4)
    # The checkpoint keeps the module's own names: each block was compiled in place.
    assert weights_at(str(tmp_path / "c1"), 4).keys() == weights_at(str(tmp_path / "c0"), 4).keys()


@pytest.mark.slow  # two two-rank runs (~40 s)
def test_the_checkpoint_keeps_rank_0s_batch_norm_statistics_as_under_ddp(tmp_path):
    raw = {**RAW, "model": {"name": "resnet", "hidden": 4, "layers": 1}, "train": {**RAW["train"], "batch_size": 16}}
    for strategy in ("ddp", "fsdp"):
        mp.start_processes(
            _resnet_rank, args=(2, free_port(), raw, str(tmp_path), strategy), nprocs=2, join=True, start_method="spawn"
        )
    ddp, fsdp = weights_at(str(tmp_path / "ddp"), 6), weights_at(str(tmp_path / "fsdp"), 6)
    assert any("running_mean" in k for k in fsdp)
    assert_close(fsdp, ddp, atol=1e-5)  # the checkpoint's statistics are rank 0's


def _resnet_rank(rank, world, port, raw, root, strategy):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        spec = build_spec(raw, [f"checkpoint.storage={root}", f"scaling.strategy={strategy}", "train.max_steps=6"])
        run_training(spec, LoopContext(run_uri=f"{root}/{strategy}", rank=rank, world_size=world, log=lambda m: None))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two two-rank runs of a small GPT (~40 s)
def test_a_gpt_trains_in_bf16_on_two_sharded_ranks(tmp_path):
    raw = {
        **GPT,
        "name": "g",
        "data": {**GPT["data"], "samples": 512},
        "optim": {"name": "adamw", "lr": 0.01},
        "train": {"batch_size": 16, "epochs": 2},
    }
    for precision in ("fp32", "bf16"):
        out_dir = tmp_path / precision
        out_dir.mkdir()
        mp.start_processes(
            _gpt_rank, args=(2, free_port(), raw, str(out_dir), precision), nprocs=2, join=True, start_method="spawn"
        )
    fp32, bf16 = (json.load(open(tmp_path / p / "result0.json")) for p in ("fp32", "bf16"))
    assert bf16["first_val"] > bf16["val_loss"]  # it learns
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.05)


def _gpt_rank(rank, world, port, raw, out_dir, precision):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        spec = build_spec(raw, [f"checkpoint.storage={out_dir}", *FSDP, f"train.precision={precision}"])
        out = run_training(spec, LoopContext(run_uri=f"{out_dir}/g", rank=rank, world_size=world, log=lambda m: None))
        lines = [json.loads(line) for line in open(f"{out_dir}/g/metrics.jsonl")] if rank == 0 else []
        first_val = next((e["val_loss"] for e in lines if e.get("split") == "val"), None)
        with open(os.path.join(out_dir, f"result{rank}.json"), "w") as fh:
            json.dump({"val_loss": out.metrics["val_loss"], "first_val": first_val}, fh)
    finally:
        dist.destroy_process_group()
