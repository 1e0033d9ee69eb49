"""The ResNet-18 baseline: torchvision's network with the small-image stem, trained, checkpointed and resumed by the
one training loop, and refused clearly wherever vitkit needs a ViT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models import resnet18

from test_train import _assert_same_weights, _losses, _stopped_and_resumed
from vitkit.cli import main
from vitkit.model.resnet import ResNetBaseline, ResNetConfig
from vitkit.train.config import DataOptions, ModelOptions, OptimOptions, PretrainConfig, RunOptions, TrainConfig
from vitkit.train.trainer import train
from vitkit.weights import WeightsError, load_pretrained


def small_images(batch: int = 3, chans: int = 1, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(0))


def test_shapes_and_the_classifier_surface():
    model = ResNetBaseline(ResNetConfig(img_size=28, in_chans=1, num_classes=10)).eval()
    x = small_images()
    assert model(x).shape == (3, 10)
    features = model.forward_features(x)
    assert features.shape == (3, model.num_features) == (3, 512)
    assert torch.equal(model.forward_head(features, pre_logits=True), features)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.cfg.name == "ResNet-18" and isinstance(model.head, nn.Linear)


@pytest.mark.parametrize("stride", [2, 1])
def test_forward_is_torchvisions_resnet18_with_the_same_stem_and_weights(stride):
    ours = ResNetBaseline(ResNetConfig(img_size=32, in_chans=3, num_classes=7, stem_stride=stride))
    theirs = resnet18(num_classes=7)
    theirs.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=stride, padding=1, bias=False)
    theirs.maxpool = nn.Identity()
    renamed = {("fc." + k[len("head."):] if k.startswith("head.") else k): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(renamed, strict=True)  # every tensor has its counterpart, of the same shape
    x = small_images(4, 3, 32)
    for mode in ("train", "eval"):  # batch statistics, then the running statistics the training step updated
        getattr(ours, mode)(), getattr(theirs, mode)()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("stride, stage1, stage4", [(2, 14, 2), (1, 28, 4)])
def test_the_stem_halves_the_image_for_stage_one_or_keeps_it(stride, stage1, stage4):
    model = ResNetBaseline(ResNetConfig(img_size=28, in_chans=1, num_classes=10, stem_stride=stride)).eval()
    seen = {}
    for name in ("layer1", "layer4"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: tuple(o.shape)}))
    model(small_images(1))
    assert seen == {"layer1": (1, 64, stage1, stage1), "layer4": (1, 512, stage4, stage4)}


def test_bad_input_and_patch_noise_are_refused_clearly():
    model = ResNetBaseline(ResNetConfig(img_size=28, in_chans=1, num_classes=10))
    with pytest.raises(ValueError, match=r"takes \(B, 1, H, W\) images, got a tensor of shape \(2, 3, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"no patch tokens to drop.*--model.patch_dropout 0"):
        model(small_images(2), patch_noise=torch.rand(2, 49))
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        model.reset_classifier(-1)
    with pytest.raises(ValueError, match="in_chans must be a positive integer, got 0"):
        ResNetConfig(in_chans=0)
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2, got 4"):
        ResNetConfig(stem_stride=4)


def test_reset_classifier_and_the_config_round_trip():
    model = ResNetBaseline(ResNetConfig(img_size=28, in_chans=1, num_classes=10)).eval()
    x = small_images(2)
    features = model.forward_features(x)
    model.reset_classifier(0)
    assert torch.equal(model(x), features) and model.cfg.num_classes == 0
    model.reset_classifier(5)
    assert torch.equal(model(x), torch.zeros(2, 5))  # a zero-initialised head, as the ViT's
    cfg = ResNetConfig(img_size=(28, 32), in_chans=1, num_classes=4)
    assert ResNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # a config stored before the stem's stride was an option describes the stride-1 stem it was built with
    stored = {k: v for k, v in cfg.to_dict().items() if k != "stem_stride"}
    assert ResNetConfig.from_dict(stored).stem_stride == 1 and cfg.stem_stride == 2
    with pytest.raises(ValueError, match=r"unknown ResNet config keys \['width'\]"):
        ResNetConfig.from_dict({**cfg.to_dict(), "width": 128})


def tiny_resnet_config(out: Path, **optim) -> TrainConfig:
    """A few seconds of the baseline on the synthetic set, at 8x8 pixels."""
    return TrainConfig(
        model=ModelOptions(name="resnet18", patch_dropout=0.0),
        data=DataOptions(dataset="synthetic", image_size=8, crop="pad", pad=1, flip=True),
        optim=OptimOptions(**{"batch_size": 32, "epochs": 2, "lr": 3e-3, "warmup": 0.1, **optim}),
        run=RunOptions(out=str(out), precision="fp32", progress=False, tensorboard=False, checkpoint_every=7,
                       log_every=1),
    )


def test_training_writes_its_run_and_resumes_bit_exactly(tmp_path):
    def config(out: Path) -> TrainConfig:
        return tiny_resnet_config(out, ema=0.9)  # the average's copy of the BatchNorm statistics is checkpointed too

    whole = train(config(tmp_path / "whole"))
    run = tmp_path / "whole"
    for name in ("config.yaml", "results.json", "model.safetensors", "best.safetensors", "checkpoints/last"):
        assert (run / name).exists(), name
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == whole.steps == 56  # 2 epochs of 900 // 32 = 28 steps
    assert results["test"]["top1"] == pytest.approx(whole.test.top1)
    assert whole.test.top1 > 0.5, whole.test  # 10 classes: it learns

    _stopped_and_resumed(config(tmp_path / "part"), 17)  # mid-epoch, between the checkpoints every 7 steps
    _assert_same_weights(run, tmp_path / "part")
    assert any(key.endswith("running_mean") for key in load_file(run / "model.safetensors"))
    assert _losses(tmp_path / "part") == _losses(run)


def test_the_command_line_trains_it(tmp_path):
    out = tmp_path / "cli"
    code = main(["train", "--model.name", "resnet18", "--model.patch_dropout", "0", "--data", "synthetic",
                 "--data.image_size", "8", "--optim.epochs", "0.5", "--optim.batch_size", "32",
                 "--run.precision", "fp32", "--run.progress", "false", "--run.tensorboard", "false",
                 "--run.out", str(out)])
    assert code == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 14


@pytest.mark.parametrize("change,message", [
    ({"patch_dropout": 0.5}, r"asks for --model.patch_dropout 0.5: .*--model.patch_dropout 0\)"),
    ({"width": 256, "dropout": 0.1}, r"asks for --model.width 256, --model.dropout 0.1"),
    ({"representation_size": 64}, r"asks for --model.representation_size 64"),
])
def test_vit_options_it_cannot_honour_are_refused(tmp_path, change, message):
    cfg = tiny_resnet_config(tmp_path / "run")
    for key, value in change.items():
        setattr(cfg.model, key, value)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_vit_defaults_it_does_not_use_are_left_aside(tmp_path):
    cfg = tiny_resnet_config(tmp_path / "run", epochs=0.2)
    cfg.model.width, cfg.model.pool = None, None  # null, as at their defaults (128, cls): nothing to honour
    assert train(cfg).steps == 6


def test_fine_tuning_pretraining_and_the_vit_loaders_refuse_it(tmp_path):
    cfg = tiny_resnet_config(tmp_path / "ft")
    cfg.init.weights = str(tmp_path / "some.safetensors")
    with pytest.raises(ValueError, match=r"trains from a random initialisation only; drop --init.weights"):
        train(cfg)
    base = tiny_resnet_config(tmp_path / "mpp")
    pretrain = PretrainConfig(model=base.model, data=base.data, optim=base.optim, run=base.run)
    with pytest.raises(ValueError, match=r"the model is ResNet-18, which has none: pretrain a plain ViT"):
        train(pretrain)
    run = tmp_path / "run"
    train(tiny_resnet_config(run, epochs=0.2))
    with pytest.raises(WeightsError, match=r"holds the ResNet-18 baseline .* take ViT weights only"):
        load_pretrained(run / "model.safetensors")
