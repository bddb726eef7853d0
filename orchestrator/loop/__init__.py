"""The per-worker training loop: the one place where a step happens.

The loop knows nothing of Ray, Tune, Kubernetes or storage URIs beyond its run's: it gets a
`LoopContext` (rank, world size, device, the run's URI, a `report` for metrics and a sink for
progress), so a unit test can drive it in-process. `run_training` (train.py) is the recipe; each
concern it follows is a part of its own:

- context.py        LoopContext: what whoever runs the loop gives it
- state.py          TrainState (the counters a checkpoint carries) and the RNG states
- parts.py          building the data, model, optimizer, schedule and scaler from the spec
- step.py           one optimizer step: accumulation, autocast, scaled backward, clipping
- cadence.py        what follows a step: log, validate, checkpoint, stop
- early_stopping.py which validation is the best, and when training stops early
- checkpointer.py   restore the latest checkpoint; snapshot, commit and retention
- sharding.py       scaling.strategy=fsdp: the model sharded per block (FSDP2); its state in and out of DCP
- sharded_checkpointer.py  fsdp's checkpoints: every rank saves and restores its own shards; the test of the best
- record.py         every metrics entry: history, metrics.jsonl, trackers; and rank 0's progress
- evaluate.py       metrics of a split across ranks; the best checkpoint on the test split
"""

from orchestrator.loop.context import LoopContext
from orchestrator.loop.train import LoopResult, run_training

__all__ = ["LoopContext", "LoopResult", "run_training"]
