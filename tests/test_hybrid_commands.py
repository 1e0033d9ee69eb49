"""A hybrid through the commands: train, export with a dynamic size, inspect; and what refuses it (MPP)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import vitkit
from vitkit.cli import main
from vitkit.inspect import mean_attention_distance, write_inspection
from vitkit.pretrain import MaskedPatchPrediction

TINY = ["--model.width", "32", "--model.depth", "1", "--model.heads", "2", "--model.mlp_dim", "64"]


def tiny_hybrid() -> vitkit.ViT:
    torch.manual_seed(0)
    return vitkit.create_model("R+Ti/4", img_size=28, in_chans=1, num_classes=5, width=32, depth=1, heads=2,
                               mlp_dim=64).eval()


def test_a_hybrid_trains_from_the_command_line_and_exports(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data.dataset", "synthetic", "--model.name", "R+Ti/4", *TINY, "--model.patch_dropout",
                 "0.5", "--optim.epochs", "1", "--run.max_steps", "3", "--run.progress", "false", "--run.out",
                 str(run)])
    assert code == 0, capsys.readouterr().err
    with safe_open(run / "model.safetensors", "pt") as f:
        stored = json.loads(f.metadata()["vitkit_config"])
    assert stored["stem_layers"] == [] and stored["patch_size"] == 1  # the root block, 1x1 patches of its map
    out = tmp_path / "hybrid.onnx"
    assert main(["export", "--weights", str(run / "model.safetensors"), "--out", str(out), "--dynamic"]) == 0
    printed = capsys.readouterr().out
    error = float(printed.split("max relative logit error ")[1].split()[0].rstrip(",;)"))
    assert out.exists() and error < 1e-4


def test_the_inspection_analyses_measure_a_hybrids_tokens_in_pixels(tmp_path):
    model = tiny_hybrid()
    images = torch.randn(2, 1, 28, 28)
    distance = mean_attention_distance(model, images)  # (L, h) in pixels: tokens 4 pixels apart
    assert distance.shape == (1, 2) and (distance > 0).all() and (distance < 28 * 2**0.5).all()
    written = write_inspection(model, images, tmp_path / "inspect")
    assert {"filters", "pos_embed", "attention_distance", "rollout"} <= set(written)


def test_masked_patch_prediction_refuses_a_hybrid():
    objective = MaskedPatchPrediction(32, 1, 1, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="hybrid"):
        objective.check_model(tiny_hybrid())


def test_a_hybrids_filters_are_its_root_convolutions():
    from vitkit.inspect import embedding_filters

    components, ratio = embedding_filters(tiny_hybrid(), k=5)
    assert components.shape == (5, 1, 7, 7) and ratio.shape == (5,) and 0 < ratio.sum() <= 1 + 1e-9
