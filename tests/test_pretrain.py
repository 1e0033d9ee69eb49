"""Pretraining through the one training loop: `vitkit pretrain` (masked patch prediction) learns, resumes
bit-exactly and hands its encoder to `vitkit finetune`; the paper's Adam and sigmoid cross-entropy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from test_train import _assert_same_weights, _losses, _stopped_and_resumed
from vitkit.cli import main
from vitkit.train.config import (DataOptions, ModelOptions, MPPOptions, OptimOptions, PretrainConfig, RunOptions,
                                 pretrain_defaults)
from vitkit.train.objective import sigmoid_cross_entropy
from vitkit.train.optim import build_optimizer
from vitkit.train.trainer import train

SMALL = ["--data", "synthetic", "--model.width", "32", "--model.depth", "2", "--model.heads", "2",
         "--model.mlp_dim", "64", "--run.precision", "fp32", "--run.progress", "false", "--run.tensorboard", "false"]


def mpp_config(out: Path, **run) -> PretrainConfig:
    cfg = pretrain_defaults()
    cfg.model = ModelOptions(name="Ti/4", width=32, depth=2, heads=2, mlp_dim=64, patch_dropout=0.0, dropout=0.1)
    cfg.data = DataOptions(dataset="synthetic", crop="pad", pad=1, flip=True)
    cfg.optim = OptimOptions(optimizer="adam", batch_size=32, epochs=3, lr=3e-3, warmup=0.1, label_smoothing=0.0)
    cfg.run = RunOptions(out=str(out), precision="fp32", progress=False, tensorboard=False, checkpoint_every=7,
                         log_every=1, **run)
    return cfg


def test_pretrain_lowers_the_mpp_loss_and_resumes_bit_exactly(tmp_path):
    train(mpp_config(tmp_path / "whole"))
    losses = [loss for _, loss in _losses(tmp_path / "whole")]
    # The synthetic images are RGB: 512 colour classes, chance log(512) = 6.24 nats, where the first steps start.
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < min(0.88 * first, math.log(512) - 0.5), (losses[:5], losses[-5:])
    results = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert results["test"]["loss"] < losses[0] and 0 < results["test"]["patch_top1"] <= 1
    header = (tmp_path / "whole" / "config.yaml").read_text().splitlines()[0]
    assert header.startswith("# vitkit pretrain --config")

    # The mask embedding and the head come back from the checkpoint: the weights say so.
    _stopped_and_resumed(mpp_config(tmp_path / "part"), 17)
    _assert_same_weights(tmp_path / "whole", tmp_path / "part")
    assert "head.weight" not in load_file(tmp_path / "whole" / "model.safetensors")  # the encoder alone
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")


def test_the_pretrained_encoder_is_what_finetune_starts_from(tmp_path):
    assert main(["pretrain", *SMALL, "--optim.epochs", "0.5", "--run.out", str(tmp_path / "pre")]) == 0
    encoder = load_file(tmp_path / "pre" / "model.safetensors")
    from vitkit.train.config import InitOptions, ModelOptions as Options
    from vitkit.train.setup import model_for_finetune
    from vitkit.weights import load_model

    pretrained = load_model(tmp_path / "pre" / "model.safetensors").cfg
    assert pretrained.num_classes == 0  # the encoder alone
    options = Options(name=None, width=None, depth=None, heads=None, mlp_dim=None, pool=None, patch_dropout=0.0)
    model = model_for_finetune(InitOptions(weights=str(tmp_path / "pre" / "model.safetensors")), options, 4,
                               pretrained.img_size, pretrained.in_chans)
    for key, value in encoder.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert main(["finetune", "--weights", str(tmp_path / "pre" / "model.safetensors"), "--data", "synthetic",
                 "--optim.epochs", "0.5", "--run.progress", "false", "--run.out", str(tmp_path / "ft")]) == 0


@pytest.mark.parametrize("options,message", [
    (["--model.patch_dropout", "0.5"], r"patch_dropout 0.5.*set patch_dropout 0"),
    (["--mpp.rate", "1.5"], r"rate.*1.5"),
    (["--mpp.split", "[0.5,0.3,0.3]"], r"split.*sum"),
    (["--mpp.bits", "9"], r"bits.*9"),
    (["--mpp.bits", "0"], r"bits.*0"),
])
def test_pretrain_bad_options_are_clear_errors_and_write_nothing(tmp_path, capsys, options, message):
    import re

    out = tmp_path / "run"
    assert main(["pretrain", *SMALL, "--run.out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()


def test_the_papers_adam_decays_weights_apart_from_the_gradient_as_flax_does():
    # Flax's Adam (flax.optim.Adam), written out: moments of the gradient alone, then
    # p <- p - lr * (m_hat / (sqrt(v_hat) + eps)) - lr * wd * p, with the old p in the decay term.
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    grads = [torch.randn(4, 3) for _ in range(3)]
    lr, wd, (b1, b2), eps = 0.1, 0.3, (0.9, 0.999), 1e-8
    p, m, v = weight.detach().clone().double(), torch.zeros(4, 3).double(), torch.zeros(4, 3).double()
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g.double()
        v = b2 * v + (1 - b2) * g.double() ** 2
        update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        p = p - lr * update - lr * wd * p
    results = {}
    for name in ("adam", "adam-l2"):
        module = torch.nn.Linear(3, 4, bias=False)
        module.weight = torch.nn.Parameter(weight.detach().clone())
        optimizer = build_optimizer(module, name, lr, weight_decay=wd)
        for g in grads:
            module.weight.grad = g.clone()
            optimizer.step()
        results[name] = module.weight.detach().double()
    torch.testing.assert_close(results["adam"], p, rtol=1e-5, atol=1e-6)
    assert (results["adam-l2"] - p).abs().max() > 1e-3  # decay through the moments is another optimiser


def test_sigmoid_cross_entropy_is_the_summed_binary_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([0, 1])
    expected = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        for k, z in enumerate(row):
            y = 1.0 if k == label else 0.0
            expected += -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
    assert sigmoid_cross_entropy(logits, labels).item() == pytest.approx(expected / 2, rel=1e-6)
    smoothed = sigmoid_cross_entropy(logits, labels, 0.3)
    targets = F.one_hot(labels, 3).float() * 0.7 + 0.1
    assert smoothed.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, targets, reduction="sum").item()
                                            / 2, rel=1e-6)


def test_training_with_the_sigmoid_loss_learns(tmp_path):
    assert main(["train", *SMALL, "--optim.loss", "sigmoid", "--optim.epochs", "3", "--optim.batch_size", "32",
                 "--optim.lr", "3e-3", "--model.patch_dropout", "0", "--run.out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test"]["top1"] > 0.5


def test_mpp_options_round_trip_through_the_run_config(tmp_path):
    cfg = mpp_config(tmp_path / "r")
    cfg.mpp = MPPOptions(target="downsized", bits=2, rate=0.25, split=(0.5, 0.25, 0.25), downsize=2)
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg
