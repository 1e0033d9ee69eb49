"""The accuracy-cost benchmark: every vitkit mode and the exported model's contenders score the same test images,
against the labels and against vitkit fp32, and the report says what `--precision auto` runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitkit
from benchmark_scripts import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


def benchmark():
    return benchmark_module("inference_accuracy")


def test_predictions_pad_the_last_batch_to_the_one_shape():
    shapes = []

    def runner(images):
        shapes.append(tuple(images.shape))
        return images.flatten(1)[:, :3]  # logits: the first three pixels

    images = torch.randn(7, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    classes = benchmark().predictions(runner, images, batch_size=3)
    assert torch.equal(classes, images.flatten(1)[:, :3].argmax(1))
    assert shapes == [(3, 1, 2, 2)] * 3  # 3 + 3 + 1 padded to 3


def test_scored_rows_compare_with_the_labels_and_with_fp32():
    scored = benchmark().scored
    labels = torch.tensor([0, 1, 2, 3])
    fp32 = scored("fp32", torch.tensor([0, 1, 2, 0]), labels, torch.tensor([0, 1, 2, 0]), None, 1.0)
    assert (fp32["test_top1"], fp32["points_vs_fp32"], fp32["agreement_with_fp32"]) == (75.0, 0.0, 1.0)
    other = scored("int8", torch.tensor([0, 1, 1, 0]), labels, torch.tensor([0, 1, 2, 0]), 75.0, 1.0)
    assert (other["test_top1"], other["points_vs_fp32"], other["agreement_with_fp32"]) == (50.0, -25.0, 0.75)
    assert fp32["meets_goals"] and not other["meets_goals"]


@pytest.mark.slow  # 14 s end to end; `make test-slow` runs it
def test_the_benchmark_runs_end_to_end_on_a_small_model(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = vitkit.create_model("Ti/4", img_size=28, in_chans=1, num_classes=10, width=32, depth=2, heads=2,
                                mlp_dim=64)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    weights = tmp_path / "tiny.safetensors"
    vitkit.save_weights(model, weights, metadata={"vitkit_preprocess": json.dumps({"mean": [0.5], "std": [0.5]})})
    command = [sys.executable, str(ROOT / "benchmarks" / "inference_accuracy.py"), "--weights", str(weights),
               "--data", "synthetic", "--no-compile", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = (tmp_path / "out").glob("inference_accuracy_*.json")
    record = json.loads(report.read_text())
    rows = {row["mode"]: row for row in record["modes"]}
    assert list(rows)[:4] == ["fp32", "bf16", "bf16-mixed", "int8"]
    assert rows["fp32"]["agreement_with_fp32"] == 1.0 and rows["fp32"]["points_vs_fp32"] == 0.0
    assert {"onnxruntime fp32", "onnxruntime int8"} <= set(rows)
    assert rows["onnxruntime fp32"]["agreement_with_fp32"] >= 0.99  # the same arithmetic, exported
    for row in rows.values():
        assert 0 <= row["test_top1"] <= 100
        assert row["points_vs_fp32"] == pytest.approx(row["test_top1"] - rows["fp32"]["test_top1"], abs=0.011)
    assert record["auto"]["precision"] in ("fp32", "bf16", "int8")
    text = report.with_suffix(".md").read_text()
    assert f"`--precision auto` at batch 500 here: {record['auto']['precision']}" in text
