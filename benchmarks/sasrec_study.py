"""Run a list of `largevocab sasrec` jobs one after another within a wall-clock deadline, continuing unfinished runs
and collecting each finished call into a results JSON (the SASRec reproduction study's runner).

    python benchmarks/sasrec_study.py benchmarks/sasrec_study_jobs.json --only ml_ce_s2,ml_sce_by1024_s0 \
        --until "2026-12-01 23:55" --runs-dir runs/study --results benchmarks/results/sasrec_repro_2026-12-01

The jobs file is a JSON list of ``{"name", "args", "cap"?, "min"?}``: ``args`` are the CLI's flags without
``--out``/``--time-budget``/``--resume`` (``$REC`` stands for ``--data-dir``); ``cap`` bounds one call's budget
in seconds (default 9,000), and a job whose budget would be under ``min`` seconds (default 900) is skipped. Each
call gets ``--time-budget min(cap, seconds left - --reserve)``, so it stops resumably before the deadline; a job
whose run directory holds an unfinished ``last.pt`` continues with ``--resume`` (same flags: the same run), and a
finished one is skipped. Every call that exits 0 is collected with ``collect_sasrec.py`` into
``RESULTS/<name>.json`` (a budget stop too: its row says the epoch reached). ``--cap``/``--min-budget`` override
every job's ``cap``/``min`` (short GPU sessions), ``--extra`` appends flags to every job (a plumbing check at toy
sizes: ``--extra "--max-users 64 --epochs 1"``; the CLI takes the last value of a repeated flag).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import torch

DEFAULT_CAP_S = 9000
DEFAULT_MIN_S = 900
DEFAULT_RESERVE_S = 240  # a budget stop still runs the test evaluation and the collection
DEFAULT_REC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "rec")
RESERVED_FLAGS = ("--out", "--time-budget", "--resume")


def load_jobs(path: str, only: list[str] | None = None) -> list[dict]:
    with open(path) as f:
        jobs = json.load(f)
    names = [job.get("name") for job in jobs]
    for job in jobs:
        if not isinstance(job.get("name"), str) or not isinstance(job.get("args"), list):
            raise ValueError(f"{path}: every job needs a string 'name' and a list 'args', got {job!r}")
        reserved = [a for a in job["args"] if a in RESERVED_FLAGS]
        if reserved:
            raise ValueError(f"{path}: job {job['name']!r} sets {reserved}; the runner sets them")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: job names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    if only is not None:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"--only: no jobs named {unknown} in {path}")
        jobs = [job for job in jobs if job["name"] in only]
    return jobs


def run_state(run_dir: str) -> str:
    """"new" (no last.pt), "unfinished" (continue with --resume) or "finished"."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.isfile(path):
        return "new"
    return "finished" if torch.load(path, map_location="cpu", weights_only=True)["finished"] else "unfinished"


def command(job: dict, rec_dir: str, run_dir: str, budget_s: int, resume: bool, threads: int,
            extra: list[str] = ()) -> list[str]:
    args = [a.replace("$REC", rec_dir) for a in job["args"]] + list(extra)
    return [sys.executable, "-m", "largevocab", "sasrec", *args, "--time-budget", str(budget_s), "--threads",
            str(threads), "--no-progress", "--out", run_dir, *(["--resume"] if resume else [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", help="JSON list of jobs")
    parser.add_argument("--only", default=None, help="comma-separated job names to run, in the file's order")
    parser.add_argument("--until", required=True, help="local wall-clock deadline, 'YYYY-MM-DD HH:MM'")
    parser.add_argument("--runs-dir", required=True, help="one run directory per job (checkpoints, logs)")
    parser.add_argument("--results", required=True, help="directory for the collected <name>.json rows")
    parser.add_argument("--data-dir", default=DEFAULT_REC, help="what $REC stands for in the jobs' args")
    parser.add_argument("--reserve", type=int, default=DEFAULT_RESERVE_S, help="seconds kept after each budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--cap", type=int, default=None, help="seconds: every job's cap (one call's budget)")
    parser.add_argument("--min-budget", type=int, default=None, help="seconds: every job's min")
    parser.add_argument("--extra", default="", help="flags appended to every job's args")
    args = parser.parse_args(argv)
    extra = shlex.split(args.extra)
    if any(a in RESERVED_FLAGS for a in extra):
        parser.error(f"--extra must not set {RESERVED_FLAGS}; the runner sets them")
    try:
        deadline = time.mktime(time.strptime(args.until, "%Y-%m-%d %H:%M"))
        jobs = load_jobs(args.jobs, args.only.split(",") if args.only else None)
    except ValueError as exc:
        parser.error(str(exc))
    os.makedirs(args.results, exist_ok=True)
    collect = os.path.join(os.path.dirname(os.path.abspath(__file__)), "collect_sasrec.py")
    failed = 0
    for job in jobs:
        name, run_dir = job["name"], os.path.join(args.runs_dir, job["name"])
        state = run_state(run_dir)
        if state == "finished":
            print(f"{name}: finished earlier, skipped", flush=True)
            continue
        cap = args.cap if args.cap is not None else job.get("cap", DEFAULT_CAP_S)
        budget = int(min(cap, deadline - time.time() - args.reserve))
        if budget < (args.min_budget if args.min_budget is not None else job.get("min", DEFAULT_MIN_S)):
            print(f"{name}: {max(budget, 0)} s left before the deadline, skipped", flush=True)
            continue
        os.makedirs(run_dir, exist_ok=True)
        cmd = command(job, args.data_dir, run_dir, budget, state == "unfinished", args.threads, extra)
        print(f"{time.strftime('%H:%M:%S')} {name}: {'continued' if state == 'unfinished' else 'started'}, "
              f"budget {budget} s", flush=True)
        with open(os.path.join(run_dir, "stdout.txt"), "a") as out, open(os.path.join(run_dir, "stderr.txt"),
                                                                           "a") as err:
            rc = subprocess.call(cmd, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if rc:
            failed += 1
            print(f"{time.strftime('%H:%M:%S')} {name}: exit {rc}, see {run_dir}/stderr.txt", flush=True)
            continue
        subprocess.run([sys.executable, collect, run_dir, "--out", os.path.join(args.results, f"{name}.json")],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"{time.strftime('%H:%M:%S')} {name}: collected into {args.results}/{name}.json", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
