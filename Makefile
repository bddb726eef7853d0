# Two entry points for a fresh machine: `make run` trains the digits MLP, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on these machines' disk; users with CUDA install their own torch first.
TORCH_PIN ?= torch==2.13.0
LINTED := orchestrator tests bench jobs

.PHONY: setup system-packages run lint format test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The manifest scanner (checkov) in its own venv: setup installs it, so the tests' time is the tests'.
.venv-scan/bin/checkov:
	PYTHON=$(PYTHON) bash tests/k8s_scan_setup.sh >/dev/null

setup: $(VENV)/.installed .venv-scan/bin/checkov system-packages

# The report tests open reports in Debian's Chromium through Playwright (its own browser download cannot work here);
# the console test runs a job in a real terminal under tmux.
system-packages:
	@{ command -v chromium && command -v tmux; } >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium tmux >/dev/null; } \
		|| { echo "make setup: install Debian's chromium and tmux (as root: apt-get install chromium tmux) for the report and console tests" >&2; exit 1; }

run: $(VENV)/.installed
	$(VENV)/bin/orchestrator run jobs/digits_mlp.yaml

# Code the linter or the formatter would change fails CI before any test runs.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

# Two workers (pytest-xdist): most of a test's time is spent waiting on a process, a server or Ray, so two
# keep a 2-core machine busy; tests that share a module's cluster or a server carry an xdist_group and
# stay in one worker. TEST_WORKERS=0 runs them one after another in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# Every run ends with its 25 slowest tests, so that each CI log says where the suite's time goes.
test: setup lint
	$(PYTEST) --durations=25

test-fast: setup
	$(PYTEST) --durations=10 -m "not slow"

bench: setup
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
