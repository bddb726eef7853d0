"""Sweeps without a running Ray: the sweep section, bad input before Ray, the Tune search space, the PBT hand-over."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from commands import run_command

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.spec import SpecError, build_spec, load_spec

ROOT = Path(__file__).resolve().parents[1]
LR_SWEEP = "jobs/sweep_digits_lr.yaml"
ASHA_SWEEP = "jobs/sweep_digits_asha.yaml"


def orchestrator(*args, cwd=ROOT, timeout=120):
    return run_command([sys.executable, "-m", "orchestrator", *args], cwd=cwd, timeout=timeout)


def sweep_spec(**sweep):
    return build_spec(
        {"sweep": {"parameters": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}}, **sweep}}
    ).sweep


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before Ray starts, nothing written


@pytest.mark.parametrize(
    "file, overrides, message",
    [
        (
            LR_SWEEP,
            ['sweep.parameters={"optim.lrr": {type: grid, values: [0.1]}}'],
            "error: sweep.parameters.optim.lrr: not a field of the job (optim.lrr: unknown field (did you mean 'lr'?))",
        ),
        (
            LR_SWEEP,
            ['sweep.parameters={"optim": {type: grid, values: [0.1]}}'],
            "error: sweep.parameters.optim: is a section of the job, not a field; name a field in it (e.g. optim.name)",
        ),
        (
            LR_SWEEP,
            ['sweep.parameters={"optim.lr": {type: choice, values: []}}'],
            "error: sweep.parameters.optim.lr.values: a choice needs at least one value",
        ),
        (
            LR_SWEEP,
            ['sweep.parameters={"optim.lr": {type: loguniform, low: 0.1, high: 1e-3}}'],
            "error: sweep.parameters.optim.lr.low: 0.1 is above high=0.001",
        ),
        (
            LR_SWEEP,
            ['sweep.parameters={"model.hidden": {type: choice, values: [32, 0]}}'],
            "error: sweep.parameters.model.hidden: the value 0 does not make a valid job (model.hidden: Input should be greater than or equal to 1)",
        ),
        (
            ASHA_SWEEP,
            ["sweep.scheduler.max_tt=3"],
            "error: sweep.scheduler.max_tt: unknown field (did you mean 'max_t'?)",
        ),
        (
            ASHA_SWEEP,
            ["sweep.scheduler.perturbation_interval=3"],
            "error: sweep.scheduler.perturbation_interval: is an option of pbt, not asha",
        ),
        (
            ASHA_SWEEP,
            ["sweep.scheduler.name=hyperband"],
            "error: sweep.scheduler.name: Input should be 'fifo', 'asha' or 'pbt'",
        ),
        (
            ASHA_SWEEP,
            ["sweep.metric=val_acc"],
            "error: sweep.metric: 'val_acc' is not a validation metric of this job (did you mean 'val_accuracy'?)",
        ),
        (
            ASHA_SWEEP,
            ["sweep.search=grid"],
            "error: sweep.search: grid needs values to enumerate; optim.lr is loguniform",
        ),
        (
            LR_SWEEP,
            ["sweep.scheduler.name=pbt", "sweep.scheduler.grace_period=2"],
            "error: sweep.scheduler.grace_period: is an option of asha, not pbt",
        ),
        (
            LR_SWEEP,
            ["sweep.scheduler.name=pbt", 'sweep.parameters={"model.hidden": {type: grid, values: [32]}}'],
            "error: sweep.scheduler.mutations: model.hidden cannot change in a running trial",
        ),
        (ASHA_SWEEP, ["sweep.scheduler.grace_period=30"], "error: sweep.scheduler.grace_period: 30 is above max_t=18"),
        (ASHA_SWEEP, ["scaling.num_workers=64"], "error: scaling.num_workers: 64 worker(s) x 1 CPU need 64 CPUs"),
        ("jobs/digits_mlp.yaml", [], "error: jobs/digits_mlp.yaml: no sweep section"),
        # sweep.cv_folds: scoring each trial by k-fold cross-validation
        (LR_SWEEP, ["sweep.cv_folds=1"], "error: sweep.cv_folds: Input should be greater than or equal to 2"),
        # The smallest digit class has 161 examples outside the test split (checked on the data, before Ray starts).
        (LR_SWEEP, ["sweep.cv_folds=200"], "error: sweep.cv_folds: 200 is more than the smallest class has examples"),
        (
            LR_SWEEP,
            ["sweep.cv_folds=3", "data={name: synthetic, task: regression, stratify: true}"],
            "error: data.stratify: stratified folds need class labels, and regression data has none",
        ),
        (
            ASHA_SWEEP,
            ["sweep.cv_folds=3"],
            "error: sweep.cv_folds: a k-fold trial's metric is known only after its last fold, so asha has nothing",
        ),
        (LR_SWEEP, ["sweep.cv_folds=3", "data.folds=5"], "error: sweep.cv_folds: 3, but the job sets data.folds: 5"),
        (
            LR_SWEEP,
            ["sweep.cv_folds=3", 'sweep.parameters={"data.fold": {type: grid, values: [0, 1]}}'],
            "error: sweep.cv_folds: every trial trains all k folds",
        ),
    ],
)
def test_bad_sweeps_are_one_line_and_exit_2_before_ray(file, overrides, message, tmp_path):
    res = orchestrator("sweep", file, f"checkpoint.storage={tmp_path}/runs", *overrides)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert "Ray" not in res.stderr  # no Ray started, no Ray message


def test_every_example_sweep_validates_and_runs_as_a_plain_job_file():
    for path in sorted((ROOT / "jobs").glob("sweep_*.yaml")):
        spec = load_spec(path)
        assert spec.sweep is not None and spec.sweep.parameters, path
        res = orchestrator("validate", str(path))
        assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------------------------
# The sweep section


def test_yaml_numbers_in_values_are_numbers_and_modes_follow_the_metric():
    spec = build_spec(
        yaml.safe_load("sweep: {parameters: {optim.lr: {type: grid, values: [1e-4, 1e-3]}}, metric: val_accuracy}")
    )
    assert spec.sweep.parameters["optim.lr"].values == [1e-4, 1e-3]
    assert spec.sweep.mode == "max" and sweep_spec().mode == "min"


def test_a_resolved_sweep_job_loads_again():
    spec = load_spec(ASHA_SWEEP)
    assert build_spec(spec.to_dict()) == spec


def test_trial_count_crosses_grids_and_repeats_samples():
    assert sweep_spec(num_samples=5).trial_count == 5
    grid = build_spec(
        {
            "sweep": {
                "parameters": {
                    "optim.lr": {"type": "grid", "values": [1, 2, 3]},
                    "model.hidden": {"type": "choice", "values": [8, 16]},
                },
                "num_samples": 2,
            }
        }
    ).sweep
    assert grid.trial_count == 6
    assert grid.model_copy(update={"search": "grid"}).trial_count == 12


def test_a_sweep_file_can_name_its_job_file(tmp_path):
    from orchestrator.sweep import load_sweep

    (tmp_path / "base.yaml").write_text("name: base\nmodel: {hidden: 16, layers: 1}\ntrain: {epochs: 3}\n")
    (tmp_path / "s.yaml").write_text(
        "job: base.yaml\ntrain: {epochs: 2}\nsweep: {parameters: {optim.lr: {type: grid, values: [0.1]}}}\n"
    )
    job = load_sweep(str(tmp_path / "s.yaml"), [f"checkpoint.storage={tmp_path}/runs"])
    assert job.spec.train.epochs == 2 and job.spec.model.hidden == 16 and job.spec.model.layers == 1
    assert job.name == "base-sweep" and job.uri == f"{tmp_path}/runs/base-sweep" and job.base_dir == str(tmp_path)
    assert "sweep" not in job.job
    (tmp_path / "s2.yaml").write_text(
        "job: missing.yaml\nsweep: {parameters: {optim.lr: {type: grid, values: [0.1]}}}\n"
    )
    with pytest.raises(SpecError, match="missing.yaml: no such job file"):
        load_sweep(str(tmp_path / "s2.yaml"))


def test_the_same_sweep_has_the_same_identity(tmp_path):
    from orchestrator.spec.identity import changes
    from orchestrator.sweep import load_sweep

    def changed(*overrides: str) -> list[str]:
        other = load_sweep(LR_SWEEP, [f"checkpoint.storage={tmp_path}", *overrides])
        return [path for path, _, _ in changes(base.settings(), other.settings())]

    base = load_sweep(LR_SWEEP, [f"checkpoint.storage={tmp_path}"])
    assert changed("sweep.max_concurrent_trials=1") == []  # how many at once: the same sweep
    assert changed("tracking.tensorboard.log_dir=tb") == []  # where it is watched: the same sweep
    assert changed("sweep.num_samples=2") == ["sweep.num_samples"]
    assert changed("train.epochs=3") == ["train.epochs"]
    assert load_sweep(LR_SWEEP, [f"checkpoint.storage={tmp_path}"], fresh=True).name.startswith("digits-lr-")


# ----------------------------------------------------------------------------------------------
# Render: search space, schedulers and searches


def test_each_parameter_type_becomes_its_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

    from orchestrator.sweep import build_param_space

    sweep = build_spec(
        {
            "sweep": {
                "parameters": {
                    "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
                    "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.3},
                    "model.hidden": {"type": "choice", "values": [32, 64]},
                    "model.layers": {"type": "randint", "low": 1, "high": 3},
                    "train.batch_size": {"type": "grid", "values": [16, 32]},
                    "optim.weight_decay": {"type": "qloguniform", "low": 1e-5, "high": 1e-2, "q": 1e-5},
                }
            }
        }
    ).sweep
    space = build_param_space(sweep)
    assert isinstance(space["optim.lr"], Float) and isinstance(space["optim.lr"].get_sampler(), LogUniform)
    assert (space["optim.lr"].lower, space["optim.lr"].upper) == (1e-4, 1e-1)
    assert isinstance(space["model.dropout"], Float) and space["model.dropout"].upper == 0.3
    assert isinstance(space["model.hidden"], Categorical) and space["model.hidden"].categories == [32, 64]
    assert isinstance(space["model.layers"], Integer) and (
        space["model.layers"].lower,
        space["model.layers"].upper,
    ) == (1, 4)  # high included
    assert space["train.batch_size"] == {"grid_search": [16, 32]}
    assert isinstance(space["optim.weight_decay"].get_sampler(), Quantized)
    enumerated = build_param_space(
        sweep.model_copy(update={"search": "grid", "parameters": {"model.hidden": sweep.parameters["model.hidden"]}})
    )
    assert enumerated == {"model.hidden": {"grid_search": [32, 64]}}


def test_schedulers_and_searches():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from orchestrator.sweep import build_scheduler, build_search

    spec = load_spec(ASHA_SWEEP)
    asha = build_scheduler(spec.sweep, spec)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "epoch"
    # 18 epochs, grace 2, factor 3: rungs at 2 and 6; none at 18, where a trial has finished anyway.
    assert [r[0] for r in asha._brackets[0]._rungs] == [6, 2]
    shorter = build_scheduler(
        spec.sweep.model_copy(update={"scheduler": spec.sweep.scheduler.model_copy(update={"max_t": 9})}), spec
    )
    assert shorter._max_t == 9  # a horizon below the trial's length stops trials there
    assert isinstance(build_scheduler(load_spec(LR_SWEEP).sweep, load_spec(LR_SWEEP)), FIFOScheduler)
    pbt_spec = build_spec(
        {
            "sweep": {
                "parameters": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
                "scheduler": {"name": "pbt", "perturbation_interval": 3},
            }
        }
    )
    pbt = build_scheduler(pbt_spec.sweep, pbt_spec)
    assert (
        isinstance(pbt, PopulationBasedTraining)
        and pbt._perturbation_interval == 3
        and list(pbt._hyperparam_mutations) == ["optim.lr"]
    )
    assert isinstance(build_search(spec.sweep), BasicVariantGenerator)
    optuna = build_search(spec.sweep.model_copy(update={"search": "optuna"}))
    assert isinstance(optuna, ConcurrencyLimiter) and type(optuna.searcher).__name__ == "OptunaSearch"


def test_trial_resources_follow_scaling():
    from orchestrator.sweep import trial_resources

    assert trial_resources(build_spec({"scaling": {"num_workers": 1, "cpus_per_worker": 2}})) == {"CPU": 2}
    assert trial_resources(build_spec({"scaling": {"num_workers": 0}})) == {"CPU": 1}
    # Several workers: a Ray Train run whose workers reserve their own CPUs.
    assert trial_resources(build_spec({"scaling": {"num_workers": 2}})) == {"CPU": 0.01}


def test_trial_settings_are_applied_and_kept_in_range():
    import numpy as np

    from orchestrator.sweep import trial_spec

    sweep = build_spec({"sweep": {"parameters": {"model.dropout": {"type": "uniform", "low": 0.0, "high": 0.3}}}}).sweep
    spec = trial_spec(
        {"model": {"hidden": 8}},
        {"model.dropout": np.float64(0.36), "model.hidden": np.int64(16)},
        "t-1",
        sweep.parameters,
    )
    assert (
        spec.model.dropout == 0.3 and spec.model.hidden == 16 and spec.name == "t-1"
    )  # PBT's perturbation past high is clamped


def test_build_sweep_submission_runs_the_sweep_command_on_the_cluster(tmp_path):
    from orchestrator.sweep import build_sweep_submission, load_sweep

    job = load_sweep(LR_SWEEP, ["checkpoint.storage=/shared/runs"])
    submission = build_sweep_submission(job, ["checkpoint.storage=/shared/runs"])
    # Its table in the job's logs, its result on one line that `orchestrator logs` leaves out.
    assert (
        submission["entrypoint"]
        == "python -m orchestrator sweep sweep_digits_lr.yaml checkpoint.storage=/shared/runs --ray-address auto --result-line"
    )
    assert submission["runtime_env"]["working_dir"] == str(ROOT / "jobs")
    assert submission["metadata"]["orchestrator_run"] == "digits-lr"


# ----------------------------------------------------------------------------------------------
# PBT's hand-over: the donor's checkpoint becomes the recipient's, with the recipient's settings


def test_exploit_copies_the_donors_checkpoint_with_the_recipients_optimizer_settings(tmp_path):
    from ray import tune

    from orchestrator.loop import LoopContext, run_training
    from orchestrator.rundir import RunDir
    from orchestrator.sweep.trial import POINTER, adopt_exploited_checkpoint

    raw = {
        "model": {"name": "mlp", "hidden": 16, "layers": 1},
        "train": {"epochs": 1, "max_steps": 8, "batch_size": 64},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 2},
        "checkpoint": {"storage": str(tmp_path), "every_n_steps": 4, "keep_last": 5},
    }
    donor, recipient = str(tmp_path / "donor"), str(tmp_path / "recipient")
    run_training(build_spec(raw, ["optim.lr=0.01"]), LoopContext(run_uri=donor))
    run_training(
        build_spec(raw, ["optim.lr=0.0001", "train.max_steps=6", "checkpoint.every_n_steps=3"]),
        LoopContext(run_uri=recipient),
    )
    pointer = tmp_path / "tune-ckpt"
    pointer.mkdir()
    (pointer / POINTER).write_text(json.dumps({"run_uri": donor, "step": 4}))
    spec = build_spec(raw, ["optim.lr=0.02", "optim.weight_decay=0.5"])

    assert (
        adopt_exploited_checkpoint(tune.Checkpoint.from_directory(str(pointer)), RunDir.open(recipient), spec)
        == f"{donor}/checkpoint_00000004"
    )
    fs, root = storage.open_storage(recipient)
    found = ckpt.list_checkpoints(fs, root)
    assert [c.step for c in found] == [4]  # the recipient's own lineage (steps 3, 6) is gone
    state = ckpt.deserialize_state(ckpt.read_verified(fs, found[0])["state.pt"])
    decay, no_decay = state["optimizer"]["param_groups"]
    assert (
        decay["initial_lr"] == no_decay["initial_lr"] == 0.02
        and decay["weight_decay"] == 0.5
        and no_decay["weight_decay"] == 0.0
    )
    donor_weights = ckpt.deserialize_weights(ckpt.read_verified(*_checkpoint_at(donor, 4))[ckpt.WEIGHTS])
    own_weights = ckpt.deserialize_weights(ckpt.read_verified(fs, found[0])[ckpt.WEIGHTS])
    assert all((donor_weights[k] == own_weights[k]).all() for k in donor_weights)

    # The loop resumes the copy at the donor's step with the recipient's LR on the schedule.
    summary = run_training(spec, LoopContext(run_uri=recipient))
    assert summary.resumed_from.endswith("checkpoint_00000004") and summary.steps == 8
    # Its own pointer is no exploit: nothing changes.
    (pointer / POINTER).write_text(json.dumps({"run_uri": recipient, "step": 8}))
    assert (
        adopt_exploited_checkpoint(tune.Checkpoint.from_directory(str(pointer)), RunDir.open(recipient), spec) is None
    )
    assert [c.step for c in ckpt.list_checkpoints(fs, root)] == [4, 8]


def _checkpoint_at(run_uri: str, step: int):
    fs, root = storage.open_storage(run_uri)
    return fs, next(c for c in ckpt.list_checkpoints(fs, root) if c.step == step)


def test_the_sweeps_callback_usage_tag_counts_as_rays_own_does():
    """The sweep records Ray's callback usage tag without the imports of Ray's integrations; the counts are Ray's."""
    from ray.air._internal.usage import _count_callbacks
    from ray.tune import Callback
    from ray.tune.logger import LoggerCallback

    from orchestrator.sweep.progress import live_view
    from orchestrator.sweep.run import callback_counts

    class Logs(LoggerCallback):
        pass

    for callbacks in (
        [live_view("runs/x", None, "val_loss", "min", print)],
        [Callback(), Logs(), Callback()],
        [object()],
        [],
    ):
        assert callback_counts(callbacks) == dict(_count_callbacks(callbacks))


# ----------------------------------------------------------------------------------------------
# The end of a sweep: trials ranked by their best value, as the report ranks them


class TuneResult:
    """What the sweep reads of one of Tune's results (`ray.tune.Result`): its directory, last metrics, config, error."""

    def __init__(self, path: Path, metrics: dict, config: dict):
        self.path, self.metrics, self.config, self.error = str(path), metrics, config, None


def test_trials_are_ranked_by_their_best_value_and_the_console_says_the_reports_best(tmp_path):
    from orchestrator.rundir import RunDir
    from orchestrator.runrecord import RunRecord, RunStatus
    from orchestrator.sweep import format_result, load_sweep
    from orchestrator.sweep.export import collect_trials

    sweep = load_sweep("jobs/sweep_digits_lr.yaml", [f"checkpoint.storage={tmp_path}"])
    results = []
    # Trial a peaked at 0.9 and ended at 0.5; trial b ended at its best, 0.7: a is the better trial (its best checkpoint).
    for trial_id, values, lr in (("a_00000", [0.9, 0.5], 0.1), ("b_00001", [0.6, 0.7], 0.001)):
        run = RunDir.open(f"{sweep.uri}/{trial_id}")
        log = run.metrics_log([])
        for step, value in enumerate(values, 1):
            log.append({"step": step, "epoch": 0, "split": "val", "val_accuracy": value})
        record = RunRecord.begin(trial_id, {})
        record.end(RunStatus.FINISHED, None)
        record.save(run)
        results.append(TuneResult(Path(run.root), {"val_accuracy": values[-1], "step": 2}, {"optim.lr": lr}))
    rows = collect_trials(results, sweep)
    assert [(r.trial_id, r.metric, r.best_metric) for r in rows] == [("a_00000", 0.5, 0.9), ("b_00001", 0.7, 0.7)]
    best = {"trial_id": "a_00000", "config": {"optim.lr": 0.1}, "metric": 0.5, "best_metric": 0.9}
    result = {
        "status": "finished",
        "sweep": "digits-lr",
        "metric": "val_accuracy",
        "trials": [{**r.__dict__} for r in rows],
        "total_steps": 4,
        "wall_s": 1.0,
        "best": best,
        "best_job_file": "best.yaml",
        "report": f"{sweep.uri}/report.html",
    }
    _, text = format_result(result)
    assert "  best val_accuracy 0.9000: a_00000  optim.lr=0.1" in text.splitlines()
    assert f"  report: {sweep.uri}/report.html" in text.splitlines()


@pytest.mark.parametrize(
    "mode, values, other, shown", [("max", [0.9630, 0.9588], 0.95, 0.9630), ("min", [0.2, 0.3], 0.25, 0.2)]
)
def test_the_live_view_shows_each_trials_best_so_far_as_the_end_ranks_them(mode, values, other, shown):
    """Seen live: best 0.9630, then 0.9588 as that trial's metric fell back, and 0.9630 again at the end."""
    from ray.tune.experiment import Trial

    from orchestrator.sweep import progress

    lines = []
    view = progress.live_view("runs/x", None, "val_accuracy", mode, lines.append, every_s=0.0)
    a, b = (Trial("digits", config={"optim.lr": lr}, stub=True) for lr in (0.003, 0.01))
    for trial in (a, b):
        trial.set_status(Trial.RUNNING)  # a running trial's status is Tune's alone: no run.json is read
    # Tune records each result on its trial first, then calls the callbacks.
    for trial, value in ((a, values[0]), (b, other), (a, float("nan")), (a, values[1])):
        result = {"val_accuracy": value, "training_iteration": 1}
        trial.update_last_result(result)
        view.on_trial_result(0, [a, b], trial, result)
    assert lines[-1].endswith(f"| best val_accuracy {shown:.4f} ({a.trial_id}: optim.lr=0.003)"), lines
    assert not [line for line in lines if f"best val_accuracy {values[1]:.4f}" in line], lines
