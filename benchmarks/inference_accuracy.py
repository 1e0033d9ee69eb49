"""The accuracy cost of each inference mode on a trained model: top-1 agreement with fp32 and test accuracy.

    .venv/bin/python benchmarks/inference_accuracy.py                       # the default recipe's model
    .venv/bin/python benchmarks/inference_accuracy.py --weights W --data D

The default weights are what `benchmarks/train_recipe.py` trains (runs/bench-default/model.safetensors).
Every mode of vitkit.inference_modes, with and without torch.compile, classifies the whole test split;
the report gives each mode's test top-1, its difference to fp32, and the fraction of images on which its
top-1 class equals fp32's. Written to docs/results/inference_accuracy_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import provenance

from vitkit.data import eval_transform, load_dataset
from vitkit.inference import load_for_inference, normalisation
from vitkit.inference_modes import MODES, InferenceModel

GOALS = {"agreement_at_least": 0.995, "accuracy_within_points": 0.2}


def predictions(runner, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([runner(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="runs/bench-default/model.safetensors")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    started = datetime.now(timezone.utc)
    record = {"benchmark": "accuracy cost of the inference modes",
              **provenance(started),
              "weights": args.weights, "data": args.data, "goals": GOALS, "modes": []}

    model, preprocess = load_for_inference(args.weights, torch.device("cpu"))
    cfg = model.cfg
    data = load_dataset(args.data, image_size=cfg.img_size, in_chans=cfg.in_chans)
    transform = eval_transform(*normalisation(preprocess, cfg.in_chans), cfg.img_size)
    images = torch.stack([transform(data.test[i][0]) for i in range(len(data.test))])
    labels = torch.as_tensor([data.test[i][1] for i in range(len(data.test))])

    reference = None
    for compiled in (False, True):
        for precision in MODES:
            start = time.perf_counter()
            predicted = predictions(InferenceModel(model, precision, compile=compiled), images)
            seconds = time.perf_counter() - start
            if reference is None:
                reference = predicted
            top1 = float((predicted == labels).double().mean())
            row = {"mode": precision + (" + compile" if compiled else ""), "test_top1": round(100 * top1, 2),
                   "agreement_with_fp32": round(float((predicted == reference).double().mean()), 4),
                   "seconds_incl_compile": round(seconds, 1)}
            fp32_top1 = record["modes"][0]["test_top1"] if record["modes"] else row["test_top1"]
            row["points_vs_fp32"] = round(row["test_top1"] - fp32_top1, 2)
            row["meets_goals"] = (row["agreement_with_fp32"] >= GOALS["agreement_at_least"]
                                  and abs(row["points_vs_fp32"]) <= GOALS["accuracy_within_points"])
            record["modes"].append(row)
            print(row, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"inference_accuracy_{started.strftime('%Y-%m-%d_%H%M')}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    m = record["machine"]
    lines = ["# Accuracy cost of the inference modes", "",
             f"- command: `{record['command']}`", f"- date: {record['date']}, commit {record['commit']}",
             f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}",
             f"- weights: {args.weights} ({cfg.name}, {cfg.img_size[0]}x{cfg.img_size[1]}), {args.data} test split "
             f"({len(labels)} images)",
             f"- goals: top-1 agreement with fp32 >= {100 * GOALS['agreement_at_least']:.1f}%, test top-1 within "
             f"{GOALS['accuracy_within_points']} points", "",
             "| mode | test top-1 | vs fp32 | top-1 agreement with fp32 | meets goals |", "|---|---|---|---|---|"]
    for r in record["modes"]:
        lines.append(f"| {r['mode']} | {r['test_top1']:.2f}% | {r['points_vs_fp32']:+.2f} | "
                     f"{100 * r['agreement_with_fp32']:.2f}% | {'yes' if r['meets_goals'] else 'NO'} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
