# syntax=docker/dockerfile:1
# The job image: Ray's own image, of the Ray version this package runs with, plus the package,
# running as Ray's non-root user (uid 1000, group users). Build from the repository root:
#   CPU:  docker build -t orchestrator:0.1.0 .
#   GPU:  docker build --build-arg DEVICE=gpu -t orchestrator:0.1.0-gpu .
# tests/test_k8s_manifests.py checks that RAY_VERSION is the Ray of the package and of the manifests.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG DEVICE=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${DEVICE}

ARG RAY_VERSION
ARG DEVICE
USER 1000:100
WORKDIR /home/ray/src
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 orchestrator ./orchestrator
# CPU images take torch's CPU wheels (a fraction of the size); pinning Ray keeps pip from replacing
# the base image's Ray with another version.
RUN if [ "$DEVICE" = "cpu" ]; then extra="--extra-index-url https://download.pytorch.org/whl/cpu"; else extra=""; fi \
    && pip install --no-cache-dir $extra "ray[train,tune]==${RAY_VERSION}" . \
    && python -c "import orchestrator, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

WORKDIR /home/ray
ENV PYTHONUNBUFFERED=1
# Kubernetes ignores image health checks: the pods probe Ray's own health endpoints instead.
HEALTHCHECK NONE
USER 1000:100
