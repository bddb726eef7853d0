"""An embedded Ray's start and stop, in a process of its own as a run's is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STOP = """
import json, ray
from ray._private import worker
from orchestrator.ray_runtime import start_ray, stop_ray

from ray._common.usage.usage_lib import usage_stats_enabled
from ray._private import node as ray_node
own_start = ray_node.Node.start_api_server
assert start_ray(None, prestart=False)
stats_on = usage_stats_enabled()  # as Ray decided when it started the node
node = worker._global_node
up = {kind: [i.process.poll() is None for i in infos] for kind, infos in node.all_processes.items()}
assert ray.get(ray.remote(lambda: 1).remote()) == 1
webui = (node.webui_url, ray.experimental.internal_kv._internal_kv_get("webui:url", namespace="dashboard"))
processes = {kind: [i.process for i in infos] for kind, infos in node.all_processes.items()}
seen = {}
shutdown = ray.shutdown

def watched_shutdown(*args, **kwargs):
    seen["monitor"] = processes["monitor"][0].poll()  # as Ray's own shutdown begins
    return shutdown(*args, **kwargs)

ray.shutdown = watched_shutdown
stop_ray()
ended = {kind: [[p.pid, p.poll()] for p in procs] for kind, procs in processes.items()}
print(json.dumps({
    "up": up, "ended": ended, "monitor_at_shutdown": seen["monitor"], "webui": [webui[0], webui[1].decode()],
    "own_start_back": ray_node.Node.start_api_server is own_start, "stats_on": stats_on,
}))
"""


@pytest.mark.parametrize("usage_stats", ["1", "0"])
def test_stopping_an_embedded_ray_ends_every_process_it_started(usage_stats):
    """The embedded Ray starts no dashboard process where Ray's usage stats are off when it starts its node, which
    `ray.init` itself sees to for a Ray it starts (Ray 2.60: RAY_USAGE_STATS_ENABLED=0 unless a nightly wheel), whatever
    the user's setting. Its dashboard URL is empty, as Ray leaves it for a node without a dashboard, every process it
    started is up when the start returns and ended after the stop, and Ray's own start of that process is back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = usage_stats
    out = subprocess.run([sys.executable, "-c", STOP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    processes = result["ended"]
    assert {"raylet", "gcs_server", "monitor"} <= processes.keys()
    assert result["stats_on"] is False  # Ray's own decision for a Ray that ray.init starts, even where the user said 1
    assert "dashboard" not in processes
    assert all(all(alive) for alive in result["up"].values()), result["up"]
    assert result["webui"] == ["", ""]
    assert result["own_start_back"]
    for kind, procs in processes.items():
        for pid, returncode in procs:
            assert returncode is not None, f"{kind} (pid {pid}) still running after stop_ray"
    # The autoscaler monitor never exits on SIGTERM within the second of grace Ray's shutdown gives each
    # process in turn: it is already killed when that shutdown begins.
    assert result["monitor_at_shutdown"] == -9


SLOW_AGENT = """
import os, sys, time

# The first dashboard agent started sleeps past the raylet's 15 s wait for it, as on a machine too busy to start it.
if sys.argv and sys.argv[0].endswith(os.path.join("dashboard", "agent.py")):
    marker = os.environ["SLOW_AGENT_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(40)
"""

RETRY = """
import json, ray
import psutil  # Ray's own (ray/thirdparty_files), on the path once ray is imported
from orchestrator.ray_runtime import start_ray, stop_ray

assert start_ray(None, prestart=False)
assert ray.get(ray.remote(lambda: 1).remote()) == 1
gcs = [p.pid for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server"]
stop_ray()
print(json.dumps({"gcs": gcs}))
"""


@pytest.mark.slow  # Ray gives up on its node after 30 s
def test_an_embedded_ray_whose_node_timed_out_at_its_start_is_started_again_once(tmp_path):
    """The raylet gives up on a dashboard agent slower than 15 s to start; the run's Ray is started again, and
    nothing of the failed start is left running."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_AGENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(tmp_path), SLOW_AGENT_MARKER=str(tmp_path / "marker"), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", RETRY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "marker").exists()  # the first agent was the slow one
    assert out.stderr.count("Ray's start timed out") == 1
    # One GCS: the failed start's was killed, not left beside the Ray that runs.
    assert len(json.loads(out.stdout.strip().splitlines()[-1])["gcs"]) == 1
