"""The accuracy cost of each inference mode on a trained model: top-1 agreement with fp32 and test accuracy.

    .venv/bin/python benchmarks/inference_accuracy.py                       # the default recipe's model
    .venv/bin/python benchmarks/inference_accuracy.py --weights W --data D

The default weights are what `benchmarks/train_recipe.py` trains (runs/bench-default/model.safetensors).
Every mode of vitkit.inference_modes, with and without torch.compile (int8 also calibrated on the first 1,000
training images, as `vitkit calibrate` does), classifies the whole test split, and so do
the contenders of benchmarks/speed.py that run the exported model (ONNX Runtime fp32 and dynamic int8; OpenVINO
fp32, bf16 and NNCF int8 where installed; `--no-exported` leaves them out), built as the speed harness builds them
except that OpenVINO's int8 is calibrated on 1,000 training images rather than random ones;
the report gives each one's test top-1, its difference to fp32, and the fraction of images on which its top-1
class equals vitkit fp32's, and which mode `--precision auto` runs at this batch on this machine. Written to
docs/results/inference_accuracy_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone

import torch
from provenance import header_lines, provenance, result_base, write_json

from vitkit.data import eval_transform, load_dataset
from vitkit.inference import load_for_inference, normalisation
from vitkit.inference_modes import MODES, InferenceModel, fastest_inference_mode, onednn_int8_available
from vitkit.int8_calibration import calibrate_int8

GOALS = {"agreement_at_least": 0.995, "accuracy_within_points": 0.2}
BATCH = 500


def predictions(runner, images: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """Top-1 classes of `images`, in batches of `batch_size` (the last one padded to it: OpenVINO's model is made
    static for one batch shape)."""
    classes = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        padded = torch.cat([chunk, chunk[-1:].expand(batch_size - len(chunk), *chunk.shape[1:])])
        classes.append(runner(padded.contiguous())[:len(chunk)].argmax(1))
    return torch.cat(classes)


def scored(name: str, predicted: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
           fp32_top1: float | None, seconds: float) -> dict:
    """One row of the report: `predicted` classes against the labels and against fp32's (`reference`)."""
    top1 = round(100 * float((predicted == labels).double().mean()), 2)
    agreement = round(float((predicted == reference).double().mean()), 4)
    points = round(top1 - (top1 if fp32_top1 is None else fp32_top1), 2)
    row = {"mode": name, "test_top1": top1, "agreement_with_fp32": agreement, "seconds_incl_compile": round(seconds, 1),
           "points_vs_fp32": points}
    row["meets_goals"] = (row["agreement_with_fp32"] >= GOALS["agreement_at_least"]
                          and abs(row["points_vs_fp32"]) <= GOALS["accuracy_within_points"])
    print(row, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="runs/bench-default/model.safetensors")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--no-exported", action="store_true",
                        help="leave out the exported model's contenders (ONNX Runtime, OpenVINO)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled vitkit modes")
    args = parser.parse_args()
    started = datetime.now(timezone.utc)
    record = {"benchmark": "accuracy cost of the inference modes",
              **provenance(started),
              "weights": args.weights, "data": args.data, "goals": GOALS, "batch": BATCH, "modes": []}

    model, preprocess = load_for_inference(args.weights, torch.device("cpu"))
    cfg = model.cfg
    data = load_dataset(args.data, image_size=cfg.img_size, in_chans=cfg.in_chans)
    transform = eval_transform(*normalisation(preprocess, cfg.in_chans), cfg.img_size)
    images = torch.stack([transform(data.test[i][0]) for i in range(len(data.test))])
    labels = torch.as_tensor([data.test[i][1] for i in range(len(data.test))])

    # name -> a callable that builds the runner when its turn comes (a compiled one compiles then)
    runners = {precision + (" + compile" if compiled else ""):
               (lambda p=precision, c=compiled: InferenceModel(model, p, c))
               for compiled in ((False,) if args.no_compile else (False, True)) for precision in MODES}
    # Calibrated as a deployer would: on training images (the first 1,000), vitkit's int8 as OpenVINO's.
    calibration = torch.stack([transform(data.train[i][0]) for i in range(min(1000, len(data.train)))])
    if onednn_int8_available():
        ranges = calibrate_int8(model, calibration)
        runners.update({"int8 calibrated" + (" + compile" if compiled else ""):
                        (lambda c=compiled: InferenceModel(model, "int8", c, int8_calibration=ranges))
                        for compiled in ((False,) if args.no_compile else (False, True))})
    if not args.no_exported:
        from speed import exported_contenders, openvino_unavailable

        missing = openvino_unavailable()
        if missing:
            print(f"OpenVINO contenders left out: {missing}", flush=True)
        exported = exported_contenders(model, True, missing is None, BATCH, calibration)
        runners.update({name: (lambda run=run: run) for name, run in exported.items()})
    reference = fp32_top1 = None
    for name, build in runners.items():
        start = time.perf_counter()
        predicted = predictions(build(), images)
        seconds = time.perf_counter() - start
        if reference is None:  # vitkit fp32, the first
            reference = predicted
        record["modes"].append(scored(name, predicted, labels, reference, fp32_top1, seconds))
        fp32_top1 = record["modes"][0]["test_top1"]
    auto = fastest_inference_mode(model, torch.device("cpu"), BATCH)
    record["auto"] = {"precision": auto.precision, "reason": auto.reason}

    base = result_base(args.out, "inference_accuracy", started)
    write_json(record, base)
    lines = ["# Accuracy cost of the inference modes", "",
             *header_lines(record),
             f"- weights: {args.weights} ({cfg.name}, {cfg.img_size[0]}x{cfg.img_size[1]}), {args.data} test split "
             f"({len(labels)} images)",
             f"- goals: top-1 agreement with fp32 >= {100 * GOALS['agreement_at_least']:.1f}%, test top-1 within "
             f"{GOALS['accuracy_within_points']} points",
             f"- `--precision auto` at batch {BATCH} here: {record['auto']['precision']} ({record['auto']['reason']})",
             "",
             "| mode | test top-1 | vs fp32 | top-1 agreement with fp32 | meets goals |", "|---|---|---|---|---|"]
    for r in record["modes"]:
        lines.append(f"| {r['mode']} | {r['test_top1']:.2f}% | {r['points_vs_fp32']:+.2f} | "
                     f"{100 * r['agreement_with_fp32']:.2f}% | {'yes' if r['meets_goals'] else 'NO'} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
