"""One retry policy with a deadline, against a real S3 server: what cannot heal fails on the first
attempt with one line; what can heal is retried until checkpoint.upload_timeout_s; a silent endpoint
fails within it."""

from __future__ import annotations

import logging
import os
import sys
import time

import pytest
from commands import run_command
from conftest import ROOT, FaultyProxy, S3Server, blackhole
from ports import free_port

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.errors import BadInput
from orchestrator.storage import StorageError

# One xdist worker for the module: its tests share one S3 server that checks credentials.
pytestmark = pytest.mark.xdist_group("storage_policy")

FILES = {ckpt.WEIGHTS: b"w" * 1000, "state.pt": b"s" * 100}


def retries_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "orchestrator.storage" and "retry" in r.getMessage()]


@pytest.fixture(scope="module")
def auth_server():
    """A second moto server that checks signatures and IAM policies (INITIAL_NO_AUTH_ACTION_COUNT), with one
    user that has keys and no permission: (server, (key id, secret), bucket)."""
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # the three set-up calls below, then every call is checked
    server = S3Server(free_port())
    try:
        server.start()
    finally:
        del os.environ["INITIAL_NO_AUTH_ACTION_COUNT"]
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    server.client().create_bucket(Bucket="guarded")
    yield server, (key["AccessKeyId"], key["SecretAccessKey"]), "guarded"
    server.stop()


def test_missing_bucket_fails_on_the_first_attempt(s3_server, caplog):
    fs, root = storage.open_storage("s3://no-such-bucket-policy/runs/r", timeout_s=60)
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError) as err:
        ckpt.commit_checkpoint(fs, root, 1, 0, FILES, {})
    assert str(err.value).startswith("s3://no-such-bucket-policy/runs/r/checkpoint_00000001/")
    assert str(err.value).endswith(": the bucket does not exist")
    assert "\n" not in str(err.value)
    assert retries_logged(caplog) == []
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-policy/runs/r: the bucket does not exist$"):
        ckpt.list_checkpoints(fs, root)  # not "no checkpoints": the bucket itself is missing


@pytest.mark.parametrize(
    "which, reason",
    [
        ("unknown key", r"the access key is not known to the storage \(InvalidAccessKeyId"),
        ("wrong secret", r"the secret key does not match the access key \(SignatureDoesNotMatch"),
        ("no permission", r"access denied"),
    ],
)
def test_refused_credentials_fail_on_the_first_attempt(auth_server, monkeypatch, caplog, which, reason):
    server, (key_id, secret), bucket = auth_server
    key_id, secret = {
        "unknown key": ("AKIAUNKNOWNUNKNOWN12", "not-the-secret-value"),
        "wrong secret": (key_id, "not-the-secret-value"),
        "no permission": (key_id, secret),
    }[which]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    fs, root = storage.open_storage(f"s3://{bucket}/runs/r", server.endpoint, timeout_s=60)
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match=f"^s3://{bucket}/runs/r/x: {reason}"):
        storage.write_bytes(fs, f"{root}/x", b"x")
    start = time.monotonic()
    # A commit starts with a HEAD, whose 403 has no body to name the code: "access denied", at once.
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match="access denied") as err:
        ckpt.commit_checkpoint(fs, root, 1, 0, FILES, {})
    assert time.monotonic() - start < 5  # goal: an AccessDenied at upload fails in <= 5 s (one request here)
    assert retries_logged(caplog) == []
    assert str(err.value).startswith(f"s3://{bucket}/runs/r/checkpoint_00000001")
    assert secret not in str(err.value) and "\n" not in str(err.value)


def test_preflight_names_the_users_uri_and_never_the_secret(auth_server, monkeypatch):
    server, _, bucket = auth_server
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-value")
    with pytest.raises(BadInput, match=rf"^s3://{bucket}/runs: the access key is not known") as err:
        storage.preflight(f"s3://{bucket}/runs", endpoint_url=server.endpoint)
    assert "super-secret-value" not in str(err.value)


def no_credentials_env(endpoint: str) -> dict[str, str]:
    """The environment of a machine with no AWS credentials anywhere (and no instance metadata to ask)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def test_no_credentials_fail_on_the_first_attempt(s3_server, bucket, monkeypatch, caplog):
    for name, value in no_credentials_env(s3_server.endpoint).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    fs, root = storage.open_storage(f"s3://{bucket}/runs/r", timeout_s=60)
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match="no AWS credentials found") as err:
        ckpt.list_checkpoints(fs, root)
    assert str(err.value).startswith(f"s3://{bucket}/runs/r: ")
    assert retries_logged(caplog) == []


def test_checkpoints_command_without_credentials_is_one_line_and_exit_2(s3_server):
    start = time.monotonic()
    proc = run_command(
        [sys.executable, "-m", "orchestrator", "checkpoints", "s3://some-bucket/run"],
        env={**no_credentials_env(s3_server.endpoint), "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: s3://some-bucket/run: no AWS credentials found "
        "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role)"
    ]
    assert time.monotonic() - start < 30  # was 47 s of retries, then a traceback


def test_a_silent_endpoint_fails_within_the_deadline(caplog):
    listener, endpoint = blackhole()  # accepts (the kernel does) and never answers
    try:
        fs, root = storage.open_storage("s3://bucket/runs/r", endpoint, timeout_s=2)
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"still failing after .* past checkpoint.upload_timeout_s=2 "):
            ckpt.commit_checkpoint(fs, root, 1, 0, {**FILES, "big": os.urandom(4 << 20)}, {})
        assert 1.9 < time.monotonic() - start < 6
        with pytest.raises(StorageError, match="did not answer in time"):
            storage.read_bytes(fs, f"{root}/anything")
    finally:
        listener.close()


@pytest.fixture
def faulty_proxy(s3_server):
    proxy = FaultyProxy(s3_server.port)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_transient_failures_are_retried_until_they_heal(bucket, faulty_proxy, caplog, fault):
    fs, root = storage.open_storage(f"s3://{bucket}/runs/r", faulty_proxy.endpoint, timeout_s=30)
    faulty_proxy.inject(fault, 3)
    with caplog.at_level(logging.WARNING):
        path = ckpt.commit_checkpoint(fs, root, 1, 0, FILES, {"loss": 0.5})
    assert faulty_proxy.faulted == 3 and retries_logged(caplog)
    faulty_proxy.inject(fault, 2)
    info = ckpt.list_checkpoints(fs, root)[-1]
    assert info.path == path and ckpt.read_verified(fs, info) == FILES
    assert faulty_proxy.faulted == 5


def test_transient_failures_past_the_deadline_fail_naming_the_last_reason(bucket, faulty_proxy):
    fs, root = storage.open_storage(f"s3://{bucket}/runs/r", faulty_proxy.endpoint, timeout_s=1.5)
    # The client's session first, under a long deadline: on a busy machine its setup alone (an SSL context
    # built in a thread) took 2.3 s in CI, more than the whole deadline, leaving no time for the retries
    # this test is about.
    fs.orchestrator_timeout_s = 60.0
    storage.write_bytes(fs, f"{root}/warm", b"")
    fs.orchestrator_timeout_s = 1.5
    faulty_proxy.inject("503", 1000)
    start = time.monotonic()
    with pytest.raises(
        StorageError, match=r"past checkpoint.upload_timeout_s=1.5 \(the storage answered SlowDown 503\)"
    ):
        storage.write_bytes(fs, f"{root}/x", b"x")
    assert time.monotonic() - start < 3
    assert faulty_proxy.faulted >= 2  # it did retry, with back-off, until the deadline


def test_classification_of_local_errors():
    import errno

    assert not storage.classify(PermissionError(errno.EACCES, "denied")).transient
    assert not storage.classify(OSError(errno.ENOSPC, "full")).transient
    assert storage.classify(OSError(errno.ESTALE, "stale handle")).transient
    assert storage.classify(ConnectionResetError()).transient
    assert not storage.classify(ValueError("a bug, not an outage")).transient
