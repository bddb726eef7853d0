"""The job file: every error path, overrides, and the CLI's validate command."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from commands import run_command

from orchestrator.spec import (
    MAX_JOB_FILE_BYTES,
    JobSpec,
    SpecError,
    apply_overrides,
    build_spec,
    iter_fields,
    load_spec,
    parse_override,
    read_job_file,
)

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def problems(raw, overrides=()):
    with pytest.raises(SpecError) as err:
        build_spec(raw, list(overrides))
    return err.value.lines


def test_defaults_are_a_valid_job():
    spec = build_spec({})
    assert spec.optim.name == "adamw" and spec.scaling.num_workers == 1 and spec.early_stopping is None
    assert spec.task == "classification"


# Parquet data read by the ray engine: valid on its own, refused with what each case adds.
RAY_PARQUET = {"name": "parquet", "path": "x", "task": "regression", "features": ["a"], "label": "y", "engine": "ray"}


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"optim": {"lrr": 0.1}}, "optim.lrr: unknown field (did you mean 'lr'?)"),
        ({"modle": {}}, "modle: unknown field (did you mean 'model'?)"),
        ({"optim": {"lr": -1}}, "optim.lr: Input should be greater than 0"),
        ({"optim": {"name": "adagrad"}}, "optim.name: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop'"),
        ({"model": {"name": "mpl"}}, "model.name: unknown model 'mpl' (did you mean 'mlp'?)"),
        ({"data": {"name": "digts"}}, "data.name: unknown dataset 'digts' (did you mean 'digits'?)"),
        ({"data": {"name": "parquet", "task": "regression"}}, "data.path: required for parquet data"),
        ({"data": {"name": "parquet", "path": "x.parquet"}}, "data.task: required for parquet data"),
        ({"data": {"name": "parquet", "path": "x", "task": "regression"}}, "data.features and label: required"),
        ({"data": {"name": "synthetic"}}, "data.task: required for synthetic data"),
        ({"data": {"engine": "ray"}}, "data.engine: ray reads parquet data (data.name=parquet), not digits"),
        ({"data": {"engine": "spark"}}, "data.engine: Input should be 'native' or 'ray'"),
        (
            {
                "data": RAY_PARQUET,
                "scaling": {"num_workers": 0},
            },
            "data.engine: ray streams to Ray Train workers; with scaling.num_workers=0",
        ),
        (
            {
                "data": RAY_PARQUET,
                "entrypoint": "loop:train",
            },
            "data.engine: ray feeds the built-in loop; a user entrypoint reads its own data",
        ),
        ({"data": {"folds": 5, "fold": 5}}, "data.fold: 5 is not below folds=5"),
        ({"data": {"stratify": True}}, "data.stratify: applies to k-fold splits; set folds too"),
        (
            {"data": {"name": "synthetic", "task": "regression", "folds": 5, "stratify": True}},
            "data.stratify: stratified folds need class labels, and regression data has none",
        ),
        (
            {"data": {"name": "synthetic", "task": "lm", "folds": 5, "stratify": True}, "model": {"name": "gpt"}},
            "data.stratify: stratified folds need class labels, and lm data has none",
        ),
        ({"optim": {"nesterov": True}}, "optim.nesterov: needs name=sgd and momentum > 0"),
        ({"schedule": {"name": "linear"}}, "schedule.name: Input should be"),
        ({"train": {"precision": "fp8"}}, "train.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        ({"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than or equal to 1"),
        ({"validation": {"metrics": ["acc"]}}, "validation.metrics: unknown metric 'acc'"),
        ({"validation": {"metrics": ["mse"]}}, "validation.metrics: 'mse' does not apply to classification"),
        ({"early_stopping": {"mode": "up"}}, "early_stopping.mode: Input should be 'min' or 'max'"),
        ({"scaling": {"num_workers": -1}}, "scaling.num_workers: must be >= 0"),
        ({"scaling": {"num_workers": [3, 1]}}, "scaling.num_workers: elastic range [3, 1] needs 1 <= min <= max"),
        ({"scaling": {"gpus_per_worker": 1}}, "scaling.gpus_per_worker: set scaling.use_gpu=true too"),
        ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last: Input should be greater than or equal to 1"),
        ({"checkpoint": {"asynch": True}}, "checkpoint.asynch: unknown field (did you mean 'async'?)"),
        ({"failure": {"max_failures": -2}}, "failure.max_failures: Input should be greater than or equal to -1"),
        ({"name": "my run"}, "name: must be letters, digits"),
        ({"entrypoint": "not a hook"}, "entrypoint: 'not a hook' is not of the form module:function"),
        ({"model": {"name": "gpt"}}, "model.name: gpt needs token data"),
        ({"data": {"name": "synthetic", "task": "lm"}}, "model.name: mlp cannot model tokens; use gpt"),
        (
            {"model": {"name": "gpt", "hidden": 30, "heads": 4}, "data": {"name": "synthetic", "task": "lm"}},
            "model.heads: 4 does not divide model.hidden=30",
        ),
        (
            {"model": {"name": "cnn"}, "data": {"name": "synthetic", "task": "classification"}},
            "model.name: cnn needs image data",
        ),
        (
            {"schedule": {"name": "step", "warmup_steps": 5}},
            "schedule.warmup_steps: applies to constant and warmup_cosine, not step",
        ),
        (
            {"early_stopping": {"metric": "val_acc"}},
            "early_stopping.metric: 'val_acc' is not a validation metric of this job (did you mean 'val_accuracy'?)",
        ),
        (
            {"schedule": {"name": "plateau", "metric": "val_mse"}},
            "schedule.metric: 'val_mse' is not a validation metric",
        ),
        ({"checkpoint": {"best_metric": "loss"}}, "checkpoint.best_metric: 'loss' is not a validation metric"),
        (
            {"early_stopping": {"metric": "val_accuracy", "mode": "max"}, "checkpoint": {"best_metric": "val_loss"}},
            "checkpoint.best_metric: 'val_loss' differs from early_stopping.metric 'val_accuracy'",
        ),
        ("just a string", "(job): the job file must be a mapping of sections"),
    ],
)
def test_each_error_names_its_field(raw, expected):
    lines = problems(raw)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=true", "train.epochs: expected a number, got a boolean"),
        ("optim.lr=yes", "optim.lr: expected a number, got a boolean"),
        ("optim.betas=[true, 0.5]", "optim.betas: expected a number, got a boolean"),
        ("scaling.num_workers=[true, 2]", "scaling.num_workers: expected a number, got a boolean"),
        ("optim.lr=inf", "optim.lr: Input should be a finite number"),
        ("optim.lr=.nan", "optim.lr: Input should be a finite number"),
        ("schedule.min_lr=.inf", "schedule.min_lr: Input should be a finite number"),
        ("optim.betas=[2, 3]", "optim.betas.0: Input should be less than 1"),
        ("optim.betas=[0.9, -0.1]", "optim.betas.1: Input should be greater than or equal to 0"),
        ("train.seed=99999999999999999999", "train.seed: Input should be less than or equal to 4294967295"),
        ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
        ("checkpoint.storage=ftp://h/x", "checkpoint.storage: 'ftp://h/x': unsupported scheme 'ftp'"),
        ("checkpoint.storage=", "checkpoint.storage: must name a local path or a URI"),
        ("data.path=gs://b/x.parquet", "data.path: 'gs://b/x.parquet': unsupported scheme 'gs'"),
        ("model.init_from=http://h/w.safetensors", "model.init_from: 'http://h/w.safetensors': unsupported scheme"),
        ("checkpoint.endpoint_url=localhost:9000", "checkpoint.endpoint_url: 'localhost:9000' is not a URI"),
        ("tracking.mlflow.tracking_uri=ftp://h", "tracking.mlflow.tracking_uri: 'ftp://h': unsupported scheme"),
        ("tracking.tensorboard.log_dir=gs://b/tb", "tracking.tensorboard.log_dir: 'gs://b/tb': unsupported scheme"),
    ],
)
def test_strict_values(override, expected):
    lines = problems({}, [override])
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(
    "override",
    [
        "checkpoint.storage=s3://user:hunter2@bucket/x",
        "checkpoint.endpoint_url=http://user:hunter2@minio:9000",
        "data.endpoint_url=https://user:hunter2@minio",
        "tracking.mlflow.tracking_uri=http://user:hunter2@mlflow:5000",
        "tracking.mlflow.tracking_uri=https://mlflow/x?token=hunter2",
        "checkpoint.storage=s3://bucket/x?X-Amz-Credential=AKIA&X-Amz-Signature=hunter2",
    ],
)
def test_credentials_in_a_uri_are_refused_without_showing_them(override):
    lines = problems({}, [override])
    assert len(lines) == 1 and "credentials do not belong in a job file" in lines[0], lines
    assert "hunter2" not in lines[0]


def test_supported_uris_and_numbers_still_pass():
    spec = build_spec(
        {},
        [
            "checkpoint.storage=s3://bucket/runs",
            "checkpoint.endpoint_url=http://127.0.0.1:9000",
            "model.init_from=file:///tmp/w.safetensors",
            "tracking.mlflow.tracking_uri=sqlite:///tmp/m.db",
            "train.seed=4294967295",
            "optim.betas=[0, 0.5]",
            "optim.lr=1",  # an int where a float is meant is a number all the same
            "train.compile=true",
        ],
    )
    assert spec.train.seed == 2**32 - 1 and spec.optim.betas == (0.0, 0.5) and spec.train.compile is True
    assert build_spec({}, ["checkpoint.storage=s3a://b/x"]).checkpoint.storage == "s3a://b/x"


def job_file_problem(tmp_path, content: bytes) -> str:
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as err:
        read_job_file(path)
    assert len(err.value.lines) == 1, err.value.lines
    return err.value.lines[0]


def laughs(levels: int, width: int = 10) -> bytes:
    """The YAML "billion laughs": each level an anchor of `width` aliases to the level below."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return ("config:\n" + "\n".join("  " + line for line in lines) + "\n").encode()


def test_job_file_edges(tmp_path):
    assert job_file_problem(tmp_path, b"").endswith(
        "the job file is empty; a job needs at least a name (see jobs/ for examples)"
    )
    assert "the job file is empty" in job_file_problem(tmp_path, b"# only a comment\n")
    assert "not a UTF-8 text file (byte 0xff at offset 5)" in job_file_problem(tmp_path, b"name:\xff\xfe")
    dup = job_file_problem(tmp_path, b"name: a\nname: b\n")
    assert "line 2" in dup and "duplicate key 'name'" in dup
    nested = job_file_problem(tmp_path, b"optim:\n  lr: 0.1\n  lr: 0.2\n")
    assert "line 3" in nested and "duplicate key 'lr'" in nested
    assert "recursive alias" in job_file_problem(tmp_path, b"config: &c {x: *c}\n")
    big = b"name: x\n" + b"#" * MAX_JOB_FILE_BYTES + b"\n"
    assert "too big for a job file" in job_file_problem(tmp_path, big)


def test_alias_bomb_is_refused_quickly(tmp_path):
    start = time.perf_counter()
    line = job_file_problem(tmp_path, laughs(9))  # 10**9 values once expanded, a few hundred bytes written
    assert "aliases expand to more than" in line
    assert time.perf_counter() - start < 2


def test_merge_keys_and_modest_aliases_still_load(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(
        b"config:\n  base: &b {lr: 1, wd: 0}\n  other:\n    <<: *b\n    lr: 2\n" + laughs(3)[len("config:\n") :]
    )
    raw = read_job_file(path)
    assert raw["config"]["other"] == {"lr": 2, "wd": 0}
    assert len(raw["config"]["a2"]) == 10 and raw["config"]["a2"][0][0] == ["lol"] * 10


def test_several_problems_give_one_line_each():
    lines = problems({"optim": {"lr": 0, "name": "x"}, "train": {"epochs": 0}})
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {"optim.lr", "optim.name", "train.epochs"}


def test_overrides_parse_yaml_values_and_create_sections():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("scaling.num_workers=[1, 2]") == (["scaling", "num_workers"], [1, 2])
    assert parse_override("name=abc") == (["name"], "abc")
    raw = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=0.5", "early_stopping.patience=4", "train.compile=true"])
    assert raw == {"optim": {"lr": 0.5}, "early_stopping": {"patience": 4}, "train": {"compile": True}}
    spec = build_spec({}, ["early_stopping.patience=4", "checkpoint.async=false", "scaling.num_workers=[1,2]"])
    assert spec.early_stopping.patience == 4 and spec.checkpoint.async_ is False and spec.scaling.num_workers == (1, 2)


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1"])
def test_malformed_override(bad):
    assert problems({}, [bad])[0].startswith(bad)


def test_override_through_a_value_is_an_error():
    assert problems({"name": "x"}, ["name.sub=1"]) == ["name: is a value, not a section; cannot set name.sub"]


def test_resolved_job_round_trips():
    spec = build_spec({"optim": {"lr": 0.1}, "checkpoint": {"async": False}})
    again = JobSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec.to_dict())))
    assert again == spec


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_example_job_validates(path):
    load_spec(path)


def test_every_field_is_described():
    rows = list(iter_fields())
    assert len(rows) > 60
    assert all(description for _, _, _, description in rows), [r[0] for r in rows if not r[3]]


def test_the_reference_shows_types_a_reader_can_read():
    types = {path: type_text for path, type_text, _, _ in iter_fields()}
    assert types["optim.betas"] == "pair of number, 0 <= x < 1"
    assert types["train.epochs"] == "integer, >= 1"
    assert types["data.task"] == "(one of: classification, regression, lm) or null"
    assert types["train.max_steps"] == "integer or null, >= 1"
    assert types["scaling.num_workers"] == "integer or pair of integer"
    assert types["model.options"] == "mapping"
    assert "sweep.parameters.<name>.low" in types  # a mapping of sections names its entries
    internals = ("FieldInfo", "Annotated", "Optional", "Literal[", "typing", "<class", "|")
    assert not [(p, t) for p, t in types.items() if any(word in t for word in internals)]


def test_docs_reference_matches_schema():
    from orchestrator.docs import BEGIN, END, REFERENCE, render_reference

    assert REFERENCE == ROOT / "docs" / "reference.md"
    page = REFERENCE.read_text()
    assert f"{BEGIN}\n{render_reference()}\n{END}" in page, (
        "docs/reference.md is stale: run `python -m orchestrator.docs --write`"
    )


def test_reference_write_replaces_only_the_generated_block(tmp_path):
    from orchestrator.docs import BEGIN, END, render_reference, write_reference

    page = tmp_path / "reference.md"
    page.write_text(f"# Reference\n\nkept above\n\n{BEGIN}\n| stale |\n{END}\n\nkept below\n")
    write_reference(page)
    assert page.read_text() == f"# Reference\n\nkept above\n\n{BEGIN}\n{render_reference()}\n{END}\n\nkept below\n"


def run_cli(*args, cwd=ROOT):
    return run_command([sys.executable, "-m", "orchestrator", *args], cwd=cwd, timeout=60)


def test_validate_cli_exit_codes(tmp_path):
    ok = run_cli("validate", "jobs/digits_mlp.yaml", "optim.lr=0.01")
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 1\ntrain:\n  epochs: 0\n")
    res = run_cli("validate", str(bad))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "error: optim.lrr: unknown field (did you mean 'lr'?)",
        "error: train.epochs: Input should be greater than or equal to 1",
    ]
    missing = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no such job file" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [\n")
    res = run_cli("validate", str(broken))
    assert res.returncode == 2 and "not valid YAML" in res.stderr
    js = run_cli("validate", "jobs/digits_mlp.yaml", "--json")
    assert json.loads(js.stdout.splitlines()[-1])["name"] == "digits-mlp"


def test_validate_imports_neither_torch_nor_ray():
    code = "import sys; from orchestrator.cli import main; from orchestrator.spec import load_spec; load_spec('jobs/digits_mlp.yaml'); print('torch' in sys.modules, 'ray' in sys.modules)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False False"
    assert time.perf_counter() - start < 5  # generous: a cold interpreter on a loaded CI machine
