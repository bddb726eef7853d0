"""Shared fixtures: a real S3 server (moto in server mode on a free loopback port) and helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]

# A test suite reports no usage stats to Ray, its `ray start` clusters included (an embedded Ray reports none
# anyway: `ray.init` turns them off for a Ray it starts). A test that clears RAY_* from a command's environment
# runs it as a user's default is.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One intra-op thread per process, as Ray gives a 1-CPU worker: two xdist workers already keep both cores busy,
# and torch's second thread on the tests' tiny models costs CPU without shortening a step (the default job in local
# mode: 0.75x the CPU, 0.89x the wall with one thread). Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first, in their files' order, then the rest.

    The suite keeps two cores busy, so it lasts as long as its two xdist workers' work: a long test handed
    out last runs alone while the other worker has nothing left (in collection order the sweep tests came
    near the end). Longest first leaves the quick tests to even out the two workers' ends. pytest-xdist
    still hands out the groups (xdist_group) first, by their number of tests; they hold slow tests too.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


class S3Server:
    """moto's S3 server in its own process, so a test can stop and restart it like a real outage."""

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@pytest.fixture(scope="module")
def ray_local():
    """An in-process Ray for a test module (its tests in one xdist group); left running if another test started it."""
    import logging

    import ray  # here, not at the top: most test modules never start a Ray in their own process

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the whole session; AWS_* variables point at it (fake credentials)."""
    server = S3Server(free_port())
    server.start()
    old = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=server.endpoint,
    )
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket on the session's S3 server."""
    name = "b-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    name = f"{name}-{int(time.time() * 1000) % 100000}"
    s3_server.client().create_bucket(Bucket=name)
    return name


class TcpProxy:
    """A loopback TCP proxy that a test can cut and restore: the storage service goes away and comes back with its data."""

    def __init__(self, target_port: int):
        import threading

        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._threads: list = []
        self.open_now = 0
        self.peak = 0  # most connections open to the server at once: how many requests ran together

    def start(self) -> None:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        t = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        """Connect a client to the server and pipe both ways, counting the connections open at once."""
        import threading

        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        with self._lock:
            self._conns += [client, upstream]
            self.open_now += 1
            self.peak = max(self.peak, self.open_now)
        threading.Thread(target=self._pipe_counted, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe_counted(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            self._pipe(client, upstream)
        finally:
            with self._lock:
                self.open_now -= 1

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        """Refuse new connections and cut the open ones mid-transfer."""
        if self._listener:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


class FaultyProxy(TcpProxy):
    """A TcpProxy whose next connections fail the way a sick S3 fails, then heal: each of the next
    `count` connections gets `fault` instead of the server.

    - "503": reads the request and answers `503 SlowDown` (S3's throttling answer) and closes;
    - "reset": reads the request and resets the connection (RST, no answer);
    - "blackhole": accepts, reads and never answers (until the proxy stops).
    """

    def __init__(self, target_port: int):
        super().__init__(target_port)
        self.fault: str | None = None
        self.remaining = 0
        self.faulted = 0
        self._held: list[socket.socket] = []

    def inject(self, fault: str, count: int) -> None:
        with self._lock:
            self.fault, self.remaining = fault, count

    def _serve(self, client: socket.socket) -> None:
        import threading

        with self._lock:
            fault = self.fault if self.remaining > 0 else None
            if fault:
                self.remaining -= 1
                self.faulted += 1
        if fault is None:
            super()._serve(client)
        else:
            threading.Thread(target=self._fail, args=(client, fault), daemon=True).start()

    def _fail(self, client: socket.socket, fault: str) -> None:
        import struct

        try:
            client.settimeout(5)
            client.recv(65536)  # the request line and headers: the client is now waiting for an answer
            if fault == "503":
                body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                client.sendall(
                    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                client.close()
            elif fault == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
            else:
                with self._lock:
                    self._held.append(client)
        except OSError:
            client.close()

    def stop(self) -> None:
        super().stop()
        with self._lock:
            held, self._held = self._held, []
        for s in held:
            s.close()


def blackhole() -> tuple[socket.socket, str]:
    """A listening socket that accepts connections (the kernel does) and never answers: (socket, endpoint)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


class MlflowServer:
    """A real `mlflow server` (SQLite backend, proxied artifacts) on a free loopback port, in its own process group."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root}/mlflow.db",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: uvicorn has children
            # No job runner and huey consumers (MLflow's server-side jobs, which no test uses): three fewer
            # processes polling on the two cores the tests share.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )

    def wait_ready(self, timeout: float = 240) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer in {timeout}s: {self.log.read_text()[-2000:]}")

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        import signal

        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(
                timeout=2
            )  # its data is a test's temporary directory: no need to wait out uvicorn's graceful exit
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """An `mlflow server` for the whole session (a module may still define its own)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
