#!/usr/bin/env bash
# Installs checkov into its own virtual environment, .venv-scan: its pins (boto3, botocore,
# packaging) conflict with the project's, so it cannot share .venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOV_PIN="${CHECKOV_PIN:-checkov==3.3.30}"
VENV="${SCAN_VENV:-.venv-scan}"
PYTHON="${PYTHON:-python3}"

# Installed at the pinned version: its dist-info is there. (Not `pip show | grep -q` under pipefail: grep's
# early exit breaks pip's pipe, the pipeline fails, and every test session reinstalled checkov for a minute.)
if [ -x "$VENV/bin/checkov" ] && compgen -G "$VENV/lib/python*/site-packages/checkov-${CHECKOV_PIN#checkov==}.dist-info" >/dev/null; then
    exit 0
fi
"$PYTHON" -m venv "$VENV"
# The scanner's folder holds nothing to commit; ignoring it here keeps it out of `git status`.
printf '*\n' > "$VENV/.gitignore"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$CHECKOV_PIN"
"$VENV/bin/checkov" --version
