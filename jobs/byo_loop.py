"""A plain Ray Train loop, as a user would already have it: logistic regression on digits with DDP."""

import os
import tempfile

import ray.train
import ray.train.torch
import torch
from sklearn.datasets import load_digits


def train_loop_per_worker(config):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    ctx = ray.train.get_context()
    x, y = x[ctx.get_world_rank() :: ctx.get_world_size()], y[ctx.get_world_rank() :: ctx.get_world_size()]
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    for epoch in range(config["epochs"]):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            loss.backward()
            opt.step()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if ctx.get_world_rank() == 0:
                torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"epoch": epoch, "loss": loss.item(), "accuracy": accuracy}, checkpoint=checkpoint)
