"""Cluster submission without a cluster: addresses, tokens, the rendered Jobs API request, bad input."""

import os
import shlex
import sys
from pathlib import Path

import pytest
from commands import run_command

import orchestrator.cluster as cluster
from orchestrator.cluster import (
    ResultFilter,
    Token,
    build_submission,
    find_token,
    last_result,
    plan_package,
    redact,
    resolve_address,
    result_line,
    summary_from_logs,
    without_results,
)
from orchestrator.errors import BadInput
from orchestrator.spec import build_spec

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = str(Path(cluster.__file__).resolve().parents[1])  # orchestrator/, above the cluster package


def cli(*args, env=None, cwd=None, timeout=60):
    """Run `python -m orchestrator ...` in a clean environment (no Ray address or token of the caller's)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return run_command(
        [sys.executable, "-m", "orchestrator", *args], env={**base, **(env or {})}, cwd=cwd or ROOT, timeout=timeout
    )


# ----------------------------------------------------------------------------------------------
# Address and token


@pytest.mark.parametrize(
    "given, env, expected",
    [
        ("127.0.0.1", {}, "http://127.0.0.1:8265"),
        ("http://head:9000/", {}, "http://head:9000"),
        ("https://ray.example.com", {}, "https://ray.example.com:8265"),
        (None, {"RAY_ADDRESS": "http://a:1"}, "http://a:1"),
        (None, {"RAY_ADDRESS": "http://a:1", "RAY_API_SERVER_ADDRESS": "http://b:2"}, "http://b:2"),
        ("http://c:3", {"RAY_ADDRESS": "http://a:1"}, "http://c:3"),
    ],
)
def test_resolve_address(given, env, expected):
    assert resolve_address(given, env) == expected


@pytest.mark.parametrize(
    "given, fragment",
    [(None, "no cluster given"), ("ray://head:10001", "dashboard's HTTP address"), ("ftp://x:1", "not ftp")],
)
def test_resolve_address_rejects(given, fragment):
    with pytest.raises(BadInput, match=fragment):
        resolve_address(given, {})


def test_token_precedence_env_then_path_then_home(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path = tmp_path / "tok"
    path.write_text("  from-path\n")
    assert find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}, home).value == "from-env"
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home).value == "from-path"
    token = find_token({}, home)
    assert token.value == "from-home" and token.source == str(home / ".ray" / "auth_token")
    assert find_token({}, tmp_path / "nobody") is None


def test_token_path_unreadable_or_empty_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="RAY_AUTH_TOKEN_PATH: cannot read"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(BadInput, match="is empty"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, tmp_path)


def test_token_value_never_shows():
    token = Token("s3cr3t-value", "RAY_AUTH_TOKEN")
    assert "s3cr3t" not in repr(token) and "s3cr3t" not in str(token) and "s3cr3t" not in f"{token}"
    assert token.header() == {"Authorization": "Bearer s3cr3t-value"}
    assert redact("echo: s3cr3t-value!", token) == "echo: ***!"


# ----------------------------------------------------------------------------------------------
# The package and the rendered request


def make_job_dir(root: Path, storage: str, **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo_loop.py").write_text("def train(config):\n    pass\n")
    (root / "data").mkdir()
    (root / "data" / "small.csv").write_text("x,y\n1,2\n")
    (root / "data" / "big.bin").write_bytes(b"\0" * 5000)
    for junk in (".git/objects/pack", "__pycache__", "runs/old", "lib/__pycache__"):
        (root / junk).mkdir(parents=True)
        (root / junk / "f").write_bytes(b"\0" * 100_000)
    (root / "weights.safetensors").write_bytes(b"\0" * 100_000)
    (root / "notes.txt").write_text("private")
    (root / ".rayignore").write_text("notes.txt\n")
    (root / "lib" / "helper.py").write_text("X = 1\n")
    lines = ["name: demo", "entrypoint: demo_loop:train", "checkpoint:", f"  storage: {storage}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    (root / "job.yaml").write_text("\n".join(lines) + "\n")
    return root / "job.yaml"


def test_build_submission_golden(tmp_path):
    job = make_job_dir(tmp_path / "proj", "/shared/runs")
    spec = build_spec({"name": "demo", "entrypoint": "demo_loop:train", "checkpoint": {"storage": "/shared/runs"}})
    sub = build_submission(
        spec, job, ["config.msg=hello world", "train.epochs=2"], submission_id="demo-abc123", max_file_bytes=1000
    )
    job_dir = str((tmp_path / "proj").resolve())
    assert sub == {
        "submission_id": "demo-abc123",
        "entrypoint": "python -m orchestrator run job.yaml 'config.msg=hello world' train.epochs=2 --ray-address auto --json",
        "runtime_env": {
            "working_dir": job_dir,
            "excludes": list(cluster.DEFAULT_EXCLUDES) + ["/data/big.bin"],
            "env_vars": {"PYTHONUNBUFFERED": "1"},
            "py_modules": [PACKAGE_DIR],
        },
        "metadata": {
            "orchestrator_run": "demo",
            "orchestrator_job_file": "job.yaml",
            "orchestrator_storage": "/shared/runs",
        },
        # job.yaml, demo_loop.py, data/small.csv, lib/helper.py, .rayignore: the junk and notes.txt stay home
        "package": {
            "dir": job_dir,
            "files": 5,
            "bytes": sub["package"]["bytes"],
            "left_out": ["data/big.bin"],
            "withheld": [],
        },
        "warnings": ["not shipped: data/big.bin (0.0 MB, over 0.0 MB); put big files on storage the cluster reads"],
    }
    assert sub["package"]["bytes"] < 1000
    # The cluster parses back exactly the words this machine validated.
    assert shlex.split(sub["entrypoint"])[4:7] == ["job.yaml", "config.msg=hello world", "train.epochs=2"]


def test_submission_id_is_run_name_plus_suffix(tmp_path):
    job = make_job_dir(tmp_path / "p", "/shared/runs")
    spec = build_spec({"name": "demo", "checkpoint": {"storage": "/shared/runs"}})
    ids = {build_submission(spec, job)["submission_id"] for _ in range(5)}
    assert len(ids) == 5 and all(i.startswith("demo-") and len(i) == len("demo-") + 6 for i in ids)


def test_package_over_the_limit_names_directory_and_size(tmp_path):
    job = make_job_dir(tmp_path / "p", "/shared/runs")
    (tmp_path / "p" / "data" / "many").mkdir()
    for i in range(30):
        (tmp_path / "p" / "data" / "many" / f"{i}.npy").write_bytes(b"\0" * 900)
    spec = build_spec({"checkpoint": {"storage": "/shared/runs"}})
    with pytest.raises(BadInput) as err:
        build_submission(spec, job, max_package_bytes=20_000, max_file_bytes=1000)
    assert (
        str((tmp_path / "p").resolve()) in str(err.value)
        and "0.0 MB in 35 files" in str(err.value)
        and "limit" in str(err.value)
    )


def test_relative_storage_is_refused(tmp_path):
    job = make_job_dir(tmp_path / "p", "runs")
    with pytest.raises(BadInput, match=r"checkpoint.storage: 'runs' is relative"):
        build_submission(build_spec({}), job)


def test_storage_inside_the_job_dir_is_not_shipped(tmp_path):
    job = make_job_dir(tmp_path / "p", "x")
    store = tmp_path / "p" / "out"
    (store / "demo" / "checkpoint_1").mkdir(parents=True)
    (store / "demo" / "checkpoint_1" / "metrics.jsonl").write_bytes(b"\0" * 20_000)
    sub = build_submission(build_spec({"checkpoint": {"storage": str(store)}}), job, max_file_bytes=50_000)
    assert "/out/" in sub["runtime_env"]["excludes"] and sub["package"]["bytes"] < 10_000


def test_data_too_large_to_ship_is_bad_input(tmp_path):
    job = make_job_dir(tmp_path / "p", "/shared/runs")
    spec = build_spec(
        {
            "data": {"name": "parquet", "path": "data/big.bin", "task": "regression", "features": ["a"], "label": "y"},
            "checkpoint": {"storage": "/s"},
        }
    )
    with pytest.raises(BadInput, match=r"data.path: data/big.bin is 0.0 MB, too large to ship"):
        build_submission(spec, job, max_file_bytes=1000)


def test_user_code_left_out_of_the_package_is_bad_input(tmp_path):
    job = make_job_dir(tmp_path / "p", "/shared/runs")
    (tmp_path / "p" / ".rayignore").write_text("demo_loop.py\n")
    spec = build_spec({"entrypoint": "demo_loop:train", "checkpoint": {"storage": "/s"}})
    with pytest.raises(BadInput, match=r"entrypoint: demo_loop.py is excluded from the package"):
        build_submission(spec, job)


def test_gitignore_patterns_apply_in_subdirectories(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / ".gitignore").write_text("*.log\nb/\n")
    (tmp_path / "a" / "x.log").write_text("1")
    (tmp_path / "a" / "keep.py").write_text("1")
    (tmp_path / "a" / "b" / "y.py").write_text("1")
    (tmp_path / "top.log").write_text("1")
    plan = plan_package(tmp_path, [])
    assert (
        not plan.ships("a/x.log") and not plan.ships("a/b/y.py") and plan.ships("a/keep.py") and plan.ships("top.log")
    )


def test_gitignore_follows_gits_rules_negation_double_star_and_anchoring(tmp_path):
    (tmp_path / ".gitignore").write_text("*.log\n!keep.log\n/build/\n**/tmp/\n# a comment\n")
    (tmp_path / "sub" / ".gitignore").parent.mkdir()
    (tmp_path / "sub" / ".gitignore").write_text("!again.log\n")
    for rel in ("x.log", "a/keep.log", "a/y.log", "build/out.bin", "a/build/src.py", "a/b/tmp/t.txt", "sub/again.log"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("1")
    plan = plan_package(tmp_path, [])
    shipped = {rel: plan.ships(rel) for rel in ("x.log", "a/keep.log", "a/y.log", "build", "a/build/src.py")}
    assert shipped == {"x.log": False, "a/keep.log": True, "a/y.log": False, "build": False, "a/build/src.py": True}
    assert not plan.ships("a/b/tmp/t.txt")  # `**/tmp/` at any depth
    assert plan.ships("sub/again.log")  # a deeper ignore file re-includes what a shallower one ignored


SECRETS = [".env", ".env.production", ".aws/credentials", ".ssh/id_rsa", "certs/server.pem", "tls.key", "sub/.netrc"]


def make_secrets(root: Path) -> None:
    for rel in SECRETS + ["id_ed25519"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("AKIA-SECRET-VALUE\n")


def test_secret_looking_files_are_withheld_named_and_shippable_on_request(tmp_path):
    job = make_job_dir(tmp_path / "p", "/shared/runs")
    make_secrets(tmp_path / "p")
    spec = build_spec({"name": "demo", "entrypoint": "demo_loop:train", "checkpoint": {"storage": "/shared/runs"}})
    sub = build_submission(spec, job)
    withheld = sub["package"]["withheld"]
    assert withheld == sorted(
        [".aws", ".env", ".env.production", ".ssh", "certs/server.pem", "id_ed25519", "sub/.netrc", "tls.key"]
    )
    assert all(f"/{rel}" in sub["runtime_env"]["excludes"] for rel in withheld)
    assert "warning" not in " ".join(sub["warnings"])  # the CLI adds the prefix
    assert "not shipped: .env (looks like a secret); --include '.env' ships it" in sub["warnings"]
    again = build_submission(spec, job, includes=[".env", "*.pem"])
    assert ".env" not in again["package"]["withheld"] and "certs/server.pem" not in again["package"]["withheld"]
    assert ".aws" in again["package"]["withheld"]


def test_links_out_of_the_directory_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"\0" * 50_000)
    job = make_job_dir(tmp_path / "p", "/shared/runs")
    root = tmp_path / "p"
    (root / "etc").symlink_to("/etc")
    (root / "big.bin").symlink_to(outside / "big.bin")
    (root / "loop").symlink_to(root)
    (root / "dangling").symlink_to(tmp_path / "nothing-here")
    (root / "helper_link.py").symlink_to(root / "lib" / "helper.py")  # a file inside: it ships
    spec = build_spec({"name": "demo", "entrypoint": "demo_loop:train", "checkpoint": {"storage": "/shared/runs"}})
    sub = build_submission(spec, job, max_file_bytes=1000)
    assert sub["package"]["withheld"] == ["big.bin", "dangling", "etc", "loop"]
    assert sub["package"]["bytes"] < 1000 and sub["package"]["files"] == 6
    reasons = " ".join(sub["warnings"])
    assert "etc (a link out of the directory, to /etc)" in reasons and "loop (a link to a directory" in reasons


def test_ray_zips_exactly_what_the_plan_ships(tmp_path):
    """Ray's own packaging (the zip the Jobs API uploads) with the submission's excludes: no secret, no link target."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import create_package

    job = make_job_dir(tmp_path / "p", "/shared/runs")
    root = tmp_path / "p"
    make_secrets(root)
    (root / "etc").symlink_to("/etc")
    (root / "loop").symlink_to(root)
    (root / "odd [1].py").write_text("X = 1\n")
    (root / "odd [1].key").write_text("AKIA-SECRET-VALUE\n")
    spec = build_spec({"name": "demo", "entrypoint": "demo_loop:train", "checkpoint": {"storage": "/shared/runs"}})
    sub = build_submission(spec, job, max_file_bytes=1000)
    zipped = tmp_path / "pkg.zip"
    create_package(str(root), zipped, include_gitignore=True, excludes=sub["runtime_env"]["excludes"])
    with ZipFile(zipped) as z:
        files = {n.rstrip("/") for n in z.namelist() if not n.endswith("/")}
        contents = b"".join(z.read(n) for n in z.namelist() if not n.endswith("/"))
    assert b"AKIA-SECRET-VALUE" not in contents
    assert not [f for f in files if f.startswith(("etc/", "loop/", ".aws/", ".ssh/"))], files
    assert files == {"job.yaml", "demo_loop.py", "data/small.csv", "lib/helper.py", ".rayignore", "odd [1].py"}
    assert len(files) == sub["package"]["files"]


# Secret files by name (each with a marker no zip may hold), by contents under innocent names, and links to both.
SECRET_FILES = {
    ".env": "DB_PASSWORD=pw-MARK01",
    "prod.env": "TOKEN=MARK02",
    ".s3cfg": "[default]\nsecret_key = MARK03",
    ".boto": "[Credentials]\nMARK04",
    "secrets.toml": "db = 'MARK05'",
    "terraform.tfstate": '{"outputs": "MARK06"}',
    ".vault-token": "s.MARK07",
    ".htpasswd": "alice:$apr1$MARK08",
    "ID_RSA": "MARK09",
    ".bash_history": "mysql -p MARK10",
    "service-account.json": '{"project_id": "MARK11"}',
    "sub/.ssh/id_ed25519": "MARK12",
    # innocent names, secret contents
    "notes/setup.md": "-----BEGIN RSA PRIVATE KEY-----\nMARK13\n-----END RSA PRIVATE KEY-----\n",
    "gcp.json": '{"type": "service_account", "client_email": "MARK14"}',
    "settings.ini": "[api]\napi_token = Zf3D0LXCM3EIMbgJpUNnkRtOfOueHznB  # MARK15\n",
    "conf.py": 'ACCESS = "AKIAIOSFODNN7EXAMPLE"  # MARK16\n',
}
# Links inside the directory to secrets: Ray's zip follows them, so the contents would go out under these names.
SECRET_LINKS = {"innocent.txt": ".env", "deploy_key": "sub/.ssh/id_ed25519", "readme.md": "notes/setup.md"}
# Names and contents that only look like secrets: they ship.
LOOK_ALIKES = {
    "environment.py": 'import os\nTOKEN_VAR = "HF_TOKEN"\npassword = os.environ["DB_PASSWORD"]\n',
    "tokenizer.json": '{"pad_token": "<pad>", "eos_token": "</s>"}',
    "keys.py": 'KEYS = ["label", "weight"]\n',
    "monkey.txt": "not a key",
    ".env.example": "DB_PASSWORD=\n",
    "secret_santa.md": "who gives to whom",
    "env.yaml": "python: 3.11\n",
    "tokens/vocab.txt": "a\nb\n",
}


def test_the_zip_ray_uploads_holds_no_secret_by_name_contents_or_link(tmp_path):
    """Ray's own packaging of the job directory, with the submission's excludes: no secret, whichever way it hides."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import create_package

    job = make_job_dir(tmp_path / "p", "/shared/runs")
    root = tmp_path / "p"
    for rel, text in {**SECRET_FILES, **LOOK_ALIKES}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for link, target in SECRET_LINKS.items():
        (root / link).symlink_to(root / target)
    (root / "helper_link.py").symlink_to(root / "lib" / "helper.py")  # a link to a plain file still ships
    spec = build_spec({"name": "demo", "entrypoint": "demo_loop:train", "checkpoint": {"storage": "/shared/runs"}})
    sub = build_submission(spec, job, max_file_bytes=1000)
    zipped = tmp_path / "pkg.zip"
    create_package(str(root), zipped, include_gitignore=True, excludes=sub["runtime_env"]["excludes"])
    with ZipFile(zipped) as z:
        files = {n for n in z.namelist() if not n.endswith("/")}
        contents = b"".join(z.read(n) for n in files)
    assert [m for m in (f"MARK{i:02}".encode() for i in range(1, 17)) if m in contents] == []
    shipped = {"job.yaml", "demo_loop.py", "data/small.csv", "lib/helper.py", ".rayignore", "helper_link.py"}
    assert files == shipped | set(LOOK_ALIKES)
    assert set(sub["package"]["withheld"]) == {".env", "prod.env", ".s3cfg", ".boto", "secrets.toml"} | {
        "terraform.tfstate",
        ".vault-token",
        ".htpasswd",
        "ID_RSA",
        ".bash_history",
        "service-account.json",
        "sub/.ssh",
    } | {"notes/setup.md", "gcp.json", "settings.ini", "conf.py"} | set(SECRET_LINKS)
    warnings = "\n".join(sub["warnings"])
    assert (
        "not shipped: innocent.txt (a link to .env, which looks like a secret); --include 'innocent.txt' ships it"
        in warnings
    )
    assert "not shipped: notes/setup.md (holds a private key); --include 'notes/setup.md' ships it" in warnings
    assert "not shipped: conf.py (holds an AWS access key id)" in warnings
    # The user decides: what --include names ships.
    again = build_submission(spec, job, max_file_bytes=1000, includes=["innocent.txt", "conf.py"])
    assert not {"innocent.txt", "conf.py"} & set(again["package"]["withheld"])


def test_summary_from_logs_takes_the_last_run_summary():
    logs = 'noise\n{"not": "a summary"}\n{"run": "r", "status": "finished", "steps": 3}\nWebSocket closed\n'
    assert summary_from_logs(logs) == {"run": "r", "status": "finished", "steps": 3}
    assert summary_from_logs("nothing here\n") is None
    assert summary_from_logs(f"a\n{result_line({'run': 'm', 'status': 'failed'})}\nb\n") == {
        "run": "m",
        "status": "failed",
    }


def test_logs_read_by_a_person_leave_out_result_lines_whole_or_in_chunks():
    cv = {"cv": "digits-cv", "folds": [{"fold": i, "metrics": {"val_loss": 0.5}} for i in range(40)]}
    logs = (
        'sweep digits-cv: 2 trial(s)\n{"not": "a result"}\n'
        f"{result_line(cv)}\nfinished: cv digits-cv\n"
        '{"run": "r", "status": "finished"}\n  record: cv.json\n'
    )
    shown = 'sweep digits-cv: 2 trial(s)\n{"not": "a result"}\nfinished: cv digits-cv\n  record: cv.json\n'
    assert without_results(logs) == shown
    assert last_result(logs, "cv") == cv and last_result(logs, "sweep") is None
    for size in (1, 7, 100, len(logs)):  # a stream cut anywhere, a result line across chunks included
        stream = ResultFilter()
        out = "".join(stream.feed(logs[i : i + size]) for i in range(0, len(logs), size)) + stream.close()
        assert out == shown, size
    partial = ResultFilter()
    assert partial.feed("step 3/10  loss") == "step 3/10  loss"  # a line that cannot be a result is not held back


def test_format_status_says_what_to_do_after_a_failure():
    job = {
        "submission_id": "demo-1",
        "status": "FAILED",
        "message": "Job entrypoint command failed with exit code -9",
        "start_time": 100.0,
        "end_time": 172.0,
        "entrypoint": "python -m orchestrator run job.yaml",
        "run": "demo",
        "storage": "/s",
    }
    text = cluster.format_status(job)
    assert text.splitlines()[0] == "demo-1  FAILED  (ran 1m12s)"
    assert "exit code -9" in text and "submitting the job again resumes run demo" in text


# ----------------------------------------------------------------------------------------------
# The command line: bad input is one line and exit 2, before anything is sent


def test_submit_invalid_job_file_exits_2_before_contacting_the_cluster(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("name: x\noptim:\n  lrr: 0.1\n")
    out = cli("submit", str(job), "--address", "http://127.0.0.1:1")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "error: optim.lrr: unknown field (did you mean 'lr'?)"


def test_submit_without_address_exits_2(tmp_path):
    job = make_job_dir(tmp_path / "p", "/shared/runs")
    out = cli("submit", str(job))
    assert out.returncode == 2 and "--address: no cluster given" in out.stderr


def test_unreachable_address_exits_2_with_one_line(tmp_path):
    job = make_job_dir(tmp_path / "p", str(tmp_path / "store"))
    for args in (["submit", str(job)], ["status", "x"], ["list"]):
        out = cli(*args, env={"RAY_ADDRESS": "http://127.0.0.1:1"})
        assert out.returncode == 2, out.stderr
        assert (
            out.stderr.strip()
            == "error: --address http://127.0.0.1:1: no Ray dashboard answers there (ConnectionError); is the cluster up, and is this the dashboard port (default 8265)?"
        )


def test_submit_missing_user_code_exits_2(tmp_path):
    job = make_job_dir(tmp_path / "p", str(tmp_path / "store"))
    job.write_text(job.read_text().replace("demo_loop:train", "no_such_module_here:train"))
    out = cli("submit", str(job), "--address", "http://127.0.0.1:1")
    assert out.returncode == 2
    assert (
        out.stderr.startswith("error: entrypoint: cannot import 'no_such_module_here")
        and len(out.stderr.strip().splitlines()) == 1
    )


def test_fresh_submission_asks_the_run_for_a_new_name(tmp_path):
    job = make_job_dir(tmp_path / "p", "/shared/runs")
    spec = build_spec({"checkpoint": {"storage": "/shared/runs"}})
    assert build_submission(spec, job, fresh=True)["entrypoint"].endswith("--ray-address auto --json --fresh")
    assert "--fresh" not in build_submission(spec, job)["entrypoint"]
