"""A learning-rate sweep of fine-tuning runs, chosen by validation accuracy (the paper's fine-tuning protocol)."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from vitkit.atomic import atomic_write_text
from vitkit.train.config import TrainConfig
from vitkit.train.trainer import train as run_training


@dataclass
class SweepRun:
    lr: float
    run_dir: Path
    val_top1: float
    test_top1: float | None


def finetune_sweep(cfg: TrainConfig, lrs: list[float], train=None) -> tuple[SweepRun, list[SweepRun]]:
    """Fine-tune once per learning rate (in <out>/lr-<lr>) and keep the one with the best validation top-1.

    The chosen run's weights are copied to <out>/model.safetensors and every run's figures go to
    <out>/sweep.json. Returns (chosen run, all runs).
    """
    if train is None:
        train = run_training
    if not lrs:
        raise ValueError("--sweep needs at least one learning rate")
    bad = [lr for lr in lrs if not lr > 0]
    if bad:
        raise ValueError(f"--sweep learning rates must be positive, got {bad}")
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for lr in lrs:
        sub = copy.deepcopy(cfg)
        sub.optim.lr = lr
        sub.run.out = str(out / f"lr-{lr:g}")
        print(f"sweep: learning rate {lr:g} -> {sub.run.out}")
        result = train(sub)
        if result.val is None:
            raise ValueError("a learning-rate sweep needs a validation split to choose by: set --data.val_size")
        runs.append(SweepRun(lr, result.run_dir, result.val.top1, result.test.top1 if result.test else None))
    best = max(runs, key=lambda r: r.val_top1)  # the first of equals: the smallest tried learning rate
    if (best.run_dir / "model.safetensors").exists():
        shutil.copyfile(best.run_dir / "model.safetensors", out / "model.safetensors")
    summary = {"chosen_lr": best.lr, "chosen_by": "validation top-1",
               "runs": [{"lr": r.lr, "run_dir": str(r.run_dir), "val_top1": r.val_top1, "test_top1": r.test_top1}
                        for r in runs]}
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    for r in runs:
        test = f"{100 * r.test_top1:.2f}%" if r.test_top1 is not None else "-"
        print(f"  lr {r.lr:<8g} val top-1 {100 * r.val_top1:6.2f}%  test top-1 {test}"
              + ("   <- chosen" if r is best else ""))
    return best, runs
