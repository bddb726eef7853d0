"""bench/plain_digits.py, the baseline of bench/end_to_end.py: it runs, and it does the orchestrator's amount of work."""

import importlib.util
import json
import math
import subprocess
import sys
import time

import numpy as np
from conftest import ROOT

from orchestrator.data import load_data
from orchestrator.optim import lr_at
from orchestrator.spec import load_spec

PLAIN = ROOT / "bench" / "plain_digits.py"
JOB = ROOT / "jobs" / "digits_mlp.yaml"


def _plain_module():
    # bench/ is not a package: load the script by path (its main() only runs under __main__).
    spec = importlib.util.spec_from_file_location("plain_digits", PLAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_script_runs_and_ends_with_its_json_line():
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(PLAIN), "train.max_steps=5"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    end = time.time()
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"wall_s", "first_step_at", "steps", "best_val_accuracy", "test_accuracy"} <= result.keys()
    assert result["steps"] == 5
    assert 0 < result["wall_s"] <= end - start
    assert start <= result["first_step_at"] <= end
    stamped = [line for line in lines if line.startswith("first_step_at=")]
    assert len(stamped) == 1 and math.isclose(float(stamped[0].split("=", 1)[1]), result["first_step_at"], abs_tol=1e-5)
    assert 0.0 <= result["best_val_accuracy"] <= 1.0
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["sizes"] == load_data(load_spec(JOB)).info.sizes


def test_plain_split_sizes_equal_the_orchestrators():
    plain = _plain_module()
    job = plain.load_job(JOB, [])
    splits = load_data(load_spec(JOB))
    n = sum(splits.info.sizes.values())
    train, val, test = plain.split_indices(
        n, job["train"]["seed"], job["data"]["test_split"], job["validation"]["split"]
    )
    assert {"train": len(train), "val": len(val), "test": len(test)} == splits.info.sizes
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(n))


def test_plain_schedule_is_the_orchestrators_warmup_cosine():
    plain = _plain_module()
    job = plain.load_job(JOB, [])
    spec = load_spec(JOB)
    base, total = spec.optim.lr, 645
    factor = plain.warmup_cosine(job["schedule"]["warmup_steps"], total, base, spec.schedule.min_lr)
    for step in (0, 1, 19, 20, 21, 300, 644, 645):
        assert math.isclose(base * factor(step), lr_at(step, base, spec.schedule, total), rel_tol=1e-12, abs_tol=1e-15)
