"""ViT is data-hungry: test accuracy against training-set size, ViT against a ResNet (the paper's section 4.3, figures
3 to 5) in miniature, on Fashion-MNIST.

    .venv/bin/python benchmarks/data_scaling.py                 # the whole study (about 1.2 hours, see 3.)
    .venv/bin/python benchmarks/data_scaling.py --quick         # the same steps, small, in about a minute

1. Models, each trained by `vitkit train` with the default Fashion-MNIST recipe's augmentation (a 1-pixel pad-and-crop
   shift, horizontal flip) and optimisation (AdamW, peak lr 7.5e-4, weight decay 0.05, 3% warm-up then cosine decay,
   label smoothing 0.1, gradient clipping at 1, batch 128):
   - ViT Ti/4: the recipe's model (width 128, depth 4, 4x4 patches, PatchDropout 0.5);
   - ResNet-18: `--model.name resnet18` (torchvision's, with a 3x3 stride-2 stem and no max-pool) and
     `--model.patch_dropout 0` (it has no tokens to drop);
   - hybrid R+Ti/4: the recipe's transformer on the 7x7 map of a BiT ResNet's root block.
2. Data: n = 1k, 3k, 10k, 30k and 60k training images, stratified by class and nested for one seed
   (`--data.train_size`). No validation split (`--data.val_size 0`): "60k" is all 60,000 training images, nothing is
   chosen on validation, and every run is scored at its last step on the 10,000 test images. Seeds 0-2 at 1k and 3k,
   where the spread is largest, 0-1 above; the seed draws the subset and the initialisation, so at one seed the
   three models train on the same images.
3. Step budget: every point trains the same number of optimisation steps, 500 of 128 images, whatever n:
   `--optim.epochs` = 500 / (n // 128), from 71 epochs of 1k down to 1.07 epochs of 60k. Along a curve only the data
   changes, and each model spends the same training compute at every size. The ResNet-18 costs 9 times the ViT's
   FLOPs per image (0.73 GFLOPs against 83 MFLOPs per training image; its stride-2 stem keeps this from 33 times)
   and about 4 times its step time on this machine, so it takes most of the study's time and sets the step count:
   36 runs of 500 steps are about an hour of steps (0.09 s per ViT step, 0.1 s per hybrid step, 0.4 s per ResNet
   step on the 2 idle cores), plus about 10 minutes of test evaluation, probes, checkpoints and data loading: about
   1.2 hours of the machine (2.4 core-hours), within the 3 CPU-hours the study may take.
   500 steps are far below the recipe's 24,024 (with which the ViT reaches 92.8% test top-1, docs/results): the points
   at 30k and 60k show each model early in its training, not what it reaches with that much data.
4. Few-shot: each trained model's frozen representation (the head's input) probed by the ridge probe of
   `vitkit.fewshot` with 5 and 10 images per class of the MNIST subset (5 draws, the penalty chosen on its
   validation split).
5. Compute: each point's training FLOPs (one training step's FLOPs per image counted on the model,
   `vitkit.model.flops`, times the images seen) and its wall time as measured here (wall.json in its run directory,
   summed over the sessions of a resumed run).

Every run is a directory under --work; a finished point (results.json and probe.json) is not run again, and an
interrupted training run resumes from its last checkpoint. The report goes to docs/results/data_scaling_<date>.md and
.json, with three plots: accuracy against data size, few-shot accuracy against data size, and accuracy against
training FLOPs at the largest size.
"""

from __future__ import annotations

import json
import math
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import header_lines, provenance, result_base, write_json
from resumable import experiment_parser, step, wall_sessions

from vitkit import load_pretrained
from vitkit.atomic import atomic_write_text
from vitkit.data import eval_transform, load_dataset
from vitkit.fewshot import FewShotOptions, draw_shots, probe
from vitkit.inference import normalisation
from vitkit.model.flops import training_flops_per_image
from vitkit.model.resnet import ARCHITECTURE, ResNetBaseline, ResNetConfig
from vitkit.runtime import autocast, resolve_device, resolve_precision
from vitkit.weights import CONFIG_KEY, PREPROCESS_KEY
from vitkit.weights.safetensors_io import read_safetensors

# label -> the options that choose the model (the rest is the default recipe)
MODELS = {
    "ViT Ti/4": ["--model.name", "Ti/4"],
    "ResNet-18": ["--model.name", ARCHITECTURE, "--model.patch_dropout", "0"],
    "hybrid R+Ti/4": ["--model.name", "R+Ti/4"],
}
VIT, RESNET = "ViT Ti/4", "ResNet-18"
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training set, all of it a training split with --data.val_size 0
FULL = {"sizes": [1_000, 3_000, 10_000, 30_000, 60_000], "steps": 500, "batch": 128, "image_size": 28,
        "shots": [5, 10], "draws": 5, "seeds": {"1000": [0, 1, 2], "3000": [0, 1, 2]}, "other_seeds": [0, 1]}
# Two sizes, one seed, 64 steps of 32 images at 12x12 pixels: the test suite runs it. The small images keep the
# ResNet's steps and its test evaluation (10,000 images) to seconds; the accuracies are those of 64 steps.
QUICK = {"sizes": [1_000, 3_000], "steps": 64, "batch": 32, "image_size": 12, "shots": [5, 10], "draws": 2,
         "seeds": {}, "other_seeds": [0]}
# A checkpoint every 100 steps, so an interrupted ResNet run loses little (one of its checkpoints is about 135 MB).
COMMON = ["--data", "fashion-mnist", "--data.val_size", "0", "--run.progress", "false", "--run.overwrite", "true",
          "--run.tensorboard", "false", "--run.checkpoint_every", "100"]
# What the paper reads off its figures 3 to 5 (sections 4.3 and 4.4), for the report.
PAPER = ("in the paper the BiT ResNets are ahead of ViT when pretrained on ImageNet and ViT overtakes them on the "
         "larger sets (figure 3); on random subsets of JFT-300M, ViT-B/32, a little cheaper than ResNet50, is well "
         "behind it at 9M images and ahead from 90M on (figure 4); and at equal pretraining compute ViT is ahead of "
         "the ResNets, which need about 2 to 4 times the compute for the same transfer accuracy (figure 5)")


def seeds_for(plan: dict, size: int) -> list[int]:
    return plan["seeds"].get(str(size), plan["other_seeds"])


def epochs_for(plan: dict, size: int) -> float:
    """The epochs that make `plan["steps"]` optimisation steps of n images (an epoch is n // batch steps)."""
    per_epoch = size // plan["batch"]
    if per_epoch < 1:
        raise SystemExit(f"a training set of {size} images holds no full batch of {plan['batch']}: use larger sizes")
    return plan["steps"] / per_epoch


def data_options(plan: dict) -> list[str]:
    """The options every run of `plan` shares besides COMMON: the image size, where it is not the native 28."""
    return [] if plan["image_size"] == 28 else ["--data.image_size", str(plan["image_size"])]


def size_label(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


def run_dir(work: Path, label: str, size: int, seed: int) -> Path:
    slug = {VIT: "vit", RESNET: "resnet18"}.get(label, "hybrid")
    return work / f"{slug}-n{size}-seed{seed}"


def trained_model(weights: Path) -> tuple[torch.nn.Module, dict]:
    """The model a run saved and its preprocessing. vitkit's loaders read ViT weights; the ResNet baseline is
    rebuilt here from its stored config and state dict."""
    tensors, metadata = read_safetensors(weights)
    stored = json.loads(metadata[CONFIG_KEY])
    if stored.get("architecture") != ARCHITECTURE:
        return load_pretrained(weights)
    model = ResNetBaseline(ResNetConfig.from_dict(stored))
    model.load_state_dict(tensors, strict=True)
    return model, json.loads(metadata.get(PREPROCESS_KEY, "{}"))


class Prober:
    """The few-shot probe of trained models on the MNIST subset, its data loaded once."""

    def __init__(self, plan: dict, image_size: tuple[int, int]):
        self.size = image_size
        self.device = resolve_device("auto")
        self.precision = resolve_precision("auto", self.device, training=True)  # the arithmetic the runs trained in
        self.data = load_dataset("mnist-subset", image_size=image_size, in_chans=1, seed=0)
        self.draws = draw_shots(self.data, plan["shots"], plan["draws"], seed=0)

    def __call__(self, model: torch.nn.Module, preprocess: dict) -> dict[str, float]:
        """Mean test top-1 (%) over the draws, per number of shots."""
        model = model.to(self.device).eval()
        mean, std = normalisation(preprocess, 1)

        def represent(images: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, self.precision):
                return model.forward_head(model.forward_features(images), pre_logits=True)

        results = probe(represent, self.data, eval_transform(mean, std, self.size), self.draws,
                        FewShotOptions().l2, device=self.device)
        return {str(r.shots): 100 * r.mean for r in results}


def one_point(plan: dict, work: Path, label: str, size: int, seed: int, prober: Prober,
              flops: dict[str, int]) -> dict:
    """Train one model on n images at one seed (unless done), probe it (unless done); the point's numbers."""
    out = run_dir(work, label, size, seed)
    args = ["train", *COMMON, *MODELS[label], *data_options(plan), "--data.train_size", str(size),
            "--run.seed", str(seed), "--optim.batch_size", str(plan["batch"]),
            "--optim.epochs", repr(epochs_for(plan, size))]
    results = step(args, out)
    probe_file = out / "probe.json"
    if probe_file.exists():
        few_shot = json.loads(probe_file.read_text())
    else:
        model, preprocess = trained_model(out / "model.safetensors")
        few_shot = prober(model, preprocess)
        atomic_write_text(probe_file, json.dumps(few_shot, indent=2) + "\n")
    if label not in flops:
        model, _ = trained_model(out / "model.safetensors")
        flops[label] = training_flops_per_image(model, model.cfg.img_size, model.cfg.in_chans)
    sessions = wall_sessions(out)
    measured = [t for t in sessions if t is not None]
    images = results["steps"] * plan["batch"]
    return {"model": label, "size": size, "seed": seed, "dir": str(out), "steps": results["steps"],
            "test_top1": 100 * results["test"]["top1"], "few_shot": few_shot,
            "wall_minutes": sum(measured) / 60 if measured else None, "sessions": len(sessions),
            "unmeasured_sessions": len(sessions) - len(measured),
            "images_seen": images, "train_flops": flops[label] * images}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def summarise(runs: list[dict], shots: list[int]) -> dict:
    """Per model and size: test top-1 and few-shot accuracy (mean, sd, seeds), wall minutes and training FLOPs."""
    summary: dict = {}
    for r in runs:
        summary.setdefault(r["model"], {}).setdefault(str(r["size"]), []).append(r)
    out = {}
    for label, by_size in summary.items():
        out[label] = {}
        for size, points in by_size.items():
            walls = [p["wall_minutes"] for p in points if p["wall_minutes"] is not None]
            out[label][size] = {
                "test": spread([p["test_top1"] for p in points]),
                "few_shot": {str(k): spread([p["few_shot"][str(k)] for p in points]) for k in shots},
                "wall_minutes": statistics.fmean(walls) if walls else None,
                "train_flops": points[0]["train_flops"]}
    return out


def paired_gap(runs: list[dict], size: int, a: str, b: str) -> dict | None:
    """Test top-1 of `a` minus `b` at `size`, per seed (the same training images for both), and its mean with the
    standard error of the mean over the seeds (None with one seed)."""
    by = {(r["model"], r["seed"]): r["test_top1"] for r in runs if r["size"] == size}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
    if not seeds:
        return None
    gaps = [by[(a, s)] - by[(b, s)] for s in seeds]
    se = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else None
    return {"size": size, "seeds": seeds, "per_seed": gaps, "mean": statistics.fmean(gaps), "se": se}


def crossing(summary: dict, sizes: list[int], a: str, b: str, shots: int | None = None) -> str:
    """Where the mean curves of `a` and `b` cross, read off the measured sizes: test top-1, or the `shots`-shot
    probe's accuracy."""
    def mean(label: str, n: int) -> float:
        point = summary[label][str(n)]
        return (point["test"] if shots is None else point["few_shot"][str(shots)])["mean"]

    what = "curves" if shots is None else f"{shots}-shot curves"
    gaps = [mean(a, n) - mean(b, n) for n in sizes]
    changes = [(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1) if (gaps[i] > 0) != (gaps[i + 1] > 0)]
    if changes:
        return "; ".join(f"the {what} of {a} and {b} cross between {size_label(lo)} and {size_label(hi)} images"
                         for lo, hi in changes)
    ahead = a if gaps[0] > 0 else b
    low, high = min(map(abs, gaps)), max(map(abs, gaps))
    return (f"the {what} of {a} and {b} do not cross between {size_label(sizes[0])} and {size_label(sizes[-1])} "
            f"images: {ahead} is ahead at every size, by {low:.2f} to {high:.2f} points (from {gaps[0]:+.2f} at "
            f"{size_label(sizes[0])} to {gaps[-1]:+.2f} at {size_label(sizes[-1])}, {a} minus {b})")


def findings(record: dict) -> list[str]:
    sizes, summary = record["plan"]["sizes"], record["summary"]
    lines = [_sentence(crossing(summary, sizes, RESNET, VIT))]
    for gap in record["gaps"]:
        if gap is None:
            continue
        error = f" +- {gap['se']:.2f} (standard error over {len(gap['seeds'])} seeds)" if gap["se"] is not None else \
            " (one seed: no uncertainty)"
        lines.append(f"{RESNET} minus {VIT} at {size_label(gap['size'])} images: {gap['mean']:+.2f} points{error}.")
    lines.append(_sentence(crossing(summary, sizes, RESNET, VIT, shots=record["plan"]["shots"][-1])))
    largest = summary[RESNET][str(sizes[-1])], summary[VIT][str(sizes[-1])]
    lines.append(f"Training compute at {size_label(sizes[-1])} images: {RESNET} spent "
                 f"{largest[0]['train_flops'] / largest[1]['train_flops']:.0f} times the FLOPs of {VIT} "
                 f"({largest[0]['train_flops']:.2e} against {largest[1]['train_flops']:.2e}) for "
                 f"{largest[0]['test']['mean'] - largest[1]['test']['mean']:+.2f} points of test top-1.")
    other = [label for label in MODELS if label not in (VIT, RESNET)]
    for label in other:
        lines.append(_sentence(crossing(summary, sizes, label, VIT)))
    lines.append(f"For comparison, {PAPER}.")
    return lines


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _cell(s: dict | None, digits: int = 2) -> str:
    if s is None:
        return "n/a"
    return f"{s['mean']:.{digits}f}" + (f" +- {s['sd']:.{digits}f}" if s["sd"] is not None else "")


def plot(record: dict, out_dir: Path, stem: str) -> dict[str, str]:
    """The three PNGs; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, summary, shots = record["plan"]["sizes"], record["summary"], record["plan"]["shots"]
    names = {"accuracy": f"{stem}_accuracy.png", "few_shot": f"{stem}_fewshot.png",
             "compute": f"{stem}_compute.png"}
    seeds = "mean +- sd over seeds"

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in summary:
        points = [summary[label][str(n)]["test"] for n in sizes]
        ax.errorbar(sizes, [p["mean"] for p in points], yerr=[p["sd"] or 0 for p in points], marker="o",
                    capsize=3, label=label)
    _size_axis(ax, sizes)
    ax.set(ylabel="Fashion-MNIST test top-1 (%)", title=f"Accuracy against training-set size ({seeds})")
    _finish(fig, ax, out_dir / names["accuracy"])

    fig, axes = plt.subplots(1, len(shots), figsize=(5.5 * len(shots), 4.5), squeeze=False)
    for ax, k in zip(axes[0], shots):
        for label in summary:
            points = [summary[label][str(n)]["few_shot"][str(k)] for n in sizes]
            ax.errorbar(sizes, [p["mean"] for p in points], yerr=[p["sd"] or 0 for p in points], marker="o",
                        capsize=3, label=label)
        _size_axis(ax, sizes)
        ax.set(ylabel="MNIST-subset test top-1 (%)", title=f"{k}-shot linear probe of the frozen features")
    _finish(fig, axes[0][0], out_dir / names["few_shot"], [a for a in axes[0][1:]])

    largest = str(sizes[-1])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in summary:
        point = summary[label][largest]
        mark = ax.errorbar([point["train_flops"]], [point["test"]["mean"]], yerr=[point["test"]["sd"] or 0],
                           marker="o", capsize=3, label=label)
        seeds_runs = [r["test_top1"] for r in record["runs"] if r["model"] == label and str(r["size"]) == largest]
        ax.scatter([point["train_flops"]] * len(seeds_runs), seeds_runs, s=10, alpha=0.5,
                   color=mark[0].get_color())
    ax.set_xscale("log")
    ax.set(xlabel="training FLOPs (forward and backward)", ylabel="Fashion-MNIST test top-1 (%)",
           title=f"Accuracy against training compute at {size_label(sizes[-1])} images")
    _finish(fig, ax, out_dir / names["compute"])
    return names


def _size_axis(ax, sizes: list[int]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(sizes, [size_label(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training images (stratified subset of Fashion-MNIST's 60k)")


def _finish(fig, ax, path: Path, others=()) -> None:
    import matplotlib.pyplot as plt

    for a in (ax, *others):
        a.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(record: dict, out_dir: Path, stem: str) -> Path:
    plan, summary, shots = record["plan"], record["summary"], record["plan"]["shots"]
    lines = ["# Data scaling: ViT against a ResNet as the training set grows (the paper's figures 3 to 5)", "",
             *header_lines(record),
             f"- plan: {plan['steps']} steps of {plan['batch']} images at every size (epochs = steps / (n // "
             f"{plan['batch']})), sizes {', '.join(size_label(n) for n in plan['sizes'])} of Fashion-MNIST's 60,000 "
             "training images (stratified, nested per seed, no validation split), seeds "
             + ", ".join(f"{size_label(n)}: {seeds_for(plan, n)}" for n in plan["sizes"])
             + f"; few-shot: the ridge probe on the MNIST subset, {plan['draws']} draws",
             "- each run: `vitkit train " + " ".join(COMMON + data_options(plan)) + " --data.train_size N --run.seed S "
             f"--optim.batch_size {plan['batch']} --optim.epochs E` and the model's options: "
             + "; ".join(f"{label}: `{' '.join(args)}`" for label, args in MODELS.items()),
             "- training FLOPs per image (one forward and backward pass, counted on the model): "
             + ", ".join(f"{label} {flops / 1e6:.1f} M" for label, flops in record["flops_per_image"].items()), "",
             "| model | images | test top-1 (mean +- sd) | seeds | "
             + " | ".join(f"{k}-shot MNIST subset" for k in shots) + " | training FLOPs | wall min per run |",
             "|---|---|---|---|" + "---|" * len(shots) + "---|---|"]
    for label, by_size in summary.items():
        for n in plan["sizes"]:
            s = by_size[str(n)]
            wall = "n/a" if s["wall_minutes"] is None else f"{s['wall_minutes']:.1f}"
            lines.append(f"| {label} | {size_label(n)} | {_cell(s['test'])} | {s['test']['n']} | "
                         + " | ".join(_cell(s["few_shot"][str(k)]) for k in shots)
                         + f" | {s['train_flops']:.2e} | {wall} |")
    resumed = [r["dir"] for r in record["runs"] if r["sessions"] > 1]
    short = [r["dir"] for r in record["runs"] if r["unmeasured_sessions"] or not r["sessions"]]
    if resumed:
        lines.append(f"\nResumed runs (wall time summed over their sessions): {', '.join(resumed)}.")
    if short:
        lines.append(f"\nRuns with sessions this study did not time (their wall time is missing or short): "
                     f"{', '.join(short)}.")
    lines += ["", *[f"- {line}" for line in record["findings"]], ""]
    lines += [f"![accuracy against data size]({record['plots']['accuracy']})",
              f"![few-shot accuracy against data size]({record['plots']['few_shot']})",
              f"![accuracy against training compute]({record['plots']['compute']})"]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = experiment_parser(__doc__, "two sizes, one seed, a few dozen steps on small images",
                               "runs/bench-data-scaling")
    parser.add_argument("--steps", type=int, help=f"optimisation steps per point (default {FULL['steps']}; the run "
                        "directories are named by model, size and seed, so use another --work for another count)")
    args = parser.parse_args()
    plan = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be at least 1, got {args.steps}")
        plan["steps"] = args.steps
    if max(plan["sizes"]) > TRAIN_IMAGES:
        parser.error(f"the sizes {plan['sizes']} go beyond Fashion-MNIST's {TRAIN_IMAGES} training images")
    work = Path(args.work)
    started = datetime.now(timezone.utc)
    record = {"benchmark": "data scaling" + (" (quick)" if args.quick else ""), **provenance(started), "plan": plan}
    prober = Prober(plan, (plan["image_size"], plan["image_size"]))
    flops: dict[str, int] = {}
    record["runs"] = [one_point(plan, work, label, n, seed, prober, flops)
                      for n in plan["sizes"] for seed in seeds_for(plan, n) for label in MODELS]
    record["flops_per_image"] = flops
    record["summary"] = summarise(record["runs"], plan["shots"])
    record["gaps"] = [paired_gap(record["runs"], n, RESNET, VIT) for n in (plan["sizes"][0], plan["sizes"][-1])]
    record["findings"] = findings(record)
    base = result_base(args.out, "data_scaling" + ("_quick" if args.quick else ""), started)
    out_dir, stem = base.parent, base.name
    record["plots"] = plot(record, out_dir, stem)
    write_json(record, base)
    print(report(record, out_dir, stem).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
