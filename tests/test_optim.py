"""Optimizers from OptimSpec, schedules' LR curves and exact resume of a schedule."""

import io
import math

import pytest
import torch
from torch import nn

from orchestrator.optim import build_optimizer, build_schedule, lr_at
from orchestrator.spec import OptimSpec, ScheduleSpec


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.embed(x)))


def _ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize(
    "spec, cls, expected",
    [
        (
            OptimSpec(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        ),
        (
            OptimSpec(name="adam", lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02),
            torch.optim.Adam,
            {"lr": 3e-4, "betas": (0.8, 0.95), "eps": 1e-6},
        ),
        (
            OptimSpec(name="adamw", lr=1e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1),
            torch.optim.AdamW,
            {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-7},
        ),
        (
            OptimSpec(name="rmsprop", lr=0.01, alpha=0.9, eps=1e-5, momentum=0.5, weight_decay=0.03),
            torch.optim.RMSprop,
            {"lr": 0.01, "alpha": 0.9, "eps": 1e-5, "momentum": 0.5},
        ),
    ],
    ids=["sgd", "adam", "adamw", "rmsprop"],
)
def test_optimizer_type_hyperparameters_and_groups(spec, cls, expected):
    model = Net()
    opt = build_optimizer(model, spec)
    assert type(opt) is cls
    assert len(opt.param_groups) == 2
    for group in opt.param_groups:
        for key, value in expected.items():
            assert group[key] == value, key
    decay, no_decay = opt.param_groups
    assert _ids(decay["params"]) == _ids([model.embed.weight, model.head.weight])
    assert _ids(no_decay["params"]) == _ids([model.embed.bias, model.norm.weight, model.norm.bias, model.head.bias])
    assert decay["weight_decay"] == spec.weight_decay
    assert no_decay["weight_decay"] == 0.0


def test_weight_decay_leaves_biases_and_norms_alone():
    model = Net()
    opt = build_optimizer(model, OptimSpec(name="sgd", lr=0.5, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            # SGD's L2 term alone: w <- w - lr * wd * w.
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.5 * 0.1))
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_frozen_parameters_are_excluded():
    model = Net()
    model.embed.weight.requires_grad_(False)
    model.embed.bias.requires_grad_(False)
    opt = build_optimizer(model, OptimSpec())
    in_groups = _ids(p for g in opt.param_groups for p in g["params"])
    assert id(model.embed.weight) not in in_groups and id(model.embed.bias) not in in_groups
    assert in_groups == _ids(p for p in model.parameters() if p.requires_grad)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimSpec())


BASE = 0.1


def test_constant_with_and_without_warmup():
    plain = ScheduleSpec(name="constant")
    assert [lr_at(s, BASE, plain, 100) for s in (0, 50, 1000)] == [BASE] * 3
    warm = ScheduleSpec(name="constant", warmup_steps=10)
    assert lr_at(0, BASE, warm, 100) == 0.0
    assert lr_at(5, BASE, warm, 100) == pytest.approx(BASE / 2)
    assert lr_at(10, BASE, warm, 100) == BASE
    assert lr_at(99, BASE, warm, 100) == BASE


def test_step_decay_boundaries():
    spec = ScheduleSpec(name="step", step_size=30, gamma=0.5)
    assert lr_at(0, BASE, spec, 100) == BASE
    assert lr_at(29, BASE, spec, 100) == BASE
    assert lr_at(30, BASE, spec, 100) == pytest.approx(BASE * 0.5)
    assert lr_at(59, BASE, spec, 100) == pytest.approx(BASE * 0.5)
    assert lr_at(60, BASE, spec, 100) == pytest.approx(BASE * 0.25)


def test_cosine_start_midpoint_end():
    spec = ScheduleSpec(name="cosine", min_lr=0.01)
    assert lr_at(0, BASE, spec, 100) == pytest.approx(BASE)
    assert lr_at(50, BASE, spec, 100) == pytest.approx((BASE + 0.01) / 2)
    assert lr_at(25, BASE, spec, 100) > lr_at(50, BASE, spec, 100) > lr_at(75, BASE, spec, 100)
    assert lr_at(100, BASE, spec, 100) == pytest.approx(0.01)
    # A run that goes past its planned length stays at the floor.
    assert lr_at(150, BASE, spec, 100) == pytest.approx(0.01)


def test_warmup_cosine_warmup_end_midpoint_end():
    spec = ScheduleSpec(name="warmup_cosine", warmup_steps=20, min_lr=0.001)
    assert lr_at(0, BASE, spec, 120) == 0.0
    assert lr_at(10, BASE, spec, 120) == pytest.approx(BASE / 2)
    assert lr_at(20, BASE, spec, 120) == pytest.approx(BASE)
    assert lr_at(70, BASE, spec, 120) == pytest.approx((BASE + 0.001) / 2)
    assert lr_at(120, BASE, spec, 120) == pytest.approx(0.001)


def test_warmup_on_a_schedule_without_one_is_an_error():
    with pytest.raises(ValueError, match="warmup_steps: applies to constant and warmup_cosine, not cosine"):
        ScheduleSpec(name="cosine", warmup_steps=5)  # the job file is refused before anything runs
    # lr_at guards itself too, for a spec built without validation.
    with pytest.raises(ValueError, match="schedule.warmup_steps"):
        lr_at(
            0,
            BASE,
            ScheduleSpec.model_construct(name="cosine", warmup_steps=5, step_size=100, gamma=0.1, min_lr=0.0),
            100,
        )
    with pytest.raises(ValueError, match="total steps"):
        build_schedule(build_optimizer(Net(), OptimSpec()), ScheduleSpec(name="cosine"), 0)


def test_schedule_sets_every_group_once_per_step():
    opt = build_optimizer(Net(), OptimSpec(lr=BASE))
    spec = ScheduleSpec(name="warmup_cosine", warmup_steps=4, min_lr=0.0)
    sched = build_schedule(opt, spec, 20)
    assert sched.lr == 0.0
    for step in range(1, 25):
        sched.step()
        assert sched.lr == lr_at(step, BASE, spec, 20)
        assert [g["lr"] for g in opt.param_groups] == [sched.lr, sched.lr]


def test_groups_with_their_own_peak_lr_are_scaled():
    model = Net()
    opt = torch.optim.SGD(
        [{"params": model.head.parameters(), "lr": 0.1}, {"params": model.embed.parameters(), "lr": 0.01}], lr=0.1
    )
    spec = ScheduleSpec(name="cosine")
    sched = build_schedule(opt, spec, 10)
    for _ in range(5):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.005)


def test_plateau_drops_after_patience_and_stops_at_min_lr():
    opt = build_optimizer(Net(), OptimSpec(lr=1.0))
    sched = build_schedule(opt, ScheduleSpec(name="plateau", factor=0.5, patience=2, min_lr=0.3), 100)
    sched.step()
    assert sched.lr == 1.0
    sched.on_validation({"val_loss": 1.0})
    sched.on_validation({"val_loss": 1.0})
    sched.on_validation({"val_loss": 1.5})
    # Two validations without improvement are tolerated; the third drops the LR.
    assert sched.lr == 1.0
    sched.on_validation({"val_loss": 1.2})
    assert sched.lr == 0.5
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    sched.on_validation({"val_loss": 0.9})
    assert sched.lr == 0.5 and sched.num_bad == 0
    for _ in range(3):
        sched.on_validation({"val_loss": 0.95})
    assert sched.lr == 0.3  # 0.25 floored
    for _ in range(6):
        sched.on_validation({"val_loss": 0.95})
    assert sched.lr == 0.3


def test_plateau_max_mode_and_missing_metric():
    opt = build_optimizer(Net(), OptimSpec(lr=1.0))
    sched = build_schedule(
        opt, ScheduleSpec(name="plateau", metric="val_accuracy", mode="max", patience=0, factor=0.1), 10
    )
    sched.on_validation({"val_accuracy": 0.5})
    sched.on_validation({"val_accuracy": 0.6})
    assert sched.lr == 1.0
    sched.on_validation({"val_accuracy": 0.55})
    assert sched.lr == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'val_accuracy' is not among"):
        sched.on_validation({"val_loss": 0.1})


def test_validation_does_not_move_step_schedules():
    opt = build_optimizer(Net(), OptimSpec(lr=BASE))
    sched = build_schedule(opt, ScheduleSpec(name="step", step_size=2), 10)
    sched.on_validation({"val_loss": 5.0})
    sched.on_validation({})
    assert sched.lr == BASE


RESUME_SPECS = [
    ScheduleSpec(name="constant", warmup_steps=5),
    ScheduleSpec(name="step", step_size=7, gamma=0.5),
    ScheduleSpec(name="cosine", min_lr=1e-4),
    ScheduleSpec(name="warmup_cosine", warmup_steps=6, min_lr=1e-4),
    ScheduleSpec(name="plateau", patience=1, factor=0.5, min_lr=1e-3),
]


def _run(opt, sched, model, steps, start=0):
    """Train `steps` steps from `start`, validating every 3 with a loss that stalls, and record LRs."""
    lrs = []
    for step in range(start, start + steps):
        lrs.append(tuple(g["lr"] for g in opt.param_groups))
        model.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        sched.step()
        if step % 3 == 2:
            sched.on_validation({"val_loss": 1.0 / (1 + min(step, 8))})
    return lrs


@pytest.mark.parametrize("spec", RESUME_SPECS, ids=lambda s: s.name)
def test_state_dict_round_trip_continues_identically(spec):
    total, cut = 30, 11
    ospec = OptimSpec(name="adamw", lr=0.01, weight_decay=0.1)

    torch.manual_seed(0)
    model = Net()
    opt = build_optimizer(model, ospec)
    uninterrupted = _run(opt, build_schedule(opt, spec, total), model, total)

    torch.manual_seed(0)
    model = Net()
    opt = build_optimizer(model, ospec)
    sched = build_schedule(opt, spec, total)
    first = _run(opt, sched, model, cut)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "schedule": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    # A fresh worker: build, restore the optimizer (whose groups hold the mid-schedule LR), then the schedule.
    model = Net()
    model.load_state_dict(saved["model"])
    opt = build_optimizer(model, ospec)
    opt.load_state_dict(saved["optim"])
    sched = build_schedule(opt, spec, total)
    sched.load_state_dict(saved["schedule"])
    rest = _run(opt, sched, model, total - cut, start=cut)

    assert first + rest == uninterrupted
    assert len(set(uninterrupted)) > 1 or spec.name == "constant"


def test_schedule_built_on_a_restored_optimizer_keeps_the_peak_lr():
    spec = ScheduleSpec(name="warmup_cosine", warmup_steps=10)
    model = Net()
    opt = build_optimizer(model, OptimSpec(lr=BASE))
    sched = build_schedule(opt, spec, 50)
    for _ in range(3):
        sched.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["lr"] == pytest.approx(0.3 * BASE)

    opt2 = build_optimizer(model, OptimSpec(lr=BASE))
    opt2.load_state_dict(saved)
    sched2 = build_schedule(opt2, spec, 50)
    assert sched2.base_lr == BASE
    sched2.load_state_dict(sched.state_dict())
    sched2.step()
    sched.step()
    assert sched2.lr == sched.lr == lr_at(4, BASE, spec, 50)
    assert not math.isnan(sched2.lr)
