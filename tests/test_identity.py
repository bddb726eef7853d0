"""A run's identity (spec.identity): every field of the job classified, and what counts as a change."""

from __future__ import annotations

import pytest

from orchestrator.spec import build_spec, iter_fields
from orchestrator.spec.identity import (
    FIELDS,
    SWEEP_FIELDS,
    changes,
    classified,
    describe_changes,
    only_horizon_grew,
    settings_of,
)

# Entries that classify everything under them: a whole section whose fields are all of one kind by nature, or a
# field that holds a mapping. Any other entry names one field, so that a new field fails the test below.
WHOLE = {"tracking", "sweep", "config"}


def test_every_field_of_the_job_is_classified_by_its_own_entry():
    paths = [path for path, *_ in iter_fields()]
    unclassified = [p for p in paths if classified(p) is None]
    assert not unclassified, f"classify these in orchestrator/spec/identity.py FIELDS: {unclassified}"
    by_section = [p for p in paths if p not in FIELDS and not any(p.startswith(f"{w}.") for w in WHOLE)]
    assert not by_section, f"give these an entry of their own in FIELDS: {by_section}"
    stale = [k for k in FIELDS if not any(p == k or p.startswith(f"{k}.") for p in paths)]
    assert not stale, f"FIELDS names fields the job no longer has: {stale}"


def test_every_field_of_the_sweep_section_is_classified_for_a_sweeps_identity():
    paths = [path for path, *_ in iter_fields() if path.startswith("sweep.")]
    assert paths and all(classified(p, SWEEP_FIELDS) is not None for p in paths)


def job(*overrides: str) -> dict:
    return build_spec({"name": "t", "data": {"name": "digits"}}, list(overrides)).to_dict()


@pytest.mark.parametrize(
    "override",
    [
        "tracking.mlflow.tracking_uri=http://127.0.0.1:5000",
        "scaling.num_workers=2",
        "checkpoint.endpoint_url=http://127.0.0.1:9000",
        "checkpoint.upload_timeout_s=30",
        "checkpoint.lease_ttl_s=20",
        "checkpoint.keep_last=5",
        "train.log_every_n_steps=7",
        "failure.max_failures=9",
    ],
)
def test_settings_that_do_not_change_the_result_pass(override):
    assert changes(settings_of(job()), settings_of(job(override))) == []


def test_a_change_names_each_field_old_and_new():
    found = changes(settings_of(job()), settings_of(job("optim.lr=0.1", "train.epochs=5", "model.name=cnn")))
    assert sorted(path for path, _, _ in found) == ["model.name", "optim.lr", "train.epochs"]
    assert "optim.lr 0.001 -> 0.1" in describe_changes(found) and "model.name mlp -> cnn" in describe_changes(found)


def test_a_section_switched_on_is_named_field_by_field():
    found = changes(settings_of(job()), settings_of(job("early_stopping.metric=val_loss")))
    assert [path for path, _, _ in found][0].startswith("early_stopping.")


@pytest.mark.parametrize(
    "overrides, grew",
    [
        (["train.epochs=20"], True),
        (["train.max_steps=200"], True),
        (["train.max_steps=null"], True),  # unlimited: longer
        (["train.epochs=5"], False),  # shorter is another run
        (["train.max_steps=50"], False),
        (["train.epochs=20", "optim.lr=0.1"], False),  # more than the horizon
    ],
)
def test_only_a_longer_horizon_can_be_extended(overrides, grew):
    before = settings_of(job("train.epochs=10", "train.max_steps=100"))
    after = settings_of(job("train.epochs=10", "train.max_steps=100", *overrides))
    assert only_horizon_grew(changes(before, after)) is grew


# ----------------------------------------------------------------------------------------------
# The rerun rule (session.check_rerun) on records


def recorded(status: str = "finished", stopped_early: bool = False, *overrides: str):
    from orchestrator.runrecord import RunRecord, RunStatus, RunSummary

    summary = RunSummary(run="t", run_uri="/r/t", status=RunStatus(status), steps=40, stopped_early=stopped_early)
    return RunRecord(run="t", status=RunStatus(status), started="", job=job(*overrides), summary=summary)


def test_the_rerun_rule():
    from orchestrator.errors import BadInput
    from orchestrator.session import check_rerun

    spec = build_spec({"name": "t", "data": {"name": "digits"}})
    assert check_rerun(None, spec, "/r/t").previous is None
    assert check_rerun(recorded(), spec, "/r/t").done
    assert not check_rerun(recorded("interrupted"), spec, "/r/t").done  # resumes
    longer = build_spec({"name": "t", "data": {"name": "digits"}}, ["train.epochs=20"])
    extended = check_rerun(recorded(), longer, "/r/t", extend=True).extension
    assert extended == {"from_step": 40, "changes": {"train.epochs": [10, 20]}}
    for previous, new, extend, words in [
        (None, spec, True, "--extend: /r/t holds no run to extend"),
        (recorded(), spec, True, "--extend: /r/t already runs to train.epochs 10"),
        (recorded(), longer, False, "train.epochs 10 -> 20; use --fresh for a new run, or another name, or --extend"),
        (recorded("failed"), longer, False, "holds an unfinished run with other settings: train.epochs 10 -> 20"),
        (recorded("finished", True), longer, True, "stopped early at step 40"),
    ]:
        with pytest.raises(BadInput) as refused:
            check_rerun(previous, new, "/r/t", extend=extend)
        assert words in refused.value.lines[0]
