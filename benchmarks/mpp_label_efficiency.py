"""What masked patch prediction is worth: fine-tuning with few labels after MPP, against training from scratch.

    .venv/bin/python benchmarks/mpp_label_efficiency.py                 # the whole experiment (about 3 CPU-hours)
    .venv/bin/python benchmarks/mpp_label_efficiency.py --quick         # the same steps in about a minute

1. `vitkit pretrain` (MPP, the paper's 3-bit colour target) on Fashion-MNIST's training images without labels.
2. For 1%, 10% and 100% of the training labels (600, 6,000 and all 55,000 images of the training split, stratified,
   the same images for both arms): the same architecture and recipe trained from the MPP encoder and from a random
   initialisation. Each arm's learning rate is chosen on the validation split at seed 0 (never on test), then
   seeds 1 and 2 run with it at 1% and 10%. For the budget, 100% runs seed 0 only, with the learning rate its arm
   chose on validation at 10% (a sweep there would cost another 40 minutes).
3. The few-shot ridge probe (1, 5 and 10 shots, 5 draws) of the MPP encoder and of a random initialisation.

Every step is a run directory under --work; a finished step (its results file exists) is not run again, and an
interrupted one resumes from its last checkpoint, so an interrupted experiment continues where it stopped.
The report goes to docs/results/mpp_<date>.md and .json.
"""

from __future__ import annotations

import statistics
from datetime import datetime, timezone
from pathlib import Path

import yaml
from provenance import header_lines, provenance, result_base, write_json
from resumable import experiment_parser, logged_speeds, step


FULL = {
    "pretrain_epochs": 40, "fractions": {"1%": 600, "10%": 6000, "100%": None},
    "epochs": {"1%": 100, "10%": 30, "100%": 10}, "batch": {"1%": 64, "10%": 128, "100%": 128},
    "lrs": [3e-4, 1e-3, 3e-3], "seeds": {"1%": [0, 1, 2], "10%": [0, 1, 2], "100%": [0]},
    "shots": [1, 5, 10], "model": [], "max_steps": None, "lr_from": {"100%": "10%"},
}
# The same steps on a tiny model for a few dozen optimiser steps each: the test suite runs it.
QUICK = {
    "pretrain_epochs": 0.02, "fractions": {"1%": 600}, "epochs": {"1%": 1}, "batch": {"1%": 64},
    "lrs": [1e-3, 3e-3], "seeds": {"1%": [0, 1]}, "shots": [1, 5],
    "model": ["--model.width", "32", "--model.depth", "1", "--model.heads", "2", "--model.mlp_dim", "64",
              "--data.val_size", "1000"],
    "max_steps": 10, "lr_from": {},
}
COMMON = ["--data", "fashion-mnist", "--run.progress", "false", "--run.overwrite", "true"]
# Fine-tuning and training from scratch share one recipe: the default one without PatchDropout.
RECIPE = ["--model.patch_dropout", "0", "--data.crop", "pad", "--data.pad", "1", "--data.flip", "true",
          "--optim.optimizer", "adamw", "--optim.weight_decay", "0.05", "--optim.label_smoothing", "0.1",
          "--optim.warmup", "0.05", "--optim.schedule", "cosine"]


def pretrain(plan: dict, work: Path) -> tuple[Path, dict]:
    out = work / "pretrain"
    args = ["pretrain", *COMMON, *plan["model"], "--optim.epochs", str(plan["pretrain_epochs"])]
    return out / "model.safetensors", step(args, out)


def training_minutes(run_dir: Path) -> tuple[float, float]:
    """A run's training time from its logged speed (steps only, without evaluation), across every resume, and the
    time the same steps take at the median logged speed (what the run costs when nothing else slows it down)."""
    batch = yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["batch_size"]
    seconds, last = 0.0, 0
    speeds = logged_speeds(run_dir)
    for step_, images_per_s in speeds:
        seconds += (step_ - last) * batch / images_per_s
        last = step_
    speeds = [images_per_s for _, images_per_s in speeds]
    return seconds / 60, (last * batch / statistics.median(speeds) / 60 if speeds else 0.0)


def arm(plan: dict, work: Path, fraction: str, init: str, weights: Path, lr: float, seed: int) -> dict:
    """One fine-tuning (init "mpp") or from-scratch (init "scratch") run; its val and test top-1."""
    out = work / f"{fraction.rstrip('%')}pct-{init}-lr{lr:g}-seed{seed}"
    size = plan["fractions"][fraction]
    args = ["train", *COMMON, *RECIPE, *plan["model"], "--optim.lr", str(lr), "--run.seed", str(seed),
            "--optim.epochs", str(plan["epochs"][fraction]), "--optim.batch_size", str(plan["batch"][fraction])]
    if size is not None:
        args += ["--data.train_size", str(size)]
    if plan["max_steps"]:
        args += ["--run.max_steps", str(plan["max_steps"])]
    if init == "mpp":
        # The architecture comes from the weights; the model options above name the same one.
        args += ["--init.weights", str(weights)]
    results = step(args, out)
    val = results.get("val", {}).get("top1")
    test = results.get("test", {}).get("top1")
    return {"dir": str(out), "lr": lr, "seed": seed, "val_top1": val, "test_top1": test}


def fine_tuning(plan: dict, work: Path, weights: Path) -> dict:
    table = {}
    for fraction in plan["fractions"]:
        table[fraction] = {}
        for init in ("scratch", "mpp"):
            source = plan["lr_from"].get(fraction)
            lrs = [table[source][init]["chosen_lr"]] if source else plan["lrs"]
            sweep = [arm(plan, work, fraction, init, weights, lr, 0) for lr in lrs]
            chosen = max(sweep, key=lambda r: r["val_top1"] or 0.0)  # on validation, never on test
            seeds = [chosen] + [arm(plan, work, fraction, init, weights, chosen["lr"], s)
                                for s in plan["seeds"][fraction] if s != 0]
            tests = [100 * r["test_top1"] for r in seeds if r["test_top1"] is not None]
            table[fraction][init] = {"sweep": sweep, "chosen_lr": chosen["lr"], "runs": seeds,
                                     "mean": statistics.fmean(tests) if tests else None,
                                     "std": statistics.stdev(tests) if len(tests) > 1 else 0.0}
    return table


def few_shot(plan: dict, work: Path, weights: Path) -> dict:
    shots = "[" + ",".join(map(str, plan["shots"])) + "]"
    out = {}
    for name, extra in (("mpp", []), ("random init", ["--random_init", "true"])):
        results = step(["fewshot", "--weights", str(weights), "--data", "fashion-mnist", "--shots", shots, *extra],
                      work / f"fewshot-{name.replace(' ', '-')}", done_file="fewshot.json")
        out[name] = {r["shots"]: (100 * r["mean_top1"], 100 * r["std_top1"]) for r in results["results"]}
    return out


def report(record: dict, out_dir: Path, stem: str) -> Path:
    lines = ["# Masked patch prediction: fine-tuning with few labels, against training from scratch", "",
             *header_lines(record),
             f"- pretraining: `vitkit pretrain` (3-bit colour target, 50% corruption, 80/10/10), "
             f"{record['plan']['pretrain_epochs']} epochs of Fashion-MNIST's training images without labels, "
             f"{record['pretrain_minutes']:.1f} min of training steps as logged "
             f"({record['pretrain_minutes_at_median_speed']:.1f} min at the median logged speed), "
             f"final validation MPP loss {record['pretrain_val_loss']:.4f}", "",
             "| labels | from scratch (test top-1, mean +- sd) | MPP then fine-tuned | gain | runs "
             "| lr (scratch / MPP) |",
             "|---|---|---|---|---|---|"]
    for fraction, arms in record["fine_tuning"].items():
        s, m = arms["scratch"], arms["mpp"]
        gain = m["mean"] - s["mean"] if None not in (m["mean"], s["mean"]) else float("nan")
        lines.append(f"| {fraction} | {s['mean']:.2f} +- {s['std']:.2f} | {m['mean']:.2f} +- {m['std']:.2f} | "
                     f"{gain:+.2f} | {len(s['runs'])} seeds | {s['chosen_lr']:g} / {m['chosen_lr']:g} |")
    for fraction, source in record["plan"]["lr_from"].items():
        lines.append(f"\n{fraction}: one run per arm, at the learning rate that arm chose on validation at {source}.")
    shots = record["plan"]["shots"]
    lines += ["", "| few-shot probe (Fashion-MNIST, 5 draws) | " + " | ".join(f"{k}-shot" for k in shots) + " |",
              "|---|" + "---|" * len(shots)]
    for name, by_shot in record["few_shot"].items():
        cells = [f"{by_shot[str(k)][0]:.2f} +- {by_shot[str(k)][1]:.2f}" if str(k) in by_shot else
                 f"{by_shot[k][0]:.2f} +- {by_shot[k][1]:.2f}" for k in record["plan"]["shots"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = experiment_parser(__doc__, "the same steps on a tiny model, in about a minute", "runs/bench-mpp")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    work = Path(args.work)
    started = datetime.now(timezone.utc)
    record = {"benchmark": "MPP label efficiency" + (" (quick)" if args.quick else ""),
              **provenance(started),
              "plan": plan}
    weights, pre = pretrain(plan, work)
    record["pretrain_minutes"], record["pretrain_minutes_at_median_speed"] = training_minutes(weights.parent)
    record["pretrain_val_loss"] = pre.get("val", {}).get("loss", float("nan"))
    record["fine_tuning"] = fine_tuning(plan, work, weights)
    record["few_shot"] = few_shot(plan, work, weights)
    base = result_base(args.out, "mpp" + ("_quick" if args.quick else ""), started)
    out_dir, stem = base.parent, base.name
    write_json(record, base)
    print(report(record, out_dir, stem).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
