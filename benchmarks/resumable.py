"""One step of a resumable experiment: a vitkit command run into its own directory, once.

A finished step (its results file exists) is not run again; an interrupted training run continues from its last
checkpoint as it was configured. Each session of a training run records its wall time beside it (wall.json), so a
run that was interrupted and resumed reports the time of all its sessions.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from vitkit.atomic import atomic_write_text
from vitkit.cli import main as vitkit

WALL_FILE = "wall.json"


def experiment_parser(description: str, quick_help: str, work: str) -> argparse.ArgumentParser:
    """The options of every resumable experiment: --quick (`quick_help` says what it runs), --work (where its run
    directories go, default `work`) and --out (the report's folder)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--work", default=work, help="where the runs go (a finished one is not re-run)")
    parser.add_argument("--out", default="docs/results", help="where the report (and any plots) go")
    return parser


def step(args: list[str], out: Path, done_file: str = "results.json") -> dict:
    """`vitkit ARGS --run.out OUT`, unless OUT already holds a finished run; the run's results.

    A training session's wall time goes into OUT/wall.json when it ends, however it ends, so a run that is
    interrupted and resumed later reports the time of all its sessions. A session that could not record its time
    (the process was killed) stays in the file as null, so the report can say the sum is short.
    """
    if not (out / done_file).exists():
        earlier = []
        if args[0] == "fewshot":
            args = [*args, "--out", str(out)]
        elif (out / "checkpoints" / "last").exists():  # interrupted: continue it as it was configured
            args = [args[0], "--run.resume", "true", "--run.progress", "false", "--run.out", str(out)]
            earlier = wall_sessions(out)
        else:  # a fresh start: an earlier session that left no checkpoint left nothing this run uses
            args = [*args, "--run.out", str(out)]
        print("running: vitkit " + " ".join(shlex.quote(a) for a in args), flush=True)
        timed = args[0] == "train"
        if timed:
            write_wall_sessions(out, [*earlier, None])
        started = time.perf_counter()
        try:
            code = vitkit(args)
        finally:
            if timed:
                write_wall_sessions(out, [*earlier, round(time.perf_counter() - started, 1)])
        if code != 0:
            raise SystemExit(f"step {out} failed with exit code {code}")
    return json.loads((out / done_file).read_text())


def wall_sessions(run_dir: Path) -> list[float | None]:
    """The wall seconds of each session of a training run as this benchmark measured them (None: not measured)."""
    path = run_dir / WALL_FILE
    return json.loads(path.read_text())["sessions_s"] if path.exists() else []


def write_wall_sessions(run_dir: Path, sessions: list[float | None]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / WALL_FILE, json.dumps({"sessions_s": sessions}) + "\n")


def logged_speeds(run_dir: Path) -> list[tuple[int, float]]:
    """(step, images/s) of each logging window of a run's training steps, in order, across every resume. The
    speed counts the steps only, not evaluation or checkpoints; the first window of a session holds compilation."""
    speeds = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "train/images_per_s" in entry:
            speeds.append((entry["step"], entry["train/images_per_s"]))
    return speeds
