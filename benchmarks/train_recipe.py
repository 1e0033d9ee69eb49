"""Time a training recipe end to end and record what it reached, for docs/results/.

    .venv/bin/python benchmarks/train_recipe.py                    # the default recipe (vitkit train)
    .venv/bin/python benchmarks/train_recipe.py --preset quick     # the 5-minute preset
    .venv/bin/python benchmarks/train_recipe.py --preset fast      # the 15-minute preset

Runs the same code path as `vitkit train` in this process, measures wall time from the start of
the command (data loading included) to the test result, and writes a markdown report and a JSON
file with the command, machine, date, the test accuracy, the time and the goal checks.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from provenance import machine, result_base, revision, write_json
from resumable import logged_speeds

# Published baselines in Fashion-MNIST's README (the dataset package's benchmark table).
BASELINES = {"2-conv CNN + BatchNorm (README)": 93.4, "ResNet-like CNN (README)": 94.9}
# The goals of the raised performance issue: 92.5% in 15 minutes (the default recipe's goal; the fast preset is the
# candidate for it), and 90% in 5 for the quick preset.
GOALS = {"default": (92.5, 15 * 60), "fast": (92.5, 15 * 60), "quick": (90.0, 5 * 60)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=sorted(GOALS), help="which recipe to time")
    parser.add_argument("--out", default="docs/results", help="where the report goes")
    parser.add_argument("--run-dir", default=None, help="training run directory (default: runs/bench-<preset>)")
    args, extra = parser.parse_known_args()

    run_dir = args.run_dir or f"runs/bench-{args.preset}"
    train_args = ["train", "--run.out", run_dir, "--run.overwrite", "true", "--run.progress", "false"]
    if args.preset != "default":
        train_args = ["train", "--preset", args.preset] + train_args[1:]
    train_args += extra
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    from vitkit.cli import main as vitkit_main

    started = datetime.now(timezone.utc)
    commit = revision()  # taken before the run starts
    t0 = time.perf_counter()
    code = vitkit_main(train_args)
    seconds = time.perf_counter() - t0
    if code != 0:
        print(f"training failed with exit code {code}", file=sys.stderr)
        return code
    results = json.loads((Path(run_dir) / "results.json").read_text())
    speeds = logged_speeds(Path(run_dir))
    batch_size = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["optim"]["batch_size"]
    steps_seconds = steps_time(speeds, batch_size)
    top1 = 100 * results["test"]["top1"]
    goal_acc, goal_s = GOALS[args.preset]
    record = {
        "benchmark": f"fashion-mnist {args.preset} recipe",
        "command": command,
        "vitkit_command": "vitkit " + " ".join(train_args),
        "date": started.isoformat(timespec="seconds"),
        "commit": commit,
        "machine": machine(),
        "wall_seconds": round(seconds, 1),
        "test_top1": round(top1, 2),
        "test_top5": round(100 * results["test"]["top5"], 2),
        "val_top1": round(100 * results["val"]["top1"], 2) if "val" in results else None,
        "steps": results["steps"],
        "step_images_per_s_median": round(statistics.median(ips for _, ips in speeds[1:] or speeds), 1),
        "seconds_in_steps": round(steps_seconds, 1),
        "goal": {"test_top1_at_least": goal_acc, "wall_seconds_at_most": goal_s,
                 "met": top1 >= goal_acc and seconds <= goal_s},
        "gap_to_baselines_points": {k: round(top1 - v, 2) for k, v in BASELINES.items()},
    }
    base = result_base(args.out, f"fashion_mnist_{args.preset}", started)
    write_json(record, base)
    m = record["machine"]
    lines = [
        f"# Fashion-MNIST, {args.preset} recipe",
        "",
        f"- command: `{command}` (runs `{record['vitkit_command']}`)",
        f"- date: {record['date']}, commit {record['commit']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa']) or 'no AVX-512'}), torch {m['torch']} "
        f"with {m['torch_threads']} threads, Python {m['python']}",
        "",
        "| test top-1 | test top-5 | val top-1 | wall time | of it in steps | steps | step images/s (median) | goal "
        "| met |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {record['test_top1']:.2f}% | {record['test_top5']:.2f}% | "
        f"{record['val_top1'] if record['val_top1'] is not None else '-'}% | {seconds / 60:.1f} min | "
        f"{steps_seconds / 60:.1f} min | {record['steps']} | {record['step_images_per_s_median']:.0f} | "
        f">= {goal_acc}% in <= {goal_s // 60} min | {'yes' if record['goal']['met'] else 'NO'} |",
        "",
        "The steps' time is the logged windows' images over their images/s (the first window holds compilation); the "
        "rest of the wall time is loading, evaluation, checkpoints and the report.",
        "",
        "Distance to the CNN baselines listed in the dataset's README:",
        "",
        *[f"- {name}: {v:.1f}% -> {record['test_top1'] - v:+.2f} points" for name, v in BASELINES.items()],
        "",
    ]
    base.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def steps_time(speeds: list[tuple[int, float]], batch_size: int) -> float:
    """Seconds spent in training steps: each logged window's images over its images/s."""
    seconds, previous = 0.0, 0
    for step, images_per_s in speeds:
        seconds += (step - previous) * batch_size / images_per_s
        previous = step
    return seconds


if __name__ == "__main__":
    raise SystemExit(main())
