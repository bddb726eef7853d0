"""A real Ray cluster on this machine for tests: `ray start` head and worker nodes on loopback addresses.

Every node gets its own free ports, its own --temp-dir and a marker in its environment, so the
test can find, kill and restart exactly its own processes (never `ray stop`, which would stop
every Ray on the machine). Token authentication is on, with a token file of the cluster's own.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ports import free_port, free_port_range

MARKER = "ORCHESTRATOR_TEST_RAY_NODE"
VENV_BIN = str(Path(sys.executable).parent)
WORKER_PORTS = 40  # per node: enough for the workers and actors a test starts on it
SINGLE_PORTS = 7  # per node: one for each component given a port below (six on a worker node, seven on the head)


def pids_with_marker(marker: str) -> list[int]:
    """Processes whose environment carries this node's marker (the node and all it started)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_marked(marker: str, sig: int = signal.SIGKILL, passes: int = 3) -> int:
    """Send `sig` to every process carrying `marker`; up to `passes` passes, since a dying process may still start
    a child. Returns how many processes it signalled."""
    killed: set[int] = set()
    for _ in range(passes):
        pids = [p for p in pids_with_marker(marker) if p not in killed]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return len(killed)


class RayNode:
    """One `ray start` node: its ports, temp dir and processes."""

    def __init__(self, cluster: RayCluster, name: str, num_cpus: int, head: bool):
        self.cluster, self.name, self.num_cpus, self.head = cluster, name, num_cpus, head
        self.marker = f"{cluster.marker}-{name}"
        # Each node its own loopback address, as real nodes have their own IPs. Not 127.0.0.1: Ray
        # swaps that for the host's network address, and these tests stay on loopback.
        self.ip = f"127.0.0.{2 + len(cluster.workers) + (0 if head else 1)}"
        # Short (Ray's unix sockets live under it). The head's is `<root>/ray`, where Ray keeps a cluster's
        # address for `ray.init(address="auto")`: with RAY_TMPDIR=<root> a client finds this cluster as it
        # finds the one `ray start --head` leaves in /tmp/ray (`RayCluster.attach_env`).
        self.temp_dir = str(cluster.root / ("ray" if head else name))

    def command(self) -> list[str]:
        # All of the node's ports from one free range: drawn one by one, a component's port could land in the
        # workers' range (seen: the metrics exporter's), and `ray start` refuses the overlap.
        low, _ = free_port_range(WORKER_PORTS + SINGLE_PORTS)
        single = iter(range(low + WORKER_PORTS, low + WORKER_PORTS + SINGLE_PORTS))
        args = [
            os.path.join(VENV_BIN, "ray"),
            "start",
            f"--num-cpus={self.num_cpus}",
            f"--resources={json.dumps({self.name: 1})}",
            f"--temp-dir={self.temp_dir}",
            f"--object-store-memory={100 * 1024 * 1024}",
            f"--node-manager-port={next(single)}",
            f"--object-manager-port={next(single)}",
            f"--runtime-env-agent-port={next(single)}",
            f"--dashboard-agent-grpc-port={next(single)}",
            f"--dashboard-agent-listen-port={next(single)}",
            f"--metrics-export-port={next(single)}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + WORKER_PORTS - 1}",
            "--disable-usage-stats",
        ]
        if self.head:
            args += [
                "--head",
                f"--node-ip-address={self.ip}",
                f"--port={self.cluster.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.cluster.dashboard_port}",
                f"--ray-client-server-port={next(single)}",
            ]
        else:
            args += [f"--address={self.cluster.gcs_address}", f"--node-ip-address={self.ip}"]
        return args

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
        env.update(self.cluster.server_env())
        env[MARKER] = self.marker
        # The cluster's `python` is this virtualenv's, as with `ray start` from an activated venv (or another's).
        env["PATH"] = self.cluster.python_bin + os.pathsep + env.get("PATH", "")
        # gloo (DDP on CPU) would otherwise pick the interface of the host name, off loopback.
        env["GLOO_SOCKET_IFNAME"] = "lo"
        # Ray processes that look for "the" local cluster (Ray Train's placement-group cleaner does)
        # would find every Ray on this machine and give up; point them at this one.
        env["RAY_ADDRESS"] = self.cluster.gcs_address
        return env

    def start(self, timeout: float = 90) -> None:
        """Run `ray start` (it leaves the node's processes running and returns)."""
        log = Path(self.cluster.root) / f"{self.name}-start.log"
        with open(log, "ab") as out:
            proc = subprocess.run(self.command(), env=self.env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0:
            self.kill()
            raise RuntimeError(f"ray start ({self.name}) failed:\n{log.read_text()[-3000:]}")

    def pids(self) -> list[int]:
        return pids_with_marker(self.marker)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to every process of this node; a few passes, since a dying process may still start a child."""
        return kill_marked(self.marker, sig)

    def stop(self, grace: float = 5) -> None:
        """SIGTERM the node's processes, then SIGKILL what is left after `grace` seconds."""
        self.kill(signal.SIGTERM)
        deadline = time.time() + grace
        while self.pids() and time.time() < deadline:
            time.sleep(0.3)
        self.kill(signal.SIGKILL)


class RayCluster:
    """A head and any number of worker nodes on 127.0.0.1, with token authentication on."""

    def __init__(self, head_cpus: int = 1, env: dict[str, str] | None = None, python_bin: str | None = None):
        """`python_bin`: the directory of the `python` a job's entrypoint finds on the nodes' PATH (this venv's)."""
        self.extra_env = dict(env or {})
        self.python_bin = python_bin or VENV_BIN
        self.root = Path(tempfile.mkdtemp(prefix="orc-ray-", dir="/tmp"))
        self.marker = self.root.name
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.gcs_address = f"127.0.0.2:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.workers: list[RayNode] = []
        self.head = RayNode(self, "head", head_cpus, head=True)

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def server_env(self) -> dict[str, str]:
        """What every node is started with: token auth on, the token from the cluster's own file."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            **self.extra_env,
        }

    def client_env(self) -> dict[str, str]:
        """Environment of a client of this cluster: its address and its token file, nothing else of Ray's."""
        return {"RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def attach_env(self) -> dict[str, str]:
        """Environment of a process on this machine that attaches to this cluster as to a local `ray start --head`
        (`orchestrator run` without --address): where Ray left the address, and the token file."""
        return {"RAY_TMPDIR": str(self.root), "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def start(self) -> RayCluster:
        self.head.start()
        self.wait_for_nodes(1)
        return self

    def add_node(self, num_cpus: int = 1) -> RayNode:
        node = RayNode(self, f"worker{len(self.workers) + 1}", num_cpus, head=False)
        self.workers.append(node)
        node.start()
        return node

    def api(self, path: str):
        req = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        try:
            nodes = self.api("/api/v0/nodes?limit=1000&detail=false")["data"]["result"]["result"]
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        """Until exactly `count` nodes are alive (a killed node takes Ray a while to declare dead)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.alive_nodes()) == count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"cluster has {len(self.alive_nodes())} alive nodes, not {count}, after {timeout}s")

    def shutdown(self) -> None:
        for node in reversed(self.workers):
            node.stop()
        self.head.stop()
        shutil.rmtree(self.root, ignore_errors=True)
