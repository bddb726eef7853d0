"""Hyper-parameter sweeps with Ray Tune over a job file: the search, the schedulers, the trials, resume, the best job.

- load.py        the sweep file read and checked before Ray starts (`load_sweep`), and each trial's job
- space.py       Tune's search space of the sweep section (pure)
- schedulers.py  FIFO, ASHA or PBT; the search algorithm; what a trial reserves (pure)
- trial.py       one trial: a run of the job in `<sweep>/<trial id>`, reporting to Tune (with sweep.cv_folds: its
                 folds `<trial id>/fold-<i>` in turn, reporting their mean); PBT's hand-over
- progress.py    the live view (a Tune callback)
- run.py         the Tune run: new or resumed; sweep.json; trials cut off by an interruption
- export.py      the ranked trials, the table, the best trial as a job file
- submit.py      a sweep (or a cross-validation) submitted to a Ray cluster through the Jobs API
"""

from orchestrator.sweep.export import format_result
from orchestrator.sweep.load import SweepJob, load_sweep, trial_spec
from orchestrator.sweep.run import run_sweep
from orchestrator.sweep.schedulers import build_scheduler, build_search, trial_resources
from orchestrator.sweep.space import build_param_space
from orchestrator.sweep.submit import build_sweep_submission, submit_sweep

__all__ = [
    "SweepJob",
    "build_param_space",
    "build_scheduler",
    "build_search",
    "build_sweep_submission",
    "format_result",
    "load_sweep",
    "run_sweep",
    "submit_sweep",
    "trial_resources",
    "trial_spec",
]
