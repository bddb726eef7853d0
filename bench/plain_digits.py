"""The baseline of bench/end_to_end.py: jobs/digits_mlp.yaml's work as one plain PyTorch script, no orchestrator.

Reads its numbers from the job file (PyYAML) so that both sides stay in sync: the digits split into
test, validation and train sets of the orchestrator's sizes, the same MLP, AdamW, warm-up + cosine per
step, validation every epoch (loss, accuracy, macro F1, one-vs-rest ROC-AUC, confusion matrix), early
stopping, a torch.save checkpoint every epoch (newest keep_last plus the best) and the best checkpoint
on the test split at the end. Prints `first_step_at=<unix time>` after the first optimizer step and
ends with one JSON line.
Usage: python bench/plain_digits.py [--job PATH] [KEY=VALUE ...]   (e.g. train.epochs=2 train.max_steps=50)
"""

from __future__ import annotations

import time

T0 = time.time()  # before the heavy imports: they are part of what the script costs

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from sklearn.datasets import load_digits
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOB = ROOT / "jobs" / "digits_mlp.yaml"


def load_job(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """The job file as a dict, with `dotted.key=value` overrides set (values parsed as YAML)."""
    job = yaml.safe_load(Path(path).read_text()) or {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise SystemExit(f"{text}: an override must look like dotted.key=value")
        node = job
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):  # a missing (or null) section is created, as the orchestrator does
                child = node[part] = {}
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return job


def get(job: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """A dotted field of the job dict, or `default` where the file leaves it out (the orchestrator's default)."""
    node: Any = job
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return default
        node = node[part]
    return node


def split_indices(n: int, seed: int, test_split: float, val_split: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices, sized as orchestrator.data.assign_splits sizes them (not the same draw)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_split))
    rest = perm[n_test:]
    n_val = int(round(len(rest) * val_split))
    return rest[n_val:], rest[:n_val], perm[:n_test]


def build_mlp(in_features: int, hidden: int, layers: int, dropout: float, classes: int) -> nn.Module:
    parts: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(layers):
        parts += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    parts.append(nn.Linear(width, classes))
    return nn.Sequential(*parts)


def warmup_cosine(warmup: int, total: int, base_lr: float, min_lr: float):
    """LambdaLR factor of optimizer step `step` (0-based): linear warm-up from 0, then cosine down to min_lr."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return (min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / base_lr

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Loss, accuracy, macro F1, one-vs-rest macro ROC-AUC and the confusion matrix of one split."""
    model.eval()
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train()
    loss = F.cross_entropy(logits, y).item()
    probs = torch.softmax(logits, dim=1).numpy()
    pred, target = probs.argmax(axis=1), y.numpy()
    classes = np.arange(logits.shape[1])
    return {
        "loss": loss,
        "accuracy": float((pred == target).mean()),
        "f1": float(f1_score(target, pred, average="macro")),
        "roc_auc": float(roc_auc_score(target, probs, multi_class="ovr", average="macro", labels=classes)),
        "confusion_matrix": confusion_matrix(target, pred, labels=classes).tolist(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--job", default=str(DEFAULT_JOB), help="job file whose numbers to use [default: jobs/digits_mlp.yaml]"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=2 train.max_steps=50"
    )
    args = parser.parse_args(argv)
    job = load_job(args.job, args.overrides)
    # This is the baseline of one job, not a second orchestrator: refuse settings it would silently ignore.
    for key, want in (
        ("model.name", "mlp"),
        ("data.name", "digits"),
        ("optim.name", "adamw"),
        ("schedule.name", "warmup_cosine"),
    ):
        if get(job, key) != want:
            raise SystemExit(f"{key}: plain_digits.py only does {want}, the job says {get(job, key)!r}")

    seed = int(get(job, "train.seed", 0))
    epochs = int(get(job, "train.epochs", 10))
    max_steps = get(job, "train.max_steps")
    batch_size = int(get(job, "train.batch_size", 64))
    lr = float(get(job, "optim.lr", 1e-3))
    patience = int(get(job, "early_stopping.patience", 3)) if job.get("early_stopping") else None
    watched = get(job, "early_stopping.metric", "val_loss").removeprefix("val_")
    mode = get(job, "early_stopping.mode", "min")
    min_delta = float(get(job, "early_stopping.min_delta", 0.0))
    every_n_epochs = get(job, "checkpoint.every_n_epochs", 1)
    keep_last = int(get(job, "checkpoint.keep_last", 2))
    torch.manual_seed(seed)

    x_all, y_all = load_digits(return_X_y=True)
    x_all = torch.from_numpy((x_all / 16.0).astype(np.float32))
    y_all = torch.from_numpy(y_all.astype(np.int64))
    train_idx, val_idx, test_idx = split_indices(
        len(x_all), seed, float(get(job, "data.test_split", 0.1)), float(get(job, "validation.split", 0.2))
    )
    x_train, y_train = x_all[train_idx], y_all[train_idx]
    x_val, y_val = x_all[val_idx], y_all[val_idx]
    x_test, y_test = x_all[test_idx], y_all[test_idx]

    model = build_mlp(
        x_all.shape[1],
        int(get(job, "model.hidden", 128)),
        int(get(job, "model.layers", 2)),
        float(get(job, "model.dropout", 0.0)),
        10,
    )
    # Two groups as the orchestrator builds them (biases undecayed), so that both sides train the same model.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": float(get(job, "optim.weight_decay", 0.0))},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
    )
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total_steps = steps_per_epoch * epochs if not max_steps else min(steps_per_epoch * epochs, int(max_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(
            int(get(job, "schedule.warmup_steps", 0)), total_steps, lr, float(get(job, "schedule.min_lr", 0.0))
        ),
    )
    shuffle = torch.Generator().manual_seed(seed)

    ckpt_dir = Path(tempfile.mkdtemp(prefix="plain-digits-"))
    saved: list[Path] = []
    step, epoch, first_step_at = 0, 0, None
    best_value: float | None = None
    best_step: int | None = None
    best_val: dict[str, Any] = {}
    best_path: Path | None = None
    bad, stopped_early = 0, False
    try:
        while epoch < epochs and step < total_steps and not stopped_early:
            order = torch.randperm(len(x_train), generator=shuffle)
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                step += 1
                if first_step_at is None:
                    first_step_at = time.time()
                    print(f"first_step_at={first_step_at:.6f}", flush=True)
                if step >= total_steps:
                    break
            epoch_done = i + batch_size >= len(order)
            epoch += int(epoch_done)
            # Validation every epoch and at the end of training, as the orchestrator does.
            val = evaluate(model, x_val, y_val, batch_size)
            value = val[watched]
            better = best_value is None or (
                value > best_value + min_delta if mode == "max" else value < best_value - min_delta
            )
            if better:
                best_value, best_step, best_val, bad = value, step, val, 0
            else:
                bad += 1
            stopped_early = patience is not None and bad >= patience
            print(
                f"epoch {epoch} step {step}  val loss {val['loss']:.4f}  accuracy {val['accuracy']:.4f}  f1 {val['f1']:.4f}  roc_auc {val['roc_auc']:.4f}",
                flush=True,
            )
            if (epoch_done and every_n_epochs and epoch % every_n_epochs == 0) or step >= total_steps or stopped_early:
                path = ckpt_dir / f"step-{step:08d}.pt"
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "step": step,
                        "epoch": epoch,
                        "metrics": {k: v for k, v in val.items() if k != "confusion_matrix"},
                    },
                    path,
                )
                saved.append(path)
                if better:
                    best_path = path
                # Retention: the newest keep_last and the best.
                for old in saved[:-keep_last]:
                    if old != best_path and old.exists():
                        old.unlink()
        # The best checkpoint (the latest when the best was never saved) on the test split.
        chosen = best_path if best_path is not None and best_path.exists() else saved[-1]
        final = copy.deepcopy(model)
        final.load_state_dict(torch.load(chosen, weights_only=True)["model"])
        test = evaluate(final, x_test, y_test, batch_size)
    finally:
        for path in ckpt_dir.glob("*.pt"):
            path.unlink()
        ckpt_dir.rmdir()

    result = {
        "wall_s": round(time.time() - T0, 3),
        "first_step_at": first_step_at,
        "steps": step,
        "epochs": epoch,
        "stopped_early": stopped_early,
        "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
        "best_metric": "val_" + watched,
        "best_value": best_value,
        "best_step": best_step,
        "best_val_accuracy": best_val.get("accuracy"),
        "test_accuracy": test["accuracy"],
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
