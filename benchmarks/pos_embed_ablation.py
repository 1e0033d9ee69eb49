"""Which position information a ViT needs: the paper's position-embedding ablation (appendix D.4, table 8) in miniature.

    .venv/bin/python benchmarks/pos_embed_ablation.py                 # the whole experiment (about 1.5 CPU-hours)
    .venv/bin/python benchmarks/pos_embed_ablation.py --quick         # the same steps in a minute or two

1. For each kind of `--model.pos_embed` (learned, none, learned_2d, sincos_2d, relative) and seeds 0 and 1:
   `vitkit train` with the default Fashion-MNIST recipe, that option and 15 epochs, scaled down from the recipe's
   56 for the budget (10 runs of about 8 minutes). The wall time of each run as measured here is kept in its run
   directory (wall.json), summed over the sessions of a resumed run.
2. The 10-shot ridge probe (`vitkit fewshot`, 5 draws) of each trained model on the MNIST subset: how well the
   representation transfers to a dataset it was not trained on.
3. The grid correlation of each trained embedding (`vitkit.inspect.pos_embed_grid_correlation`: how closely its
   positions' similarity follows their distance on the patch grid), and of a random initialisation of the two
   learned tables: whether the 1D embedding learns 2D structure by itself, as the paper's figure 7 shows.

Every step is a run directory under --work; a finished step (its results file exists) is not run again, and an
interrupted one resumes from its last checkpoint, so an interrupted experiment continues where it stopped.
The report goes to docs/results/pos_embed_ablation_<date>.md and .json.
"""

from __future__ import annotations

import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import header_lines, provenance, result_base, write_json
from resumable import experiment_parser, step, wall_sessions

from vitkit import ViT, ViTConfig, load_pretrained
from vitkit.inspect import pos_embed_grid_correlation
from vitkit.model.pos_embed import POS_EMBEDS

RECIPE_EPOCHS = 56  # the default Fashion-MNIST recipe's, for the report
FULL = {"epochs": 15, "seeds": [0, 1], "shots": [10], "model": []}
# The same steps on a tiny model for 10 optimiser steps each (0.022 of the 460 steps of an epoch): the test suite
# runs it. A whole short run, not --run.max_steps: a run stopped by that is never evaluated on the test split.
QUICK = {"epochs": 0.022, "seeds": [0], "shots": [5],
         "model": ["--model.width", "32", "--model.depth", "1", "--model.heads", "2", "--model.mlp_dim", "64",
                   "--data.val_size", "1000"]}
COMMON = ["--data", "fashion-mnist", "--run.progress", "false", "--run.overwrite", "true"]
LEARNED_TABLES = ("learned", "learned_2d")  # the kinds whose embedding starts random (the others add none or are fixed)
# Table 8 (ViT-B/16, ImageNet 5-shot linear), the embedding added once at the stem, under the paper's names. Its
# relative kind is a relative attention over 1D offsets, not vitkit's per-head bias per 2D offset.
PAPER = {"none": 0.61, "1D (learned)": 0.64, "2D (learned_2d)": 0.64, "relative": 0.64}


def grid_correlation(model: ViT) -> float | None:
    """The embedding's grid correlation, or None for the kinds that add no embedding to the tokens."""
    if model.pos_embed_for(model.cfg.grid_size) is None:
        return None
    return pos_embed_grid_correlation(model)


def random_init(cfg: ViTConfig, seed: int) -> ViT:
    """A fresh model of the same architecture as `cfg`, initialised with `seed`."""
    torch.manual_seed(seed)
    return ViT(ViTConfig.from_dict(cfg.to_dict()))


def one_run(plan: dict, work: Path, kind: str, seed: int) -> dict:
    """Train one kind at one seed, probe it, and measure its embedding; the run's numbers (accuracies in %)."""
    out = work / f"{kind}-seed{seed}"
    args = ["train", *COMMON, *plan["model"], "--model.pos_embed", kind, "--run.seed", str(seed),
            "--optim.epochs", str(plan["epochs"])]
    results = step(args, out)
    weights = out / "model.safetensors"
    shots = "[" + ",".join(map(str, plan["shots"])) + "]"
    probe = step(["fewshot", "--weights", str(weights), "--data", "mnist-subset", "--shots", shots],
                work / f"{kind}-seed{seed}-fewshot", done_file="fewshot.json")
    model, _ = load_pretrained(weights)
    sessions = wall_sessions(out)
    measured = [t for t in sessions if t is not None]
    top1 = {split: results.get(split, {}).get("top1") for split in ("val", "test")}
    return {
        "dir": str(out), "seed": seed,
        "val_top1": None if top1["val"] is None else 100 * top1["val"],
        "test_top1": None if top1["test"] is None else 100 * top1["test"],
        "few_shot": {str(r["shots"]): 100 * r["mean_top1"] for r in probe["results"]},
        "wall_minutes": sum(measured) / 60 if measured else None, "sessions": len(sessions),
        "unmeasured_sessions": len(sessions) - len(measured),
        "grid_correlation": grid_correlation(model),
        "grid_correlation_init": grid_correlation(random_init(model.cfg, seed)) if kind in LEARNED_TABLES else None,
    }


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(runs: list[dict], shots: int) -> dict:
    tests = [r["test_top1"] for r in runs if r["test_top1"] is not None]
    return {"test_mean": mean(tests), "test_sd": statistics.stdev(tests) if len(tests) > 1 else None,
            "few_shot_mean": mean([r["few_shot"].get(str(shots)) for r in runs]),
            "wall_minutes_mean": mean([r["wall_minutes"] for r in runs]),
            "grid_correlation": mean([r["grid_correlation"] for r in runs]),
            "grid_correlation_init": mean([r["grid_correlation_init"] for r in runs])}


def findings(summary: dict, shots: int) -> list[str]:
    """Sentences read off the numbers: the ranking, the spread among the kinds with position information against
    their gap to `none` and the seed-to-seed spread, and what training did to the learned embeddings' structure."""
    lines = []
    for key, what in (("test_mean", "Fashion-MNIST test top-1"), ("few_shot_mean", f"{shots}-shot MNIST subset")):
        scores = {kind: s[key] for kind, s in summary.items() if s[key] is not None}
        if not scores:
            continue
        ranked = sorted(scores, key=scores.get, reverse=True)
        line = (f"{what}: best `{ranked[0]}` ({scores[ranked[0]]:.2f}), worst `{ranked[-1]}` "
                f"({scores[ranked[-1]]:.2f}); order " + " > ".join(f"`{k}`" for k in ranked) + ".")
        with_position = {k: v for k, v in scores.items() if k != "none"}
        if "none" in scores and len(with_position) > 1:
            low, high = min(with_position, key=with_position.get), max(with_position, key=with_position.get)
            spread = with_position[high] - with_position[low]
            gap = statistics.fmean(with_position.values()) - scores["none"]
            line += (f" The {len(with_position)} kinds with position information span {spread:.2f} points "
                     f"(`{low}` to `{high}`); their mean is {abs(gap):.2f} points {'above' if gap >= 0 else 'below'} "
                     f"`none`, {'more' if abs(gap) > spread else 'less'} than that spread.")
        if key == "test_mean":
            sds = [s["test_sd"] for s in summary.values() if s["test_sd"] is not None]
            line += (f" Seed-to-seed sd: {statistics.fmean(sds):.2f} points on average." if sds else
                     " One seed per kind: the seed-to-seed spread is not measured.")
        lines.append(line)
    for kind in (*LEARNED_TABLES, "sincos_2d"):
        s = summary.get(kind)
        if s is None or s["grid_correlation"] is None:
            continue
        start = (f"{s['grid_correlation_init']:.2f} at a random initialisation" if s["grid_correlation_init"]
                 is not None else "the same before training (a fixed table)")
        lines.append(f"Grid correlation of `{kind}`: {s['grid_correlation']:.2f} after training, {start}.")
    return lines


def report(record: dict, out_dir: Path, stem: str) -> Path:
    plan, shots = record["plan"], record["plan"]["shots"][-1]
    seeds = len(plan["seeds"])
    lines = ["# Position embeddings: the paper's ablation (appendix D.4, table 8) on Fashion-MNIST", "",
             *header_lines(record),
             f"- plan: the default Fashion-MNIST recipe (`vitkit train`) with each `--model.pos_embed`, "
             f"{plan['epochs']:g} epochs (the recipe's {RECIPE_EPOCHS}, scaled down for the budget)"
             + (f", model options `{' '.join(plan['model'])}`" if plan["model"] else "")
             + f"; seeds {plan['seeds']}; then the {shots}-shot ridge probe (5 draws) on the MNIST subset",
             "- grid correlation: Pearson correlation between the cosine similarity of two patch positions' "
             "embeddings and minus their distance on the grid (1: the embedding is a map of the grid); a random "
             "`learned_2d` table is not at 0, since positions in one row or column share half their vector", "",
             f"| kind | test top-1 (mean +- sd, {seeds} seed{'s' if seeds > 1 else ''}) "
             f"| {shots}-shot MNIST subset (mean) | wall min per run (mean) "
             "| grid correlation (trained; random init) |",
             "|---|---|---|---|---|"]
    for kind, s in record["summary"].items():
        test = "n/a" if s["test_mean"] is None else f"{s['test_mean']:.2f}" + (
            f" +- {s['test_sd']:.2f}" if s["test_sd"] is not None else "")
        few = "n/a" if s["few_shot_mean"] is None else f"{s['few_shot_mean']:.2f}"
        wall = "n/a" if s["wall_minutes_mean"] is None else f"{s['wall_minutes_mean']:.1f}"
        if s["grid_correlation"] is None:
            correlation = "no embedding added"
        else:
            start = "fixed" if s["grid_correlation_init"] is None else f"{s['grid_correlation_init']:.2f}"
            correlation = f"{s['grid_correlation']:.2f}; {start}"
        lines.append(f"| {kind} | {test} | {few} | {wall} | {correlation} |")
    resumed = [r["dir"] for runs in record["runs"].values() for r in runs if r["sessions"] > 1]
    short = [r["dir"] for runs in record["runs"].values() for r in runs
             if r["unmeasured_sessions"] or not r["sessions"]]
    if resumed:
        lines.append(f"\nResumed runs (wall time summed over their sessions): {', '.join(resumed)}.")
    if short:
        lines.append(f"\nRuns with sessions this benchmark did not time (their wall time is missing or short): "
                     f"{', '.join(short)}.")
    paper = record["paper"]
    with_position = [value for kind, value in paper.items() if kind != "none"]
    spread, gap = max(with_position) - min(with_position), statistics.fmean(with_position) - paper["none"]
    lines += ["", *[f"- {line}" for line in record["findings"]], "",
              "For comparison, the paper (table 8, ViT-B/16, ImageNet 5-shot linear): "
              + ", ".join(f"{kind} {value:.2f}" for kind, value in paper.items())
              + f"; there the kinds with position information span {100 * spread:.0f} points and their mean is "
              f"{100 * gap:.0f} points above none. sincos_2d is not in the paper."]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = experiment_parser(__doc__, "the same steps on a tiny model, in a minute or two", "runs/bench-pos-embed")
    parser.add_argument("--epochs", type=float, help=f"epochs per training run (default {FULL['epochs']:g}; "
                        "the run directories are named by kind and seed, so use another --work for another length)")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        plan["epochs"] = args.epochs
    work = Path(args.work)
    started = datetime.now(timezone.utc)
    record = {"benchmark": "position-embedding ablation" + (" (quick)" if args.quick else ""),
              **provenance(started),
              "plan": plan, "recipe_epochs": RECIPE_EPOCHS, "paper": PAPER}
    record["runs"] = {kind: [one_run(plan, work, kind, seed) for seed in plan["seeds"]] for kind in POS_EMBEDS}
    shots = plan["shots"][-1]
    record["summary"] = {kind: summarise(runs, shots) for kind, runs in record["runs"].items()}
    record["findings"] = findings(record["summary"], shots)
    base = result_base(args.out, "pos_embed_ablation" + ("_quick" if args.quick else ""), started)
    out_dir, stem = base.parent, base.name
    write_json(record, base)
    print(report(record, out_dir, stem).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
