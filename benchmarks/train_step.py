"""What each training-step speed-up buys: the step as it was and with each change, side by side in one process.

    .venv/bin/python benchmarks/train_step.py            # the default recipe's shape and Ti/7, 30 rounds
    .venv/bin/python benchmarks/train_step.py --reps 10  # fewer rounds (a smoke run)

A step here is what the trainer does for one batch of 128: forward in bf16-mixed precision (or fp32 where the CPU
has no bf16), cross-entropy, backward, gradient clipping at norm 1 and the optimiser's step, on random 28x28 images
and labels (speed does not depend on their values). The contenders, each on its own copy of the same model:

- before: AdamW with foreach=True, gradient clipping without foreach, attention probabilities recomputed in backward
  (the code up to commit aaa5c6c);
- fused AdamW: only the optimiser changed (one kernel per parameter for the whole update);
- kept attention: only the attention changed (autograd keeps the small probabilities instead of recomputing them);
- now: what vitkit's trainer runs (all of the above, and gradient clipping with foreach);
- now, fp32: the same in fp32, where the contenders above run bf16-mixed (a CPU with bf16 dot products). Until
  commit f5a971e `--run.precision auto` meant bf16-mixed on such a CPU; now it means the faster of the two, timed on
  the model (vitkit.fastest_mode), and the report says which one it chose here.

Eager steps only: a compiled step fuses what the changes touch differently, and compiling each contender costs
about a minute. Contenders are interleaved (each runs once per round, in turn, so machine noise hits all alike) and
the figures are medians over rounds. Writes docs/results/train_step_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from provenance import header_lines, provenance, result_base, write_json

from vitkit.fastest_mode import fastest_training_precision
from vitkit.model import create_model, vit
from vitkit.runtime import autocast, resolve_precision
from vitkit.train.optim import build_optimizer, parameter_groups

BATCH = 128
# The default recipe's model (configs/fashion_mnist.yaml) and a smaller plain one (the quick preset's model until it
# became the hybrid R+Ti/8): width 128, depth 4, 4 heads.
SHAPES = {
    "default recipe: Ti/4, PatchDropout 0.5 (26 tokens)": ("Ti/4", 0.5),
    "Ti/7 (17 tokens)": ("Ti/7", 0.0),
}
CONTENDERS = ("before", "fused AdamW", "kept attention", "now")
NOW_FP32 = "now, fp32"


@contextmanager
def attention_recomputed(recompute: bool):
    """The attention as before (probabilities always recomputed in backward) while `recompute` holds."""
    kept = vit.KEPT_PROBABILITIES_MAX
    vit.KEPT_PROBABILITIES_MAX = -1 if recompute else kept
    try:
        yield
    finally:
        vit.KEPT_PROBABILITIES_MAX = kept


def contender(name: str, model_name: str, patch_dropout: float, precision: str):
    """(model, step): a fresh model (the same for every contender) and a step of it as `name` ran it."""
    torch.manual_seed(0)
    model = create_model(model_name, width=128, depth=4, heads=4, mlp_dim=256, num_classes=10, in_chans=1,
                         img_size=(28, 28), patch_dropout=patch_dropout)
    old_optimizer = name in ("before", "kept attention")
    optimizer = (torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-4, foreach=True) if old_optimizer
                 else build_optimizer(model, "adamw", 1e-4, 0.05))
    recompute = name in ("before", "fused AdamW")
    clip_foreach = name in ("now", NOW_FP32)
    device = torch.device("cpu")
    tokens = model.cfg.grid_size[0] * model.cfg.grid_size[1]
    generator = torch.Generator().manual_seed(1)

    def step() -> None:
        images = torch.randn(BATCH, 1, 28, 28, generator=generator)
        labels = torch.randint(0, 10, (BATCH,), generator=generator)
        extra = {"patch_noise": torch.rand(BATCH, tokens, generator=generator)} if patch_dropout else {}
        with attention_recomputed(recompute), autocast(device, precision):
            logits = model(images, **extra)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=clip_foreach or None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30, help="interleaved rounds (the first 5 are warm-up)")
    parser.add_argument("--out", default="docs/results", help="where the report goes")
    args = parser.parse_args()
    if args.reps < 8:
        parser.error(f"--reps must be at least 8 (5 warm-up rounds and 3 timed), got {args.reps}")
    started = datetime.now(timezone.utc)
    record = provenance(started)
    # The precision "auto" meant before it was timed: bf16-mixed wherever the CPU has bf16 dot products.
    precision = resolve_precision("auto", torch.device("cpu"), training=True)
    names = (*CONTENDERS, NOW_FP32) if precision != "fp32" else CONTENDERS
    record.update(benchmark="training step speed-ups", batch=BATCH, precision=precision, rounds=args.reps,
                  shapes={}, auto={})
    lines = ["# What each training-step speed-up buys", "", *header_lines(record),
             f"- batch {BATCH}, {precision} precision (but for '{NOW_FP32}'), eager, {args.reps} interleaved rounds "
             "(5 warm-up), medians", ""]
    for shape, (model_name, patch_dropout) in SHAPES.items():
        steps = {name: contender(name, model_name, patch_dropout, "fp32" if name == NOW_FP32 else precision)[1]
                 for name in names}
        times = {name: [] for name in names}
        for _ in range(args.reps):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        ms = {name: 1000 * statistics.median(t[5:]) for name, t in times.items()}
        record["shapes"][shape] = {name: {"ms_per_step": round(ms[name], 2),
                                          "images_per_s": round(1000 * BATCH / ms[name], 1),
                                          "speedup_vs_before": round(ms["before"] / ms[name], 3)}
                                   for name in names}
        model = contender("now", model_name, patch_dropout, "fp32")[0]
        choice = fastest_training_precision(model, torch.device("cpu"), BATCH)
        record["auto"][shape] = {"precision": choice.precision, "reason": choice.reason}
        lines += [f"## {shape}", "", "| step | ms per step | images/s | x before |", "|---|---|---|---|"]
        lines += [f"| {name} | {ms[name]:.1f} | {1000 * BATCH / ms[name]:.0f} | {ms['before'] / ms[name]:.2f} |"
                  for name in names]
        lines += ["", f"`--run.precision auto` trains this model in {choice.precision} here: {choice.reason}", ""]
    base = result_base(args.out, "train_step", started)
    write_json(record, base)
    base.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {base}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
