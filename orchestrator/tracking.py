"""The trackers of a run: MLflow and TensorBoard.

The driver checks and opens the trackers (`preflight`, `TrackingSession.start`/`.finish`); rank 0
feeds them every metrics entry through `create_tracker`, a callable that only queues: a slow or
failing tracker never stops or slows training. mlflow and tensorboardX are imported lazily.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator import storage
from orchestrator.errors import BadInput
from orchestrator.runrecord import RunStatus
from orchestrator.spec import JobSpec, flatten
from orchestrator.storage import redact

if TYPE_CHECKING:
    from orchestrator.runrecord import RunSummary

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
# Entries waiting for a slow tracker; past this, new ones are dropped (one warning) rather than held.
QUEUE_SIZE = 10_000
ENTRY_KEYS = ("step", "epoch", "split", "time")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


# ----------------------------------------------------------------------------------------------
# Metrics entries -> tracker metrics


def metric_items(entry: dict[str, Any]) -> Iterable[tuple[str, float]]:
    """The scalar metrics of a metrics.jsonl entry by tracker name (a train entry's loss is `train_loss`)."""
    for key, value in entry.items():
        if key in ENTRY_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield ("train_loss" if key == "loss" and entry.get("split") == "train" else key), float(value)


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _bound_mlflow_http(uri: str | None = None) -> None:
    # MLflow retries a failed request for minutes by default; a tracker outage should cost seconds.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if uri and redact(uri) != uri:
        # MLflow prints "View run ... at: <tracking URI>" as given, user:password@ and all.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


class MlflowSink:
    """Logs metrics entries to one MLflow run."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, run_id: str):
        _bound_mlflow_http(tracking_uri)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log(self, entries: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key, value, int(e.get("time", time.time()) * 1000), int(e["step"]))
            for e in entries
            for key, value in metric_items(e)
        ]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _EventDir:
    """A TensorBoard log directory: written in place when local, staged and uploaded when it is a remote URI."""

    def __init__(self, uri: str, endpoint_url: str | None):
        protocol, path = storage.split_uri(uri)
        self.uri, self.endpoint_url = uri, endpoint_url
        self.remote = protocol != "file"
        self.local = tempfile.mkdtemp(prefix="orchestrator-tb-") if self.remote else path
        os.makedirs(self.local, exist_ok=True)

    def upload(self) -> None:
        if not self.remote:
            return
        fs, root = storage.open_storage(self.uri, self.endpoint_url)
        for dirpath, _, names in os.walk(self.local):
            for name in names:
                local = os.path.join(dirpath, name)
                rel = os.path.relpath(local, self.local).replace(os.sep, "/")
                with open(local, "rb") as fh:
                    storage.write_bytes(fs, storage.join(root, rel), fh.read())

    def cleanup(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def _event_suffix() -> str:
    # Event file names hold only the second and the host: two writers (a resumed attempt, the
    # driver's hparams) in the same second would write the same file.
    return f".{os.getpid()}.{uuid.uuid4().hex[:8]}"


class TensorBoardSink:
    """Writes every scalar of every entry as a TensorBoard scalar at its step."""

    name = "tensorboard"

    def __init__(self, log_dir: str, endpoint_url: str | None = None):
        from tensorboardX import SummaryWriter

        self.dir = _EventDir(log_dir, endpoint_url)
        self.writer = SummaryWriter(logdir=self.dir.local, flush_secs=30, filename_suffix=_event_suffix())

    def log(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            for key, value in metric_items(e):
                self.writer.add_scalar(key, value, global_step=int(e["step"]), walltime=e.get("time"))

    def flush(self) -> None:
        self.writer.flush()
        self.dir.upload()

    def close(self) -> None:
        self.writer.close()
        self.dir.upload()
        self.dir.cleanup()


_STOP = object()


class Tracker:
    """Feeds metrics entries to sinks on a background thread; calling it only queues, so it never blocks or raises."""

    def __init__(self, sinks: list[Any], flush_every_s: float = 30.0):
        self.sinks = list(sinks)
        self.flush_every_s = flush_every_s
        self.dropped = 0
        self._failing: set[str] = set()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread = threading.Thread(target=self._work, name="orchestrator-tracker", daemon=True)
        self._thread.start()

    def __call__(self, entry: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(dict(entry))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("tracking is falling behind: dropping metrics entries (training goes on)")

    def _work(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                batch = [self._queue.get(timeout=1.0)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < 1000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            entries = [item for item in batch if item is not _STOP]
            if entries:
                self._each_sink("log", entries)
            if stop or time.monotonic() - last_flush > self.flush_every_s:
                self._each_sink("flush")
                last_flush = time.monotonic()
            if stop:
                self._each_sink("close")
                return

    def _each_sink(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # a tracker outage is a warning, never a training failure
                if sink.name not in self._failing:
                    self._failing.add(sink.name)
                    log.warning(
                        "%s tracking failed (%s); training goes on without it until it recovers",
                        sink.name,
                        _one_line(exc),
                    )
            else:
                if sink.name in self._failing and method == "log":
                    self._failing.discard(sink.name)
                    log.warning("%s tracking works again", sink.name)

    def close(self, timeout: float = 30.0) -> bool:
        """Send what is queued, flush and close the sinks; wait at most `timeout` seconds (False if they did not finish)."""
        if not self._thread.is_alive():
            return True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("tracking did not drain in %.0fs; the rest of its metrics are dropped", timeout)
            return False
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("tracking did not finish in %.0fs; the rest of its metrics are dropped", timeout)
            return False
        return True


def create_tracker(config: dict[str, Any] | None, endpoint_url: str | None = None) -> Tracker | None:
    """Rank 0's tracker from `TrackingSession.worker_config()`; None when no tracker is on (or none could be opened)."""
    if not config:
        return None
    sinks: list[Any] = []
    if config.get("mlflow"):
        try:
            sinks.append(MlflowSink(config["mlflow"]["tracking_uri"], config["mlflow"]["run_id"]))
        except Exception as exc:
            log.warning("mlflow tracking is off for this worker (%s)", _one_line(exc))
    if config.get("tensorboard"):
        try:
            sinks.append(TensorBoardSink(config["tensorboard"]["log_dir"], endpoint_url))
        except Exception as exc:
            log.warning("tensorboard tracking is off for this worker (%s)", _one_line(exc))
    return Tracker(sinks) if sinks else None


# ----------------------------------------------------------------------------------------------
# The driver: preflight, start, finish


def mlflow_tracking_uri(spec: JobSpec) -> str:
    """`tracking.mlflow.tracking_uri` or $MLFLOW_TRACKING_URI, with a relative sqlite/file path made absolute (workers have another cwd)."""
    uri = spec.tracking.mlflow.tracking_uri if spec.tracking.mlflow else None
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise BadInput("tracking.mlflow.tracking_uri: not set, and $MLFLOW_TRACKING_URI is empty")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    if "://" not in uri and not uri.startswith("databricks"):
        return os.path.abspath(uri)
    return uri


def experiment_name(spec: JobSpec) -> str:
    return (spec.tracking.mlflow.experiment if spec.tracking.mlflow else None) or spec.name


def tensorboard_dir(spec: JobSpec, run_uri: str) -> str:
    """Where a run's TensorBoard event files go: `tracking.tensorboard.log_dir`, or `<run>/tensorboard`."""
    configured = spec.tracking.tensorboard.log_dir if spec.tracking.tensorboard else None
    return configured or f"{run_uri.rstrip('/')}/{TENSORBOARD_DIR}"


def _describe_mlflow_error(uri: str, exc: BaseException) -> str:
    text = str(exc).lower()
    shown = redact(uri)
    if any(k in text for k in ("401", "403", "unauthorized", "forbidden", "permission_denied", "unauthenticated")):
        return f"tracking.mlflow.tracking_uri: {shown}: access denied (check MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD in the environment)"
    if any(
        k in text
        for k in (
            "connection refused",
            "failed to establish",
            "max retries exceeded",
            "name or service not known",
            "nodename nor servname",
            "timed out",
            "timeout",
            "connectionerror",
            "remote end closed",
        )
    ):
        return f"tracking.mlflow.tracking_uri: cannot reach the MLflow tracking server at {shown}"
    return f"tracking.mlflow.tracking_uri: {shown}: MLflow tracking does not work ({type(exc).__name__})"


def preflight(spec: JobSpec) -> None:
    """Check that every tracker that is on can be used; BadInput naming the URI (never a credential) if not."""
    if spec.tracking.mlflow is not None:
        uri = mlflow_tracking_uri(spec)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise BadInput(
                "tracking.mlflow: the mlflow package is not installed (pip install 'orchestrator[mlflow]')"
            ) from None
        if uri.startswith("sqlite:///"):
            folder = os.path.dirname(uri[len("sqlite:///") :]) or "."
            if not os.path.isdir(folder):
                raise BadInput(f"tracking.mlflow.tracking_uri: {redact(uri)}: the directory {folder} does not exist")
        # One quick call: a dead server answers within seconds, not after MLflow's minutes of retries.
        saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:
            raise BadInput(_describe_mlflow_error(uri, exc)) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    if spec.tracking.tensorboard is not None:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise BadInput(
                "tracking.tensorboard: the tensorboardX package is not installed (pip install tensorboardX)"
            ) from None
        if spec.tracking.tensorboard.log_dir:
            try:
                storage.preflight(spec.tracking.tensorboard.log_dir, spec.checkpoint.endpoint_url)
            except BadInput as exc:
                raise BadInput(f"tracking.tensorboard.log_dir: {exc}") from None


@dataclass
class TrackingSession:
    """The trackers of one run, opened on the driver; rank 0 reaches them through `worker_config()`."""

    run_uri: str
    endpoint_url: str | None = None
    mlflow_uri: str | None = None
    experiment: str | None = None
    experiment_id: str | None = None
    mlflow_run_id: str | None = None
    parent_run_id: str | None = None
    tensorboard_dir: str | None = None

    @classmethod
    def start(
        cls,
        spec: JobSpec,
        run_uri: str,
        run_name: str,
        provenance: dict[str, Any],
        previous: dict[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> TrackingSession:
        """Open the run's trackers: an MLflow run (the one `previous` names when it still exists) with params and tags.

        `previous` is the `tracking` entry of an earlier attempt's run.json; `parent_run_id` makes a sweep trial a child run.
        """
        session = cls(run_uri=run_uri, endpoint_url=spec.checkpoint.endpoint_url, parent_run_id=parent_run_id)
        if spec.tracking.tensorboard is not None:
            session.tensorboard_dir = tensorboard_dir(spec, run_uri)
        if spec.tracking.mlflow is not None:
            try:
                session._start_mlflow(spec, run_name, provenance, ((previous or {}).get("mlflow") or {}).get("run_id"))
            except BadInput:
                raise
            except Exception as exc:  # reachable at preflight, but it cannot take this run: still bad input
                raise BadInput(_describe_mlflow_error(mlflow_tracking_uri(spec), exc)) from None
        return session

    def _start_mlflow(
        self, spec: JobSpec, run_name: str, provenance: dict[str, Any], previous_run_id: str | None
    ) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.mlflow_uri, self.experiment = mlflow_tracking_uri(spec), experiment_name(spec)
        _bound_mlflow_http(self.mlflow_uri)
        client = MlflowClient(self.mlflow_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            self.experiment_id = client.create_experiment(self.experiment)
        else:
            self.experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(self.experiment_id)
        existing: dict[str, str] = {}
        if previous_run_id:
            try:
                run = client.get_run(previous_run_id)
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    self.mlflow_run_id, existing = previous_run_id, dict(run.data.params)
                    client.update_run(previous_run_id, status="RUNNING")
            except Exception:  # deleted or another server: this attempt starts a new MLflow run
                self.mlflow_run_id = None
        tags = {f"orchestrator.{k}": _text(v) for k, v in flatten(provenance).items()}
        tags["orchestrator.run_uri"] = redact(self.run_uri)
        git = provenance.get("git") or {}
        if git.get("commit"):
            tags["mlflow.source.git.commit"] = git["commit"]
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        if self.mlflow_run_id is None:
            self.mlflow_run_id = client.create_run(self.experiment_id, run_name=run_name).info.run_id
        params = {k: _text(v)[:6000] for k, v in flatten(spec.to_dict()).items()}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.warning(
                "mlflow: params cannot change within a run; %s keep their first values (the new ones are in run.json)",
                ", ".join(changed),
            )
        new_params = [Param(k, v) for k, v in params.items() if k not in existing]
        tag_list = [RunTag(k, v[:8000]) for k, v in tags.items()]
        for i in range(0, len(new_params), 100):  # MLflow's limit per batch
            client.log_batch(self.mlflow_run_id, params=new_params[i : i + 100])
        for i in range(0, len(tag_list), 100):
            client.log_batch(self.mlflow_run_id, tags=tag_list[i : i + 100])

    def to_record(self) -> dict[str, Any]:
        """The `tracking` entry of run.json (the tracking URI without credentials)."""
        out: dict[str, Any] = {}
        if self.mlflow_run_id:
            out["mlflow"] = {
                "tracking_uri": redact(self.mlflow_uri or ""),
                "experiment": self.experiment,
                "experiment_id": self.experiment_id,
                "run_id": self.mlflow_run_id,
                "parent_run_id": self.parent_run_id,
            }
        if self.tensorboard_dir:
            out["tensorboard"] = {"log_dir": self.tensorboard_dir}
        return out

    def worker_config(self) -> dict[str, Any] | None:
        """What rank 0 needs to open its tracker (`create_tracker`); None when no tracker is on."""
        out: dict[str, Any] = {}
        if self.mlflow_run_id:
            out["mlflow"] = {"tracking_uri": self.mlflow_uri, "run_id": self.mlflow_run_id}
        if self.tensorboard_dir:
            out["tensorboard"] = {"log_dir": self.tensorboard_dir}
        return out or None

    def finish(
        self,
        spec: JobSpec,
        status: str,
        summary: RunSummary | None,
        artifacts: list[tuple[str, str | None]],
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Final metrics, hyper-parameters and artifacts ((artifact folder or "", storage URI of a file)); failures are warnings.

        `status` is the run's (finished, stopped, interrupted, failed): MLflow's FINISHED for the first two, KILLED, FAILED.
        `metrics` are logged beside the summary's (a cross-validation's aggregate, which has no summary of its own).
        """
        final = {**final_metrics(summary), **(metrics or {})}
        if self.tensorboard_dir:
            try:
                write_hparams(
                    self.tensorboard_dir,
                    self.endpoint_url,
                    flatten(spec.to_dict()),
                    final,
                    (summary.steps if summary else None) or 0,
                )
            except Exception as exc:
                log.warning("tensorboard: could not write the hyper-parameters (%s)", _one_line(exc))
        if self.mlflow_run_id:
            try:
                self._finish_mlflow(status, final, summary, artifacts)
            except Exception as exc:
                log.warning("mlflow: could not finish run %s (%s)", self.mlflow_run_id, _one_line(exc))

    def _finish_mlflow(
        self, status: str, final: dict[str, float], summary: RunSummary | None, artifacts: list[tuple[str, str | None]]
    ) -> None:
        _bound_mlflow_http(self.mlflow_uri)
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.mlflow_uri)
        now = int(time.time() * 1000)
        step = int(
            (summary.test.step if summary and summary.test else None) or (summary.steps if summary else None) or 0
        )
        metrics = [Metric(k, v, now, step) for k, v in final.items()]
        if metrics:
            client.log_batch(self.mlflow_run_id, metrics=metrics)
        with tempfile.TemporaryDirectory(prefix="orchestrator-artifacts-") as tmp:
            for i, (folder, uri) in enumerate(artifacts):
                if not uri:
                    continue
                fs, path = storage.open_storage(uri, self.endpoint_url)
                local = os.path.join(tmp, str(i), path.rstrip("/").rsplit("/", 1)[-1])
                os.makedirs(os.path.dirname(local), exist_ok=True)
                with open(local, "wb") as fh:
                    fh.write(storage.read_bytes(fs, path))
                client.log_artifact(self.mlflow_run_id, local, folder or None)
        # A trial that a scheduler stopped ended as planned; the tag tells it from one that trained to its end.
        client.set_tag(self.mlflow_run_id, "orchestrator.status", str(status))
        client.set_terminated(
            self.mlflow_run_id,
            "FINISHED"
            if status in (RunStatus.FINISHED, RunStatus.STOPPED)
            else "KILLED"
            if status == RunStatus.INTERRUPTED
            else "FAILED",
        )


def final_metrics(summary: RunSummary | None) -> dict[str, float]:
    """The scalar metrics that close a run: test_* of the evaluated checkpoint, and best_* validation values."""
    out: dict[str, float] = {}
    if summary is None:
        return out
    for key, value in ((summary.test.metrics if summary.test else None) or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    for key, value in ((summary.best.metrics if summary.best else None) or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"best_{key}"] = float(value)
    return out


def _hparam_value(value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return value
    return _text(value)


def write_hparams(
    log_dir: str, endpoint_url: str | None, hparams: dict[str, Any], metrics: dict[str, float], step: int
) -> None:
    """TensorBoard's HParams entry of a run: the flattened job and its final metrics (also written as scalars)."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams as hparams_summary

    target = _EventDir(log_dir, endpoint_url)
    try:
        writer = SummaryWriter(logdir=target.local, filename_suffix=_event_suffix())
        exp, ssi, sei = hparams_summary({k: _hparam_value(v) for k, v in hparams.items()}, metrics)
        for summary in (exp, ssi, sei):
            writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)
        writer.close()
        target.upload()
    finally:
        target.cleanup()
