"""Ray for runs and sweeps: a Ray already up on this machine, or an embedded one, and Ray Train's settings for our runs."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from orchestrator.errors import BadInput

# Ray Train's controller takes one report per worker per poll, and a worker's next report waits for that
# slot: at Ray's default of 2 s, validations every epoch of a small job queue up behind it.
TRAIN_POLL_INTERVAL_S = "0.1"


def _train_settings(embedded: bool) -> dict[str, str]:
    """Ray Train settings for the runs we start, where the user has not set them.

    An embedded single-node Ray has no dashboard (its state API is what Ray Train's state actor
    reconciles against) and never drains a node (the preemption watcher is an actor of its own).
    """
    wanted = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_INTERVAL_S}
    if embedded:
        wanted.update(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION="0")
    return {key: value for key, value in wanted.items() if key not in os.environ}


@contextlib.contextmanager
def _environment(settings: dict[str, str]):
    os.environ.update(settings)
    try:
        yield
    finally:
        for key in settings:
            os.environ.pop(key, None)


@contextlib.contextmanager
def train_environment(embedded: bool):
    """Ray Train's settings for a fit() on a Ray this process did not start: Ray Train hands them to its actors.

    An embedded Ray got them at its start (`start_ray`): every Ray process inherits them. Ray Train's
    actors carry a runtime environment all the same: Ray Train 2.60 always starts its controller
    with `env_vars` holding RAY_WARN_BLOCKING_GET_INSIDE_ASYNC (`_initialize_and_run_controller`),
    the actors the controller creates inherit that environment, and its workers get the variable
    again (`get_env_vars_to_propagate`, the controller now having it set). A runtime environment
    means a fresh process through Ray's setup_worker.py, never one of Ray's prestarted workers,
    whatever settings Ray started with.
    """
    with _environment({} if embedded else _train_settings(embedded=False)):
        yield


def running_local_ray() -> str | None:
    """The address of a Ray already up on this machine (`ray start --head`), or None.

    Ray records its newest local cluster in `<RAY_TMPDIR, else TMPDIR, else /tmp>/ray`, as `ray start` and
    `ray.init(address="auto")` find it; a cluster that has since stopped leaves the file behind, so the
    GCS port must also answer.
    """
    temp_dir = os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray")
    try:
        with open(os.path.join(temp_dir, "ray_current_cluster")) as fh:
            address = fh.read().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return address
    except OSError:
        return None


def resolve_address(address: str | None) -> str | None:
    """Where a run's Ray is: the given address, else a Ray already up on this machine, else None (start an embedded one).

    `local` asks for a new embedded Ray even when another one is up.
    """
    if address == "local":
        return None
    # "auto" rather than the address itself: Ray then reads the local cluster's session, token authentication included.
    return address or ("auto" if running_local_ray() else None)


@contextlib.contextmanager
def _usage_stats_process():
    """Within it, a Ray started here without a dashboard starts no dashboard process while Ray's usage stats are off.

    Ray starts its dashboard process even with `include_dashboard=False`, loading only the module that
    reports usage stats (`services.start_api_server`: `--modules-to-load=UsageStatsHead`), and waits
    until that process has come up before it starts the raylet: 1.8 s of every embedded start on two
    cores, and 1.9 s of a CPU. Usage stats are off for every Ray that `ray.init` starts (Ray 2.60 sets
    RAY_USAGE_STATS_ENABLED=0 before starting the node, unless it is a nightly wheel), as they are where
    a user turned them off; the process would have nothing to do. So whether to start it is decided when
    Ray starts it, after Ray's own decision: where usage stats are on then, Ray starts it as it always
    does. A node without it is left as Ray leaves a node without a dashboard: an empty dashboard URL, in
    the node and in the GCS.
    """
    from ray._common.usage.usage_lib import usage_stats_enabled
    from ray._private import node, ray_constants

    original = getattr(node.Node, "start_api_server", None)
    if original is None:
        yield
        return

    def without_process(self, *, include_dashboard, raise_on_failure):
        if include_dashboard or usage_stats_enabled():  # a dashboard asked for, or stats to report: Ray's own start
            return original(self, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)
        self._webui_url = ""
        self.get_gcs_client().internal_kv_put(b"webui:url", b"", True, ray_constants.KV_NAMESPACE_DASHBOARD)

    node.Node.start_api_server = without_process
    try:
        yield
    finally:
        node.Node.start_api_server = original


STARTUP_TIMED_OUT = "timed out during startup"  # Ray's Node: its raylet never registered


def _init_embedded(kwargs: dict[str, Any]) -> None:
    """`ray.init` of an embedded Ray, started once more where its node timed out during its start.

    The raylet gives its dashboard agent (a Python process that imports aiohttp, gRPC and OpenTelemetry)
    a fixed 15 s to write its port (Ray 2.60: no setting changes it), then exits; `ray.init` raises 30 s
    later that the node timed out. On a 2-core machine busy with other processes the agent's start has
    taken longer (seen with three Rays starting at once). Nothing of the run has started yet: what the
    failed start left running (GCS, monitors) is killed and Ray is started again, once.
    """
    import importlib

    import ray

    psutil = importlib.import_module("psutil")  # Ray's own (ray/thirdparty_files): on the path once ray is imported
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    with _usage_stats_process():
        try:
            ray.init(**kwargs)
        except Exception as exc:
            if STARTUP_TIMED_OUT not in str(exc):
                raise
            for child in me.children(recursive=True):
                if child.pid not in before:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
            print(
                "Ray's start timed out (its dashboard agent was slow to come up on a busy machine): starting it again",
                file=sys.stderr,
                flush=True,
            )
            ray.init(**kwargs)


# Ray's notice, as it starts or joins a local cluster, that token authentication is on (Ray 2.60's default where a
# token exists): nothing for a person to act on, and it went to the console of every sweep and cross-validation.
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _WithoutTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_NOTICE)


def _quiet_token_notice() -> None:
    """Drop Ray's token-authentication notice (only that one: its warning that authentication is off stays)."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _WithoutTokenNotice) for f in logger.filters):
        logger.addFilter(_WithoutTokenNotice())


def start_ray(address: str | None, log_to_driver: bool = True, prestart: bool = True) -> bool:
    """Attach to Ray at `address`, or start an embedded Ray of this machine's CPUs; True if this call connected (shut it down after).

    An embedded Ray has no dashboard: it serves the Jobs API and the state API, which runs and sweeps
    do not use (Ray Train's state actor reconciliation, which would, is off there), and its processes
    compete with the run's for two cores. `prestart` leaves Ray's idle workers to start with it:
    only tasks and actors without a runtime environment (Tune's trials) can use them.
    """
    import ray

    if ray.is_initialized():
        return False
    _quiet_token_notice()
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    settings: dict[str, str] = {}
    if address:
        kwargs["address"] = address
    else:
        # "local": a new embedded Ray even when a `ray start` cluster runs on this machine.
        kwargs.update(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
        settings = _train_settings(embedded=True)
        if not prestart and "RAY_prestart_worker_first_driver" not in os.environ:
            settings["RAY_prestart_worker_first_driver"] = "0"
    try:
        with _environment(settings):
            if address:
                ray.init(**kwargs)
            else:
                _init_embedded(kwargs)
    except ConnectionError as exc:
        raise BadInput(f"--ray-address {address}: cannot connect to Ray ({exc})") from None
    return True


def stop_ray() -> None:
    """`ray.shutdown()`, less the second it spends on an embedded Ray's autoscaler monitor.

    Ray stops its processes one after another, each with SIGTERM and a second's grace before SIGKILL.
    The autoscaler monitor never exits on SIGTERM within that second (measured: raylet 0.07 s, GCS
    0.04 s, monitor 1.02 s, of a 1.5 s shutdown), and an embedded Ray has no cluster for it to scale:
    it gets the SIGKILL at once. A Ray this process only attached to has no processes of ours to stop.
    """
    import ray
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    monitor = getattr(ray_constants, "PROCESS_TYPE_MONITOR", "monitor")
    for info in (getattr(node, "all_processes", None) or {}).get(monitor, []):
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # Ray's own shutdown reaps it
                pass
    ray.shutdown()
