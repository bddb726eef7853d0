"""What a user waits for: whole commands, start to exit; left out only the one `ray start --head` the `*_up` cases attach to.

Runs in turn, in one invocation (A B A B ... with --repeat): a plain PyTorch script doing jobs/digits_mlp.yaml's
work (bench/plain_digits.py), the same script's loop hand-written on Ray Train in one worker actor
(bench/raytrain_digits.py: what the orchestrator's one-worker run must beat), `orchestrator run` on that
job in local mode (scaling.num_workers=0) and as the job says (one Ray worker), and `orchestrator sweep` on jobs/sweep_digits_asha.yaml under
FIFO and under ASHA. Prints, per command, the wall time, the time from command start to the first
optimizer step (the command's own `first_step_at` stamp; "n/a" where it gives none), the exit status,
the ratios of both runs to the plain script, and ASHA/FIFO wall with each sweep's best metric and
steps. Interpreter start-up, imports, Ray start and stop, checkpoint uploads, the test evaluation and the
HTML report all count: they are part of the command. Timed with time.time() around subprocess only.
Everything is written under a temporary checkpoint.storage, never into runs/.

The `worker_up`, `fifo_up` and `asha_up` cases run the same commands while a local Ray is already up
(`ray start --head`, as docs/cluster.md suggests for repeated runs): the benchmark starts it before them and
stops it after, in each round, and that start is not timed. The other cases pass `--ray-address local`, so
they always start their own embedded Ray.

Usage: python bench/end_to_end.py [--repeat N] [--only plain,local,worker,fifo,asha,...] [--json] [KEY=VALUE ...]
  KEY=VALUE overrides go to every command (sweep.* ones only to the sweeps), e.g. for a quick pass:
  python bench/end_to_end.py train.epochs=3 sweep.num_samples=4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JOB = "jobs/digits_mlp.yaml"
SWEEP = "jobs/sweep_digits_asha.yaml"
PLAIN = "bench/plain_digits.py"
RAYTRAIN = "bench/raytrain_digits.py"
ORCH = [sys.executable, "-m", "orchestrator"]

CASES = {
    "plain": "plain PyTorch script",
    "local": "orchestrator run, local mode",
    "worker": "orchestrator run, 1 Ray worker (the default job)",
    "raytrain": "hand-written Ray Train, 1 worker",
    "fifo": "orchestrator sweep, FIFO",
    "asha": "orchestrator sweep, ASHA",
    "worker_up": "run, 1 worker, local Ray up",
    "fifo_up": "sweep FIFO, local Ray up",
    "asha_up": "sweep ASHA, local Ray up",
}
SWEEPS = ("fifo", "asha", "fifo_up", "asha_up")
VS_PLAIN = ("local", "worker", "worker_up", "raytrain")  # compared with the plain script; the sweeps with each other
ATTACHED = ("worker_up", "fifo_up", "asha_up")
RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class Timing:
    """One command: what the benchmark clocked and what the command itself reported."""

    case: str
    repeat: int
    argv: list[str]
    rc: int
    wall_s: float  # just before Popen to the process's exit
    first_step_s: float | None = None  # command start to its first optimizer step
    own_wall_s: float | None = None  # the command's own wall_s (from inside the process)
    best_metric: str | None = None
    best: float | None = None
    steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def command(case: str, storage: str, overrides: list[str]) -> list[str]:
    """The command line of one case; sweep.* overrides reach only the sweeps (a plain job has no sweep section)."""
    common = [o for o in overrides if not o.startswith("sweep.")]
    if case in ("plain", "raytrain"):
        return [sys.executable, PLAIN if case == "plain" else RAYTRAIN, "--job", JOB, *common]
    store = f"checkpoint.storage={storage}"
    where = [] if case in ATTACHED else ["--ray-address", "local"]
    if case == "local":
        return [*ORCH, "run", JOB, "scaling.num_workers=0", *common, store, "--fresh", "--json"]
    if case in ("worker", "worker_up"):
        return [*ORCH, "run", JOB, *common, store, "--fresh", "--json", *where]
    # The file's scheduler carries ASHA's grace_period, which FIFO refuses: FIFO replaces the whole section.
    scheduler = ["sweep.scheduler={name: fifo}"] if case.startswith("fifo") else []
    return [*ORCH, "sweep", SWEEP, *scheduler, *overrides, store, "--fresh", "--json", *where]


def last_json(text: str) -> dict[str, Any] | None:
    """The last line of stdout that is a JSON object (the commands' --json contract)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_case(case: str, repeat: int, storage: str, overrides: list[str]) -> Timing:
    argv = command(case, storage, overrides)
    # Output to files, not pipes: a leftover child holding a pipe open would stretch the clock past the exit.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.time()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        rc = proc.wait()
        wall = time.time() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    t = Timing(case, repeat, argv, rc, wall)
    result = last_json(stdout)
    if rc != 0 or result is None:
        t.error = (stderr.strip() or stdout.strip())[-2000:] or f"exit {rc}, no JSON line"
        if rc == 0:
            t.rc = -1  # finished but broke the --json contract: not a figure to trust
        return t
    t.own_wall_s = result.get("wall_s")
    if case in SWEEPS:
        best = result.get("best") or {}
        t.best_metric, t.best, t.steps = result.get("metric"), best.get("metric"), result.get("total_steps")
        t.extra = {
            "status": result.get("status"),
            "trials": len(result.get("trials") or []),
            "stopped": sum(tr.get("status") == "stopped" for tr in result.get("trials") or []),
            "best_config": best.get("config"),
        }
        return t
    first = result.get("first_step_at")
    t.first_step_s = first - start if isinstance(first, (int, float)) else None
    t.steps = result.get("steps")
    if case in ("plain", "raytrain"):
        t.best_metric, t.best = "val_accuracy", result.get("best_val_accuracy")
        t.extra = {"test_accuracy": result.get("test_accuracy"), "stopped_early": result.get("stopped_early")}
    else:
        best = result.get("best") or {}
        t.best_metric, t.best = best.get("metric"), best.get("value")
        t.extra = {
            "status": result.get("status"),
            "test_accuracy": ((result.get("test") or {}).get("metrics") or {}).get("accuracy"),
            "stopped_early": result.get("stopped_early"),
        }
    return t


def median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def machine() -> dict[str, Any]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "absent"

    # Versions from package metadata: importing torch or ray here would load this process, not measure it.
    # OMP_NUM_THREADS shapes tiny-model step times a lot on a busy machine; a Ray Train worker sets its own.
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": version("torch"),
        "ray": version("ray"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def summarize(runs: list[Timing], cases: list[str]) -> dict[str, Any]:
    """Medians over repeats of the successful runs of each case, and the ratios."""
    per: dict[str, Any] = {}
    for case in cases:
        mine = [r for r in runs if r.case == case]
        ok = [r for r in mine if r.rc == 0]
        last = ok[-1] if ok else None
        per[case] = {
            "runs": len(mine),
            "failed": len(mine) - len(ok),
            "rc": max((r.rc for r in mine), key=abs, default=None),
            "wall_s": median([r.wall_s for r in ok]),
            "first_step_s": median([r.first_step_s for r in ok]),
            "own_wall_s": median([r.own_wall_s for r in ok]),
            "best_metric": last.best_metric if last else None,
            "best": median([r.best for r in ok]),
            "steps": median([r.steps for r in ok]),
        }
    plain = per.get("plain", {})
    ratios: dict[str, float | None] = {}
    for case in VS_PLAIN:
        if case in per and plain:
            ratios[f"{case}_wall_x_plain"] = ratio(per[case]["wall_s"], plain["wall_s"])
            ratios[f"{case}_first_step_x_plain"] = ratio(per[case]["first_step_s"], plain["first_step_s"])
    if "worker" in per and "raytrain" in per:
        ratios["worker_wall_x_raytrain"] = ratio(per["worker"]["wall_s"], per["raytrain"]["wall_s"])
        ratios["worker_first_step_x_raytrain"] = ratio(per["worker"]["first_step_s"], per["raytrain"]["first_step_s"])
    for suffix in ("", "_up"):
        fifo, asha = per.get(f"fifo{suffix}"), per.get(f"asha{suffix}")
        if fifo and asha:
            ratios[f"asha{suffix}_wall_x_fifo"] = ratio(asha["wall_s"], fifo["wall_s"])
            ratios[f"asha{suffix}_steps_x_fifo"] = ratio(asha["steps"], fifo["steps"])
    return {"cases": per, "ratios": ratios}


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def print_table(result: dict[str, Any]) -> None:
    m, per, ratios = result["machine"], result["summary"]["cases"], result["summary"]["ratios"]
    print(
        f"{m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}, ray {m['ray']}, OMP_NUM_THREADS {m['omp_num_threads'] or 'unset'}"
    )
    print(
        "load average (1/5/15 min): before "
        + " ".join(f"{x:.2f}" for x in result["load_before"])
        + "   after "
        + " ".join(f"{x:.2f}" for x in result["load_after"])
    )
    print(f"overrides: {' '.join(result['overrides']) or '(none)'}   repeats: {result['repeat']} (medians)")
    print()
    plain = per.get("plain", {})
    head = f"{'':38}{'wall':>8}{'first step':>12}{'wall x plain':>14}{'1st x plain':>13}{'own wall':>10}{'best':>8}{'steps':>8}{'exit':>6}"
    print(head)
    for case, s in per.items():
        vs_plain = case in VS_PLAIN
        x_wall = fmt(ratio(s["wall_s"], plain.get("wall_s")), ".2f", "x") if vs_plain else ""
        x_first = fmt(ratio(s["first_step_s"], plain.get("first_step_s")), ".2f", "x") if vs_plain else ""
        print(
            f"{CASES[case]:38}{fmt(s['wall_s'], '.1f', 's'):>8}{fmt(s['first_step_s'], '.1f', 's'):>12}{x_wall:>14}{x_first:>13}"
            f"{fmt(s['own_wall_s'], '.1f', 's'):>10}{fmt(s['best'], '.4f'):>8}{fmt(s['steps'], '.0f'):>8}"
            f"{s['rc'] if s['rc'] is not None else 'n/a':>6}"
        )
    if "worker_wall_x_raytrain" in ratios:
        print()
        print(
            f"orchestrator run (1 worker) / hand-written Ray Train: wall {fmt(ratios['worker_wall_x_raytrain'], '.2f')},"
            f" first step {fmt(ratios['worker_first_step_x_raytrain'], '.2f')}"
        )
    for suffix, label in (("", ""), ("_up", " (local Ray up)")):
        if f"asha{suffix}_wall_x_fifo" in ratios:
            fifo, asha = per[f"fifo{suffix}"], per[f"asha{suffix}"]
            print()
            print(
                f"ASHA / FIFO{label}: wall {fmt(ratios[f'asha{suffix}_wall_x_fifo'], '.2f')}, steps {fmt(ratios[f'asha{suffix}_steps_x_fifo'], '.2f')}"
                f"   best {fifo['best_metric'] or 'metric'}: FIFO {fmt(fifo['best'], '.4f')}, ASHA {fmt(asha['best'], '.4f')}"
            )
    print(
        "wall: whole command to exit; first step: command start to first optimizer step; own wall: the command's own wall_s;"
        " best: best validation metric (val_accuracy)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of all commands, interleaved (A B A B); figures are medians"
    )
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every command, e.g. train.epochs=2"
    )
    args = parser.parse_args()
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        parser.error(f"--only: unknown {', '.join(unknown) or '(empty)'}; use {','.join(CASES)}")
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    bad = [o for o in args.overrides if "=" not in o or o.startswith("checkpoint.storage=")]
    if bad:
        parser.error(
            f"{' '.join(bad)}: overrides look like dotted.key=value (checkpoint.storage is the benchmark's own)"
        )

    if any(c in ATTACHED for c in cases):
        sys.path.insert(0, str(ROOT))  # this checkout's package, as the timed commands (run from ROOT) use
        from orchestrator.ray_runtime import running_local_ray

        if running_local_ray():
            parser.error(
                "a local Ray is already up (ray start --head): the benchmark starts and stops its own; stop that one first"
            )
    runs: list[Timing] = []
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as storage:
        total = args.repeat * len(cases)
        for rep in range(args.repeat):
            for group in ([c for c in cases if c not in ATTACHED], [c for c in cases if c in ATTACHED]):
                if not group:
                    continue
                attached = group[0] in ATTACHED
                if attached:
                    subprocess.run(
                        [RAY, "start", "--head", f"--num-cpus={os.cpu_count()}", "--disable-usage-stats"],
                        check=True,
                        capture_output=True,
                    )
                try:
                    for case in group:
                        t = run_case(case, rep, storage, args.overrides)
                        runs.append(t)
                        print(f"[{len(runs)}/{total}] {case}: {t.wall_s:.1f}s exit {t.rc}", file=sys.stderr, flush=True)
                        if t.error:
                            print(f"  {' '.join(t.argv)}\n  {t.error}", file=sys.stderr, flush=True)
                finally:
                    if attached:
                        subprocess.run([RAY, "stop"], capture_output=True)
    load_after = list(os.getloadavg())

    result = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_after,
        "overrides": args.overrides,
        "repeat": args.repeat,
        "summary": summarize(runs, cases),
        "runs": [asdict(r) for r in runs],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    if any(r.rc != 0 for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
