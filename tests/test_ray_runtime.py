"""An embedded Ray's start and stop, in a process of its own as a run's is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STOP = """
import json, ray
from ray._private import worker
from orchestrator.ray_runtime import start_ray, stop_ray

assert start_ray(None, prestart=False)
node = worker._global_node
processes = {kind: [i.process for i in infos] for kind, infos in node.all_processes.items()}
seen = {}
shutdown = ray.shutdown

def watched_shutdown(*args, **kwargs):
    seen["monitor"] = processes["monitor"][0].poll()  # as Ray's own shutdown begins
    return shutdown(*args, **kwargs)

ray.shutdown = watched_shutdown
stop_ray()
ended = {kind: [[p.pid, p.poll()] for p in procs] for kind, procs in processes.items()}
print(json.dumps({"ended": ended, "monitor_at_shutdown": seen["monitor"]}))
"""


def test_stopping_an_embedded_ray_ends_every_process_it_started():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", STOP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    processes = result["ended"]
    assert {"raylet", "gcs_server", "monitor"} <= processes.keys()
    for kind, procs in processes.items():
        for pid, returncode in procs:
            assert returncode is not None, f"{kind} (pid {pid}) still running after stop_ray"
    # The autoscaler monitor never exits on SIGTERM within the second of grace Ray's shutdown gives each
    # process in turn: it is already killed when that shutdown begins.
    assert result["monitor_at_shutdown"] == -9
