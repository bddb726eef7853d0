"""Bad input through the real command line: exit 2, one line on stderr, no traceback, no secret, nothing written.

Each case is a command line (and the job file it names) and a fragment its one line must hold. The
CLI starts in about a second, so the cases run through the real `main` in a few subprocesses (one
per command family) rather than one process each; a handful also run as `python -m orchestrator`
on their own, to prove the harness sees what a user sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from commands import run_command

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-s3cr3t"

# Runs every command line given as JSON in one interpreter, through click's standalone main (the one
# `orchestrator` runs), and prints what each wrote and its exit code.
HARNESS = r"""
import contextlib, io, json, sys, time, traceback
from orchestrator.cli import main
results = []
for args in json.loads(sys.argv[1]):
    out, err, code, start = io.StringIO(), io.StringIO(), 0, time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args, prog_name="orchestrator")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = -1
    seconds = time.monotonic() - start
    results.append({"args": args, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "seconds": seconds})
print(json.dumps(results))
"""


def clean_env(tmp_path: Path) -> dict[str, str]:
    """No Ray address, token or AWS profile of the caller's: each case sees only what it sets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API", "RAY_AUTH", "AWS_"))}
    return {**env, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path / "home")}


def run_many(
    cases: list[list[str]], tmp_path: Path, timeout: int = 120, env: dict[str, str] | None = None
) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, json.dumps(cases)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**clean_env(tmp_path), **(env or {})},
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def assert_one_line(result: dict, fragment: str) -> None:
    args, err = result["args"], result["stderr"]
    assert result["code"] == 2, (args, result)
    assert "Traceback" not in err + result["stdout"], (args, err)
    lines = err.splitlines()
    assert len(lines) == 1, (args, lines)
    assert lines[0].startswith("error: "), (args, lines)
    assert fragment in lines[0], (args, lines[0], fragment)
    assert SECRET not in err + result["stdout"], (args, err)


def laughs(levels: int, width: int = 10) -> str:
    lines = ["  a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "name: laughs\nconfig:\n" + "\n".join(lines) + "\n"


# (file name, bytes of the job file or None for none, extra command words, fragment of the one line)
VALIDATE_CASES = [
    ("binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff", [], "binary.yaml: not a UTF-8 text file (byte 0x89 at offset 0)"),
    ("empty.yaml", b"", [], "empty.yaml: the job file is empty"),
    ("dup.yaml", b"name: a\nname: b\n", [], "dup.yaml: line 2 is not valid YAML (duplicate key 'name'"),
    ("laughs.yaml", laughs(9).encode(), [], "laughs.yaml: is not valid YAML (aliases expand to more than"),
    ("big.yaml", b"name: big\n" + b"# padding\n" * 120_000, [], "big.yaml: 1200010 bytes is too big for a job file"),
    ("broken.yaml", b"optim: [\n", [], "broken.yaml: line 2 is not valid YAML"),
    ("list.yaml", b"- a\n- b\n", [], "(job): the job file must be a mapping of sections"),
    ("missing.yaml", None, [], "missing.yaml: no such job file"),
    ("ok.yaml", b"name: ok\n", ["train.epochs=true"], "train.epochs: expected a number, got a boolean"),
    ("ok.yaml", b"name: ok\n", ["optim.lr=inf"], "optim.lr: Input should be a finite number"),
    ("ok.yaml", b"name: ok\n", ["optim.betas=[0.9, 2]"], "optim.betas.1: Input should be less than 1"),
    ("ok.yaml", b"name: ok\n", ["train.seed=99999999999999999999"], "train.seed: Input should be less than or equal"),
    ("ok.yaml", b"name: ok\n", ["checkpoint.storage=ftp://h/x"], "checkpoint.storage: 'ftp://h/x': unsupported scheme"),
    (
        "ok.yaml",
        b"name: ok\n",
        [f"checkpoint.storage=s3://user:{SECRET}@bucket/x"],
        "checkpoint.storage: 's3://bucket/x': credentials do not belong in a job file",
    ),
    (
        "ok.yaml",
        b"name: ok\n",
        [f"tracking.mlflow.tracking_uri=http://user:{SECRET}@mlflow:5000"],
        "tracking.mlflow.tracking_uri: 'http://mlflow:5000': credentials do not belong",
    ),
    (
        "ok.yaml",
        b"name: ok\n",
        [f"checkpoint.endpoint_url=http://minio:9000/?X-Amz-Signature={SECRET}"],
        "checkpoint.endpoint_url: 'http://minio:9000/?X-Amz-Signature=***': credentials do not belong",
    ),
    ("ok.yaml", b"name: ok\n", ["data.engine=ray"], "data.engine: ray reads parquet data (data.name=parquet)"),
    (
        "ok.yaml",
        b"name: ok\ndata: {name: parquet, path: x.parquet, task: regression, features: [a], label: y, engine: ray}\n",
        ["scaling.num_workers=0"],
        "data.engine: ray streams to Ray Train workers; with scaling.num_workers=0 the loop runs in the driver",
    ),
    ("ok.yaml", b"name: ok\n", ["scaling.strategy=zero3"], "scaling.strategy: Input should be 'ddp' or 'fsdp'"),
    (
        "ok.yaml",
        b"name: ok\nscaling: {strategy: fsdp}\n",
        ["train.precision=fp16"],
        "train.precision: fp16 needs a grad scaler over sharded gradients, which fsdp does not have here; use bf16",
    ),
    ("ok.yaml", b"name: ok\n", ["scaling.fsdp.blocks=[a]"], "scaling.fsdp: its options apply to scaling.strategy=fsdp"),
    (
        "ok.yaml",
        b"name: ok\nentrypoint: m:f\n",
        ["scaling.strategy=fsdp"],
        "scaling.strategy: fsdp shards the built-in loop's model; a user entrypoint shards its own",
    ),
    ("ok.yaml", b"name: ok\n", ["optim.lr"], "optim.lr: an override must look like dotted.key=value"),
    ("ok.yaml", b"name: ok\n", ["optim.lrr=1"], "optim.lrr: unknown field (did you mean 'lr'?)"),
    ("ok.yaml", b"name: ok\n", ["--no-such-flag"], "No such option '--no-such-flag'"),
    # PyYAML composes recursively and Python caps int() at 4300 digits: both were tracebacks.
    (
        "deep.yaml",
        b"name: d\nconfig: " + b"[" * 5000 + b"]" * 5000 + b"\n",
        [],
        "deep.yaml: line 2 is not valid YAML (nested more",
    ),
    (
        "deepmap.yaml",
        b"name: d\nconfig: " + b"{a: " * 3000 + b"1" + b"}" * 3000,
        [],
        "line 2 is not valid YAML (nested more",
    ),
    (
        "bigint.yaml",
        b"name: d\ntrain: {epochs: " + b"9" * 5000 + b"}\n",
        [],
        "bigint.yaml: line 2 is not valid YAML (an integer of 5000 digits",
    ),
    ("ok.yaml", b"name: ok\n", ["optim[0].lr=1"], "optim[0].lr: 'optim[0]' is not a key"),
    ("ok.yaml", b"name: ok\n", ["config." + "a." * 3000 + "b=1"], "an override key nested more than 50 levels deep"),
    ("brackets.yaml", b'name: b\n"a[b]": 1\n', [], "a[b]: unknown field"),
    ("newline.yaml", b'name: "ab\\n"\n', [], "name: must be letters, digits"),
    (
        "ok.yaml",
        b"name: ok\n",
        ["checkpoint.storage=s3:/bucket/x"],
        "checkpoint.storage: 's3:/bucket/x': a scheme is followed by '://' (did you mean 's3://bucket/x'?)",
    ),
    ("ok.yaml", b"name: ok\n", ["checkpoint.storage=s3://"], "checkpoint.storage: 's3://' names no bucket"),
    (
        "ok.yaml",
        b"name: ok\n",
        ["data.path=file:/d/x.parquet"],
        "data.path: 'file:/d/x.parquet': a scheme is followed by '://' (did you mean 'file:///d/x.parquet'?)",
    ),
    ("ok.yaml", b"name: ok\n", ["checkpoint.endpoint_url=http://"], "checkpoint.endpoint_url: 'http://' names no host"),
    # Early stopping without validation data never fires: it trained to the end, silently.
    (
        "ok.yaml",
        b"name: ok\nearly_stopping: {patience: 2}\n",
        ["validation.split=0"],
        "validation.split: 0 leaves no validation data, and early_stopping.metric watches val_loss",
    ),
]


def test_validate_refuses_bad_input_in_one_line(tmp_path):
    cases = []
    for i, (name, content, extra, _) in enumerate(VALIDATE_CASES):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        if content is not None:
            (folder / name).write_bytes(content)
        cases.append(["validate", str(folder / name), *extra])
    (tmp_path / "adir.yaml").mkdir()
    cases.append(["validate", str(tmp_path / "adir.yaml")])
    results = run_many(cases, tmp_path)
    for (_, _, _, fragment), result in zip(VALIDATE_CASES, results, strict=False):
        assert_one_line(result, fragment)
    assert_one_line(results[-1], "is a directory")


def test_a_sweep_file_naming_a_job_that_is_not_a_mapping_is_one_line(tmp_path):
    (tmp_path / "listjob.yaml").write_text("- a\n- b\n")
    (tmp_path / "sweep.yaml").write_text(
        "job: listjob.yaml\nsweep: {parameters: {optim.lr: {type: loguniform, low: 0.001, high: 0.1}}}\n"
    )
    (result,) = run_many([["sweep", str(tmp_path / "sweep.yaml")]], tmp_path)
    assert_one_line(result, "sweep.yaml: job: listjob.yaml: the job file must be a mapping of sections")


def test_k8s_render_refuses_a_configmap_over_the_kubernetes_limit(tmp_path):
    # 200 KB written once and aliased six times: under the file and alias caps, over 1 MiB rendered.
    blob = "x" * 200_000
    job = f"name: wide\nconfig:\n  a: &a '{blob}'\n  b: [*a, *a, *a, *a, *a, *a]\ncheckpoint:\n  storage: s3://b/runs\n"
    (tmp_path / "wide.yaml").write_text(job)
    (result,) = run_many([["k8s", "render", str(tmp_path / "wide.yaml")]], tmp_path)
    assert_one_line(result, "over the 1032192 a Kubernetes ConfigMap holds")
    assert result["stdout"] == ""


def test_job_ids_and_uris_that_cannot_be_used(tmp_path):
    address = ["--address", "http://127.0.0.1:9"]  # nothing listens: a case that got past the check would say so
    results = run_many(
        [
            ["status", "", *address],
            ["logs", "", *address],
            ["stop", "a/b", *address],
            ["checkpoints", "nosuch://bucket/run"],
        ],
        tmp_path,
    )
    assert_one_line(results[0], "an empty job id: not a job id; `orchestrator list --address http://127.0.0.1:9`")
    assert_one_line(results[1], "an empty job id: not a job id")
    assert_one_line(results[2], "'a/b': not a job id")
    assert_one_line(results[3], "nosuch://bucket/run: unsupported storage protocol 'nosuch'")


@pytest.fixture
def tiny_job(tmp_path):
    """A job that preflight builds in a second: tiny synthetic data, the loop in this process (no Ray)."""
    storage = tmp_path / "runs"
    job = tmp_path / "tiny.yaml"
    job.write_text(
        "name: tiny\n"
        "data: {name: synthetic, task: classification, samples: 40, num_features: 4}\n"
        "model: {hidden: 4, layers: 1}\n"
        "train: {epochs: 1, batch_size: 8}\n"
        "scaling: {num_workers: 0}\n"
        f"checkpoint: {{storage: {storage}}}\n"
    )
    return job, storage


def test_run_refuses_what_preflight_finds_before_writing(tiny_job, tmp_path):
    job, storage = tiny_job
    results = run_many(
        [
            ["run", str(job), "model.freeze=[nope.*]"],
            ["run", str(job), "model.freeze=['net.*', 'nope.*']"],
            ["run", str(job), "schedule.name=cosine", "train.max_steps=0"],
            ["run", str(job), "model.freeze=['*']"],
            ["run", str(job), "scaling.strategy=fsdp", "scaling.fsdp.blocks=['net.1', 'blocks.*']"],
        ],
        tmp_path,
        timeout=300,
    )
    assert_one_line(results[0], "model.freeze: 'nope.*' matches no parameter of mlp (they are: ")
    assert_one_line(results[1], "model.freeze: 'nope.*' matches no parameter")
    assert_one_line(results[2], "train.max_steps: Input should be greater than or equal to 1")
    assert_one_line(results[3], "optim: the model has no trainable parameters")
    assert_one_line(results[4], "scaling.fsdp.blocks: no module of mlp matches ['blocks.*']")
    assert not storage.exists(), list(storage.rglob("*"))  # not even the storage's own directory


def test_run_refuses_weights_that_fit_nothing_and_a_model_whose_outputs_are_not_the_classes(tiny_job, tmp_path):
    """Both trained to exit 0 before: from scratch while saying "initialised 0 tensors", and 7 logits scored for 2 classes."""
    import torch
    from safetensors.torch import save_file

    job, storage = tiny_job
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "wide.py").write_text("import torch.nn as nn\ndef make():\n    return nn.Linear(4, 7)\n")
    results = run_many(
        [
            ["run", str(job), f"model.init_from={tmp_path / 'other.safetensors'}"],
            ["run", str(job), "model.name=wide:make"],
        ],
        tmp_path,
        timeout=300,
    )
    assert_one_line(
        results[0],
        f"model.init_from: none of the 1 tensors of {tmp_path / 'other.safetensors'} fits mlp by name and shape "
        "(they are: encoder.weight; the model's are: net.1.bias, net.1.weight, net.4.bias, net.4.weight)",
    )
    assert_one_line(
        results[1], "model.name: wide:make gives output (2, 7) for a batch of 2; classification needs (2, 2)"
    )
    assert not storage.exists(), list(storage.rglob("*"))


def test_the_loop_says_how_much_of_init_from_fitted_and_refuses_none(tmp_path):
    import torch

    from orchestrator.loop.parts import apply_init_and_freeze
    from orchestrator.spec import build_spec

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.save({"0.weight": torch.ones(3, 4), "0.bias": torch.ones(3), "2.weight": torch.ones(9, 9)}, tmp_path / "w.pt")
    said = []
    apply_init_and_freeze(model, build_spec({"model": {"init_from": str(tmp_path / "w.pt")}}), said.append)
    assert said == [
        f"initialised 2 of the model's 4 tensors from {tmp_path / 'w.pt'} (skipped 1 of another shape or name)"
    ]
    assert torch.equal(model[0].weight, torch.ones(3, 4))
    torch.save({"x": torch.ones(1)}, tmp_path / "none.pt")
    with pytest.raises(ValueError, match="model.init_from: no tensor of .*none.pt fits the model by name and shape"):
        apply_init_and_freeze(model, build_spec({"model": {"init_from": str(tmp_path / "none.pt")}}), said.append)


def test_preflight_checks_the_model_without_building_an_optimizer(tmp_path):
    # An optimizer's first build imports torch's compiler machinery (seconds); the worker that trains pays it anyway.
    code = (
        "import sys, yaml\n"
        "from orchestrator.preflight import preflight\n"
        "from orchestrator.spec import build_spec\n"
        f"spec = build_spec(yaml.safe_load(open('jobs/digits_mlp.yaml')), ['checkpoint.storage={tmp_path}'])\n"
        "preflight(spec, 'jobs', None)\n"
        "print('torch' in sys.modules, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False"]  # the model was built; no optimizer was


def test_the_ray_engine_where_it_would_wait_forever_is_refused_before_anything_starts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [0.5] * 40, "y": [0, 1] * 20}), tmp_path / "d.parquet")
    storage = tmp_path / "runs"
    job = (
        "name: rd\n"
        "data: {name: parquet, path: d.parquet, task: classification, features: [a], label: y, engine: ray}\n"
        f"checkpoint: {{storage: {storage}}}\n"
    )
    (tmp_path / "rd.yaml").write_text(job + f"scaling: {{num_workers: 1, cpus_per_worker: {os.cpu_count()}}}\n")
    (tmp_path / "sweep.yaml").write_text(
        job + "sweep: {parameters: {optim.lr: {type: loguniform, low: 0.001, high: 0.1}}, num_samples: 2}\n"
    )
    run, sweep = run_many([["run", str(tmp_path / "rd.yaml")], ["sweep", str(tmp_path / "sweep.yaml")]], tmp_path)
    # Ray Data's read tasks would wait for a CPU forever (the workers, or Tune's trials, hold them all):
    # refused in one line, before Ray starts or anything is written.
    assert_one_line(
        run, f"data.engine: ray reads on CPUs the workers leave free, and 1 worker(s) x {os.cpu_count()} CPU leave 0"
    )
    assert_one_line(sweep, "data.engine: ray is for `orchestrator run`; sweep and cv trials read parquet natively")
    assert not storage.exists()


def test_the_harness_sees_what_a_user_sees(tmp_path):
    """A few cases as a user runs them: `python -m orchestrator ...`, one process each."""
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "empty.yaml").write_bytes(b"")
    env = clean_env(tmp_path)
    for args, fragment in [
        (["validate", "binary.yaml"], "binary.yaml: not a UTF-8 text file"),
        (["validate", "empty.yaml"], "empty.yaml: the job file is empty"),
        (["status", "", "--address", "http://127.0.0.1:9"], "an empty job id: not a job id"),
        (["validate", "empty.yaml", f"checkpoint.storage=s3://u:{SECRET}@b/x"], "empty.yaml: the job file is empty"),
    ]:
        proc = run_command([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env=env, timeout=60)
        assert_one_line({"args": args, "code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}, fragment)


# ----------------------------------------------------------------------------------------------
# Secrets in URIs: refused where a job file or argument holds them, redacted wherever one passes through


@pytest.mark.parametrize(
    "text, shown",
    [
        ("s3://user:password@bucket/x", "s3://bucket/x"),
        ("http://user:p@ss@host:5000/a?b=1", "http://host:5000/a?b=1"),
        (
            "https://h/x?X-Amz-Credential=AKIA&X-Amz-Signature=ab12&X-Amz-Security-Token=tt&ok=1",
            "https://h/x?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&ok=1",
        ),
        ("https://h/x?password=pw#frag", "https://h/x?password=***#frag"),
        ("error: 'http://u:pw@h/?token=abc': no", "error: 'http://h/?token=***': no"),
        ("a key metric val_loss=0.3 at s3://b/x", "a key metric val_loss=0.3 at s3://b/x"),  # text, not a query
        ("sqlite:////tmp/m.db", "sqlite:////tmp/m.db"),
    ],
)
def test_redact_hides_user_info_and_query_credentials_only(text, shown):
    from orchestrator.storage import redact

    assert redact(text) == shown
    assert redact(shown) == shown  # idempotent: a line redacted twice reads the same


def test_uris_with_credentials_are_refused_in_one_line_without_the_secret(tiny_job, tmp_path):
    job, storage = tiny_job
    s3 = f"s3://alice:{SECRET}@bucket/runs"
    dashboard = f"http://alice:{SECRET}@127.0.0.1:9"
    results = run_many(
        [
            ["run", str(job), f"checkpoint.storage={s3}"],
            ["k8s", "render", str(job), f"tracking.mlflow.tracking_uri=http://alice:{SECRET}@mlflow:5000"],
            ["k8s", "render", str(job), f"checkpoint.endpoint_url=http://alice:{SECRET}@minio:9000"],
            ["checkpoints", f"{s3}/tiny"],
            ["runs", s3],
            ["report", f"{s3}/tiny"],
            ["export", f"{s3}/tiny/checkpoint_1", "--out", str(tmp_path / "w.safetensors")],
            ["status", "some-job", "--address", dashboard],
            ["submit", str(job), "--address", dashboard],
        ],
        tmp_path,
        timeout=300,
    )
    assert_one_line(results[0], "checkpoint.storage: 's3://bucket/runs': credentials do not belong in a job file")
    assert_one_line(results[1], "tracking.mlflow.tracking_uri: 'http://mlflow:5000': credentials do not belong")
    assert_one_line(results[2], "checkpoint.endpoint_url: 'http://minio:9000': credentials do not belong")
    for result in results[3:7]:
        assert_one_line(result, "s3://bucket/runs")
    assert_one_line(results[7], "--address http://127.0.0.1:9: no Ray dashboard answers there")
    assert_one_line(results[8], "http://127.0.0.1:9")
    assert not (storage / "tiny").exists() and not (tmp_path / "w.safetensors").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("mlflow")  # the MLflow server starts once, in the worker that runs every test of it
def test_a_tracking_uri_with_credentials_from_the_environment_is_stored_and_shown_without_them(
    tiny_job, mlflow_server, tmp_path
):
    """A real run against a real MLflow server reached as http://alice:<secret>@host: the secret is in no output or file."""
    job, storage = tiny_job
    port = mlflow_server.uri.rsplit(":", 1)[1]
    env = {**clean_env(tmp_path), "MLFLOW_TRACKING_URI": f"http://alice:{SECRET}@127.0.0.1:{port}"}
    proc = run_command(
        [sys.executable, "-m", "orchestrator", "run", str(job), "tracking.mlflow={}", "--json"],
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["status"] == "finished"
    run_dir = storage / "tiny"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["tracking"]["mlflow"]["tracking_uri"] == f"http://127.0.0.1:{port}"
    assert (run_dir / "report.html").is_file() and (run_dir / "run.log").is_file()
    assert SECRET not in proc.stdout + proc.stderr
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_the_command_line_kept_in_run_json_is_redacted(monkeypatch):
    from orchestrator.runrecord import RunRecord

    monkeypatch.setattr(
        sys, "argv", ["orchestrator", "run", "j.yaml", "--ray-address", f"ray://bob:{SECRET}@head:10001"]
    )
    record = RunRecord.begin("r", {})
    assert record.command == ["orchestrator", "run", "j.yaml", "--ray-address", "ray://head:10001"]


def test_runs_shows_names_as_written_not_as_markup(tmp_path):
    storage = tmp_path / "runs"
    for name in ("[red]x", "[link=x]y"):
        (storage / name).mkdir(parents=True)
        record = {"run": name, "status": "[bold]finished", "started": "2026-01-01T00:00:00", "job": {}}
        (storage / name / "run.json").write_text(json.dumps(record))
    (result,) = run_many([["runs", str(storage)]], tmp_path)
    assert result["code"] == 0, result
    out = result["stdout"]
    assert "[red]x" in out and "[link=x]y" in out and "[bold]finished" in out, out


# ----------------------------------------------------------------------------------------------
# Secrets in free-form fields: refused when the job is read, so that none reaches what a run stores or
# renders (run.json, report.html, each checkpoint's job.yaml, the ConfigMap, MLflow params, a sweep's records)


FREE_FORM_SECRETS = [
    (f"config.db_url=postgres://alice:{SECRET}@db/x", "config.db_url: 'postgres://db/x': credentials do not belong"),
    (f"data.options.url=https://h/x?token={SECRET}", "data.options.url: 'https://h/x?token=***': credentials do not"),
    (f"model.options.password={SECRET}", "model.options.password: holds a secret (its key 'password' names one)"),
    ("config.note=key AKIAIOSFODNN7EXAMPLE here", "config.note: holds an AWS access key id"),
    (f"config.servers=[a, 'https://bob:{SECRET}@h']", "config.servers.1: 'https://h': credentials do not belong"),
]


def test_secrets_in_free_form_fields_are_refused_by_every_command_that_would_store_or_render_them(tiny_job, tmp_path):
    job, storage = tiny_job
    (tmp_path / "sweep.yaml").write_text(
        "job: tiny.yaml\nsweep: {parameters: {optim.lr: {type: loguniform, low: 0.001, high: 0.1}}, num_samples: 2}\n"
    )
    address = ["--address", "http://127.0.0.1:9"]  # nothing listens: a case that got past the check would say so
    commands = [
        ["run", str(job)],
        ["k8s", "render", str(job)],
        ["submit", str(job), *address],
        ["sweep", str(tmp_path / "sweep.yaml")],
        ["cv", str(job), "data.folds=2"],
        ["validate", str(job)],
    ]
    cases = [[*command, override] for override, _ in FREE_FORM_SECRETS for command in commands]
    results = run_many(cases, tmp_path, timeout=300)
    for i, result in enumerate(results):
        assert_one_line(result, FREE_FORM_SECRETS[i // len(commands)][1])
        assert result["stdout"] == "", result  # no manifest rendered, no run started
    assert not storage.exists(), list(storage.rglob("*"))
    assert [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()] == []


@pytest.mark.parametrize(
    "key, value, verdict",
    [
        ("password", "hunter2", "a secret (its key 'password' names one)"),
        ("dbPassword", "x", "a secret (its key 'dbPassword' names one)"),
        ("api_token", "Zf3D0LXCM3EIMbgJpUNnkRtOfOueHznB", "a secret (a random-looking value of 'api_token')"),
        ("note", "-----BEGIN OPENSSH PRIVATE KEY-----", "a private key"),
        ("note", "ghp_" + "a1B2" * 9, "a GitHub token"),
        # Look-alikes that are not secrets: names of variables and files holding them, tokenizers, special tokens.
        ("password_env", "DB_PASSWORD", None),
        ("password_file", "/run/secrets/db", None),
        ("secret_url", "https://vault/v1/db", None),
        ("tokenizer", "gpt2", None),
        ("token", "gpt2-medium", None),
        ("pad_token", "<|endoftext|>", None),
        ("key", "label", None),
        ("max_tokens", "1024", None),
    ],
)
def test_what_counts_as_a_secret_in_a_job_value(key, value, verdict):
    from orchestrator.secret_rules import secret_in_value

    assert secret_in_value(key, value) == verdict


# ----------------------------------------------------------------------------------------------
# Read commands: what a storage holds may be odd (a malformed record, a FIFO), and the storage may not answer


def test_runs_lists_an_unreadable_record_as_such_and_shows_the_others(tmp_path):
    storage = tmp_path / "runs"
    good = {"run": "good", "status": "finished", "started": "2026-01-01T00:00:00", "job": {}}
    for name, text in [("good", json.dumps(good)), ("torn", '{"run": "torn", "sta'), ("list", "[1, 2]")]:
        (storage / name).mkdir(parents=True)
        (storage / name / "run.json").write_text(text)
    (storage / "fifo").mkdir()
    os.mkfifo(storage / "fifo" / "run.json")  # reading it would wait for a writer for ever
    (storage / "sweep").mkdir()
    (storage / "sweep" / "sweep.json").write_bytes(b"\xff\xfe")
    (result,) = run_many([["runs", str(storage), "--json"]], tmp_path, timeout=60)
    assert result["code"] == 0 and result["stderr"] == "", result
    rows = {r["name"]: r for r in json.loads(result["stdout"].splitlines()[-1])}
    assert rows["good"]["status"] == "finished"
    assert rows["torn"]["status"] == "unreadable (run.json: not JSON (JSONDecodeError))"
    assert rows["list"]["status"] == "unreadable (run.json: not a run record)"
    assert rows["fifo"]["status"] == "unreadable (run.json: not a regular file (a FIFO, socket or device))"
    assert rows["sweep"]["status"] == "unreadable (sweep.json: not JSON (JSONDecodeError))"


def test_fifos_where_files_belong_are_one_line_not_a_hang(tiny_job, tmp_path):
    job, storage = tiny_job
    os.mkfifo(tmp_path / "data.parquet")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "folder" / "part-0.parquet")
    os.mkfifo(tmp_path / "fifo.yaml")
    (storage / "tiny").mkdir(parents=True)
    os.mkfifo(storage / "tiny" / "run.json")
    parquet = ["data.name=parquet", "data.task=classification", "data.features=[a]", "data.label=y"]
    results = run_many(
        [
            ["run", str(job), *parquet, f"data.path={tmp_path / 'data.parquet'}"],
            ["run", str(job), *parquet, f"data.path={tmp_path / 'folder'}"],
            ["validate", str(tmp_path / "fifo.yaml")],
            ["report", str(storage / "tiny"), "--out", str(tmp_path / "r.html")],
        ],
        tmp_path,
        timeout=120,
    )
    assert_one_line(
        results[0], f"data.path: {tmp_path / 'data.parquet'}: not a regular file (a FIFO, socket or device)"
    )
    assert_one_line(results[1], f"data.path: {tmp_path / 'folder' / 'part-0.parquet'}: not a regular file")
    assert_one_line(results[2], "fifo.yaml: not a regular file (a FIFO, socket or device)")
    assert_one_line(results[3], f"{storage / 'tiny' / 'run.json'}: not a regular file")
    assert sorted(p.name for p in storage.rglob("*")) == ["run.json", "tiny"]


def test_read_commands_against_an_endpoint_that_does_not_answer_give_up_in_seconds_in_one_line(tmp_path):
    from ports import free_port

    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
    }
    results = run_many(
        [
            ["checkpoints", "s3://bucket/run"],
            ["runs", "s3://bucket"],
            ["report", "s3://bucket/run"],
            ["export", "s3://bucket/run/checkpoint_1", "--out", str(tmp_path / "w.safetensors")],
        ],
        tmp_path,
        timeout=180,
        env=env,
    )
    for result in results:
        # One line, no line per retry (each was a line; the listing retried for five minutes).
        assert_one_line(result, "cannot reach the storage endpoint")
        assert "s3://bucket" in result["stderr"] and "upload_timeout_s" not in result["stderr"]
        assert result["seconds"] < 20, result
    assert not (tmp_path / "w.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# Data that cannot train: named by file, row group and column, before training or where it is read; never retried


def write_parquet_cases(folder: Path) -> dict[str, Path]:
    """Parquet files of 400 rows in row groups of 100, each wrong in one way."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, y = np.linspace(0, 1, 400), np.arange(400) % 2
    files = {name: folder / f"{name}.parquet" for name in ("null_label", "nan_feature", "null_unstated", "corrupt")}
    pq.write_table(
        pa.table({"a": a, "y": pa.array([None, *y[1:]], pa.int64())}), files["null_label"], row_group_size=100
    )
    pq.write_table(
        pa.table({"a": np.where(np.arange(400) == 250, np.nan, a), "y": y}), files["nan_feature"], row_group_size=100
    )
    # Without statistics in the footer, a missing value shows only when its row group is read.
    unstated = pa.table({"a": pa.array([*a[:300], None, *a[301:]]), "y": y})
    pq.write_table(unstated, files["null_unstated"], row_group_size=100, write_statistics=False)
    pq.write_table(pa.table({"a": a, "y": y}), files["corrupt"], row_group_size=100)
    data = bytearray(files["corrupt"].read_bytes())
    start = pq.read_metadata(files["corrupt"]).row_group(1).column(0).data_page_offset
    data[start + 8 : start + 200] = bytes(b ^ 0x5A for b in data[start + 8 : start + 200])  # its page header and values
    files["corrupt"].write_bytes(bytes(data))
    return files


def parquet_job(folder: Path, name: str, path: Path, workers: int = 0) -> Path:
    job = folder / f"{name}.yaml"
    job.write_text(
        f"name: {name}\n"
        f"data: {{name: parquet, path: {path}, task: classification, features: [a], label: y}}\n"
        f"train: {{epochs: 1, batch_size: 16}}\nscaling: {{num_workers: {workers}}}\n"
        f"failure: {{max_failures: 3}}\ncheckpoint: {{storage: {folder / 'runs'}}}\n"
    )
    return job


def run_to_failure(job: Path, tmp_path: Path) -> dict:
    """`orchestrator run` as a user runs it (a run that starts needs real file descriptors: not the harness)."""
    proc = run_command(
        [sys.executable, "-m", "orchestrator", "run", str(job)], cwd=tmp_path, env=clean_env(tmp_path), timeout=300
    )
    return {"args": [str(job)], "code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def assert_failed_on_data(result: dict, fragment: str, run_dir: Path) -> None:
    """Exit 1 after one attempt, the one error line naming the file, row group and column."""
    assert result["code"] == 1, result
    assert "Traceback" not in result["stderr"] + result["stdout"]
    errors = [line.strip() for line in (result["stderr"] + result["stdout"]).splitlines() if "error: " in line]
    assert len(errors) == 1 and fragment in errors[0] and "restart" not in errors[0], errors
    assert json.loads((run_dir / "run.json").read_text())["attempts"] == 1


def test_missing_values_in_a_parquet_footer_are_refused_before_anything_starts(tmp_path):
    files = write_parquet_cases(tmp_path)
    (result,) = run_many([["run", str(parquet_job(tmp_path, "null_label", files["null_label"]))]], tmp_path)
    assert_one_line(
        result, f"data.label: column 'y' of {files['null_label']} has 1 missing value(s) in row group 0; every example"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_non_finite_and_missing_values_and_corrupt_pages_are_named_where_read_and_not_retried(tmp_path):
    files = write_parquet_cases(tmp_path)
    runs = tmp_path / "runs"
    for name, fragment in [
        (
            "nan_feature",
            f"data.features: column 'a' of {files['nan_feature']} has 1 value(s) that are NaN or infinite in row group 2",
        ),
        (
            "null_unstated",
            f"data.features: column 'a' of {files['null_unstated']} has 1 missing value(s) in row group 3",
        ),
        ("corrupt", f"data.path: {files['corrupt']}: row group 1, column 'a' cannot be decoded"),
    ]:
        result = run_to_failure(parquet_job(tmp_path, name, files[name]), tmp_path)
        assert_failed_on_data(result, f"DataError: {fragment}", runs / name)


@pytest.mark.slow
def test_a_corrupt_page_on_a_ray_worker_fails_the_run_once_not_as_a_dead_worker(tmp_path):
    """A Ray worker's OSError from a page that does not decode was taken for a lost connection and retried 3 times."""
    files = write_parquet_cases(tmp_path)
    result = run_to_failure(parquet_job(tmp_path, "corrupt", files["corrupt"], workers=1), tmp_path)
    assert_failed_on_data(
        result,
        f"DataError: data.path: {files['corrupt']}: row group 1, column 'a' cannot be decoded",
        tmp_path / "runs" / "corrupt",
    )
