"""The hand-written Ray Train baseline of bench/end_to_end.py: bench/plain_digits.py's work in one Ray Train worker.

What a user writes without the orchestrator to train jobs/digits_mlp.yaml's job in a Ray worker actor: an
embedded Ray (`ray.init()`'s defaults), a TorchTrainer with one worker whose training function is the plain
script's loop, and the loop's JSON result handed back to the driver (a file). Ray Train's defaults throughout: the
work is the plain script's, the cost around it is Ray Train's. Prints `first_step_at=<unix time>` (from the
worker) and ends with one JSON line whose `first_step_at` is the worker's and whose `wall_s` is this process's.
Usage: python bench/raytrain_digits.py [--job PATH] [KEY=VALUE ...]
"""

from __future__ import annotations

import time

T0 = time.time()  # before the heavy imports, as in plain_digits.py

import json
import os
import sys
import tempfile
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

BENCH = Path(__file__).resolve().parent


def train_loop(config: dict) -> None:
    import plain_digits  # in the worker: its imports are part of what the worker costs

    result = plain_digits.main(config["argv"])
    # Ray Train 2's Result keeps only metrics reported with a checkpoint: the result goes back as a file (one machine).
    Path(config["out"]).write_text(json.dumps(result))


def main(argv: list[str]) -> dict:
    # Ray's workers inherit the environment of the Ray this process starts: they find plain_digits.py there.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)
    # The worker runs in a directory of Ray Train's: a relative job path is the caller's.
    argv = [str(Path(a).resolve()) if i and argv[i - 1] == "--job" else a for i, a in enumerate(argv)]
    ray.init()
    try:
        with tempfile.TemporaryDirectory(prefix="raytrain-digits-") as storage:
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={"argv": argv, "out": os.path.join(storage, "result.json")},
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(storage_path=storage, name="digits"),
            )
            trainer.fit()
            result = json.loads(Path(storage, "result.json").read_text())
    finally:
        ray.shutdown()
    result["wall_s"] = round(time.time() - T0, 3)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
