"""The paper's figure-5 claim in miniature: a small hybrid against the plain ViT at equal wall-clock budget.

    .venv/bin/python benchmarks/hybrid_vs_vit.py                 # the whole experiment (about 2 CPU-hours)
    .venv/bin/python benchmarks/hybrid_vs_vit.py --quick         # the same steps in a minute or two

The paper finds hybrids (a ResNet's feature map as the patches) better than plain ViTs at small compute. Here both
models are the default Fashion-MNIST recipe's transformer (width 128, depth 4, 49 tokens of a 7x7 grid plus the
class token, PatchDropout 0.5): the plain ViT cuts the 28 px image into 4x4 patches (`Ti/4`); the hybrid `R+Ti/4`
puts a BiT ResNet's root block in front (a 7x7 convolution of stride 2 to 64 channels, GroupNorm, ReLU, a 3x3
max-pool of stride 2: a 7x7 feature map) and takes each of its positions as a token (patch size 1).

1. Speed: a short `vitkit train` of each model (--run.max_steps), alternating, twice; each model's training speed is
   the median images/s it logged after its first window (which holds the compilation).
2. Equal budget: the plain ViT trains the recipe's 56 epochs, which fit the recipe's 30 minutes on this machine;
   the hybrid trains 56 x (its speed / the ViT's speed) epochs, the same training time at the measured speeds.
   Everything else is the recipe's. Seeds 0 and 1 for each model.
3. Report: test top-1 of every run, its wall time as measured here (wall.json in its run directory, summed over
   the sessions of a resumed run) and its training speed; the goal is the best model at 93.5% test or more.

Every step is a run directory under --work; a finished step is not run again and an interrupted one resumes from
its last checkpoint. The report goes to docs/results/hybrid_vs_vit_<date>.md and .json.
"""

from __future__ import annotations

import math
import statistics
from datetime import datetime, timezone
from pathlib import Path

from provenance import header_lines, provenance, result_base, write_json
from resumable import experiment_parser, logged_speeds, step, wall_sessions

MODELS = {"ViT Ti/4": "Ti/4", "hybrid R+Ti/4": "R+Ti/4"}
RECIPE_EPOCHS = 56.0
BUDGET_MINUTES = 30.0
GOAL_TOP1 = 93.5
# Fashion-MNIST's own benchmark table (its README): the 2-conv CNN the goal is set against.
BASELINE = ("2-conv CNN + BatchNorm (Fashion-MNIST README)", 93.4)
FULL = {"epochs": RECIPE_EPOCHS, "seeds": [0, 1], "speed_steps": 200, "speed_rounds": 2, "model": []}
# A tiny transformer for a couple of dozen steps, not compiled (compiling would take most of the time): the test
# suite runs it.
QUICK = {"epochs": 0.05, "seeds": [0], "speed_steps": 12, "speed_rounds": 1,
         "model": ["--model.width", "32", "--model.depth", "1", "--model.heads", "2", "--model.mlp_dim", "64",
                   "--data.val_size", "1000", "--run.compile", "false"]}
COMMON = ["--data", "fashion-mnist", "--run.progress", "false", "--run.overwrite", "true"]


def speed(plan: dict, work: Path) -> dict[str, dict]:
    """Each model's training speed: the median images/s logged by short runs after their first window."""
    log_every = max(plan["speed_steps"] // 4, 1)
    speeds: dict[str, list[float]] = {label: [] for label in MODELS}
    for round_ in range(plan["speed_rounds"]):
        for label, name in MODELS.items():  # alternating, so a slow spell of the machine hits both
            out = work / f"speed-{name.replace('/', '_').replace('+', '_')}-{round_}"
            step(["train", *COMMON, *plan["model"], "--model.name", name, "--optim.epochs", str(RECIPE_EPOCHS),
                  "--run.max_steps", str(plan["speed_steps"]), "--run.log_every", str(log_every),
                  "--run.checkpoint_every", str(10 * plan["speed_steps"]), "--run.tensorboard", "false"], out)
            speeds[label] += [ips for _, ips in logged_speeds(out)[1:]]
    return {label: {"images_per_s": statistics.median(values), "windows": len(values)}
            for label, values in speeds.items()}


def round_down(epochs: float, digits: int = 4) -> float:
    """`epochs` cut to `digits` significant digits, never rounded up: the hybrid gets no more time than the ViT."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(epochs)))
    return math.floor(epochs * scale) / scale


def one_run(plan: dict, work: Path, label: str, epochs: float, seed: int) -> dict:
    name = MODELS[label]
    out = work / f"{name.replace('/', '_').replace('+', '_')}-seed{seed}"
    results = step(["train", *COMMON, *plan["model"], "--model.name", name, "--run.seed", str(seed),
                    "--optim.epochs", f"{epochs:g}"], out)
    sessions = wall_sessions(out)
    measured = [t for t in sessions if t is not None]
    speeds = [ips for _, ips in logged_speeds(out)]
    return {"dir": str(out), "seed": seed, "epochs": epochs,
            "test_top1": 100 * results["test"]["top1"],
            "val_top1": 100 * results["val"]["top1"] if results.get("val") else None,  # None: no validation split
            "wall_minutes": sum(measured) / 60 if measured else None, "sessions": len(sessions),
            "unmeasured_sessions": len(sessions) - len(measured),
            "images_per_s": statistics.median(speeds[1:] or speeds) if speeds else None}


def summarise(runs: list[dict]) -> dict:
    tests = [r["test_top1"] for r in runs]
    walls = [r["wall_minutes"] for r in runs if r["wall_minutes"] is not None]
    return {"test_mean": statistics.fmean(tests), "test_sd": statistics.stdev(tests) if len(tests) > 1 else None,
            "test_best": max(tests), "wall_minutes_mean": statistics.fmean(walls) if walls else None,
            "images_per_s": statistics.median(r["images_per_s"] for r in runs if r["images_per_s"])}


def report(record: dict, out_dir: Path, stem: str) -> Path:
    plan = record["plan"]
    lines = ["# Hybrid against plain ViT at equal wall-clock budget (the paper's figure 5 in miniature)", "",
             *header_lines(record),
             "- recipe: the default Fashion-MNIST recipe (`vitkit train`) with `--model.name` of each model"
             + (f" and `{' '.join(plan['model'])}`" if plan["model"] else "")
             + f"; seeds {plan['seeds']}",
             f"- budget: the ViT trains {plan['epochs']:g} epochs; the hybrid {record['epochs']['hybrid R+Ti/4']:g}, "
             f"the ViT's epochs x its measured training speed / the ViT's "
             f"({record['speed']['hybrid R+Ti/4']['images_per_s']:.0f} / "
             f"{record['speed']['ViT Ti/4']['images_per_s']:.0f} images/s in the speed runs)", "",
             "| model | epochs | test top-1 per seed | mean +- sd | wall min per run (mean) "
             "| training images/s (median) |",
             "|---|---|---|---|---|---|"]
    for label, s in record["summary"].items():
        runs = record["runs"][label]
        per_seed = ", ".join(f"{r['test_top1']:.2f}" for r in runs)
        spread = f" +- {s['test_sd']:.2f}" if s["test_sd"] is not None else ""
        wall = "n/a" if s["wall_minutes_mean"] is None else f"{s['wall_minutes_mean']:.1f}"
        lines.append(f"| {label} | {runs[0]['epochs']:g} | {per_seed} | {s['test_mean']:.2f}{spread} | {wall} "
                     f"| {s['images_per_s']:.0f} |")
    best_label = max(record["summary"], key=lambda k: record["summary"][k]["test_best"])
    best = record["summary"][best_label]["test_best"]
    over = [r["dir"] for runs in record["runs"].values() for r in runs
            if r["wall_minutes"] is not None and r["wall_minutes"] > BUDGET_MINUTES]
    lines += ["", f"- goal: the best 30-minute model at {GOAL_TOP1}% test or more: {best_label} reached "
              f"{best:.2f}% ({'met' if record['goal_met'] else 'not met'}); {BASELINE[0]}: {BASELINE[1]}%.",
              f"- runs over the {BUDGET_MINUTES:g}-minute budget: {', '.join(over) if over else 'none'}."]
    resumed = [r["dir"] for runs in record["runs"].values() for r in runs if r["sessions"] > 1]
    if resumed:
        lines.append(f"- resumed runs (wall time summed over their sessions): {', '.join(resumed)}.")
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = experiment_parser(__doc__, "the same steps on a tiny model, in a minute or two", "runs/bench-hybrid")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    work = Path(args.work)
    started = datetime.now(timezone.utc)
    record = {"benchmark": "hybrid vs ViT" + (" (quick)" if args.quick else ""), **provenance(started), "plan": plan}
    record["speed"] = speed(plan, work)
    ratio = record["speed"]["hybrid R+Ti/4"]["images_per_s"] / record["speed"]["ViT Ti/4"]["images_per_s"]
    record["epochs"] = {"ViT Ti/4": plan["epochs"], "hybrid R+Ti/4": round_down(plan["epochs"] * ratio)}
    record["runs"] = {label: [one_run(plan, work, label, record["epochs"][label], seed) for seed in plan["seeds"]]
                      for label in MODELS}
    record["summary"] = {label: summarise(runs) for label, runs in record["runs"].items()}
    record["goal_met"] = max(s["test_best"] for s in record["summary"].values()) >= GOAL_TOP1
    base = result_base(args.out, "hybrid_vs_vit" + ("_quick" if args.quick else ""), started)
    out_dir, stem = base.parent, base.name
    write_json(record, base)
    print(report(record, out_dir, stem).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
