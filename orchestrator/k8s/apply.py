"""Acting: `kubectl apply` of rendered manifests, the only step with side effects."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from orchestrator.errors import BadInput, RunFailed
from orchestrator.k8s.manifests import dump_manifests


def kubectl_context(kubectl: str = "kubectl") -> str:
    """The current kubectl context, or BadInput saying why there is none."""
    if shutil.which(kubectl) is None:
        raise BadInput(
            f"{kubectl}: not found on PATH; install kubectl, or run `orchestrator k8s render ... > job.yaml` and apply it elsewhere"
        )
    done = subprocess.run([kubectl, "config", "current-context"], capture_output=True, text=True, timeout=30)
    context = done.stdout.strip()
    if done.returncode != 0 or not context:
        raise BadInput(
            f"{kubectl}: no current context (set one with `kubectl config use-context NAME` or KUBECONFIG); nothing was applied"
        )
    return context


def apply_manifests(manifests: list[dict[str, Any]], kubectl: str = "kubectl", timeout: int = 120) -> str:
    """`kubectl apply -f -` of the manifests in the current context; returns kubectl's output."""
    context = kubectl_context(kubectl)
    try:
        done = subprocess.run(
            [kubectl, "apply", "-f", "-"],
            input=dump_manifests(manifests),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RunFailed(f"kubectl apply (context {context}): no answer within {timeout}s") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RunFailed(f"kubectl apply (context {context}): {reason}")
    return done.stdout


def job_names(manifests: list[dict[str, Any]]) -> dict[str, str]:
    """kind -> name of the rendered objects, for the follow-up commands a user types."""
    return {m["kind"]: m["metadata"]["name"] for m in manifests}
