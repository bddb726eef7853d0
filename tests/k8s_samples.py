"""The rendered samples under k8s/: what each file must hold, and a writer that regenerates them.

Run `python tests/k8s_samples.py` after changing orchestrator/k8s.py or an overlay's job.yaml;
tests/test_k8s_manifests.py fails while a sample differs from what the code renders.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator import k8s  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402

K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu", "s3", "kueue")
# Render options of each overlay's example job (the cpu, s3 and kueue overlays are for small test clusters).
OVERLAY_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"worker_memory": "2Gi"},
    "gpu": {},
    "s3": {"worker_memory": "2Gi"},
    "kueue": {"worker_memory": "2Gi", "queue": "user-queue"},
}
HEADER = "# Rendered by orchestrator.k8s ({what}); regenerate with `python tests/k8s_samples.py`, do not edit.\n"


def expected_samples() -> dict[Path, list[dict[str, Any]]]:
    """Path of each rendered sample -> the objects the code renders for it now."""
    out = {K8S / "base" / "raycluster.yaml": [k8s.render_raycluster()]}
    for overlay in OVERLAYS:
        spec = load_spec(K8S / "overlays" / overlay / "job.yaml")
        out[K8S / "overlays" / overlay / "rayjob.yaml"] = k8s.render_manifests(
            spec, k8s.job_file_text(spec), **OVERLAY_OPTIONS[overlay]
        )
    return out


def write_samples() -> list[Path]:
    written = []
    for path, objects in expected_samples().items():
        what = (
            "render_raycluster()"
            if path.name == "raycluster.yaml"
            else f"orchestrator k8s render {path.parent.relative_to(ROOT)}/job.yaml"
            + "".join(f" --{k.replace('_', '-')} {v}" for k, v in OVERLAY_OPTIONS[path.parent.name].items())
        )
        path.write_text(k8s.dump_manifests(objects, header=HEADER.format(what=what)))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_samples():
        print(f"wrote {p.relative_to(ROOT)}")
