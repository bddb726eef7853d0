"""Ray clusters through the Jobs API: package a job, submit it, then follow, list and stop it.

Render, then act: `build_submission` turns a JobSpec and its directory into the Jobs API request
(entrypoint, runtime environment, metadata); `RayJobsBackend` is the thin client that sends it.
The entrypoint re-runs the original job file with the same overrides (`python -m orchestrator run
FILE k=v ... --ray-address auto`) from the job file's directory, so user code and relative data paths
resolve on the cluster exactly as they do on the laptop.

package: what of the job's directory ships; submission: the request and its checks; backend: the
address, the token and the Jobs API client; show: how jobs read to a person.
"""

from orchestrator.cluster.backend import (
    DEFAULT_DASHBOARD_PORT,
    METADATA_JOB_FILE,
    METADATA_RUN,
    METADATA_STORAGE,
    SUBMISSION_ID_RE,
    TERMINAL,
    NoSuchJob,
    RayJobsBackend,
    Token,
    default_token_path,
    find_token,
    job_to_dict,
    redact,
    resolve_address,
)
from orchestrator.cluster.package import (
    DEFAULT_EXCLUDES,
    MAX_FILE_BYTES,
    MAX_PACKAGE_BYTES,
    SECRET_PATTERNS,
    PackagePlan,
    literal_pattern,
    plan_package,
)
from orchestrator.cluster.show import (
    RESULT_MARKER,
    ResultFilter,
    failure_reason,
    follow_to_end,
    format_jobs,
    format_status,
    last_result,
    result_line,
    summary_from_logs,
    without_results,
)
from orchestrator.cluster.submission import build_submission, check_user_code, new_submission_id, prepare_submission

__all__ = [
    "DEFAULT_DASHBOARD_PORT",
    "DEFAULT_EXCLUDES",
    "MAX_FILE_BYTES",
    "MAX_PACKAGE_BYTES",
    "RESULT_MARKER",
    "METADATA_JOB_FILE",
    "METADATA_RUN",
    "METADATA_STORAGE",
    "SECRET_PATTERNS",
    "SUBMISSION_ID_RE",
    "TERMINAL",
    "NoSuchJob",
    "PackagePlan",
    "RayJobsBackend",
    "ResultFilter",
    "Token",
    "build_submission",
    "check_user_code",
    "default_token_path",
    "failure_reason",
    "find_token",
    "follow_to_end",
    "format_jobs",
    "format_status",
    "job_to_dict",
    "last_result",
    "literal_pattern",
    "new_submission_id",
    "plan_package",
    "prepare_submission",
    "redact",
    "resolve_address",
    "result_line",
    "summary_from_logs",
    "without_results",
]
