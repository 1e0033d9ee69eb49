"""Fine-tuning: the new head, resolution and channel changes, and `vitkit finetune` runs and their errors."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_train import _assert_same_weights, _stopped_and_resumed
from vitkit.cli import build_parser, expand_aliases, main
from vitkit.data import eval_transform
from vitkit.model import adapt_for_finetune, adapt_input_channels
from vitkit.train.setup import model_for_finetune
from vitkit.train.sweep import finetune_sweep
from vitkit.model import create_model
from vitkit.train.config import (DataOptions, InitOptions, ModelOptions, OptimOptions, RunOptions, TrainConfig,
                                 finetune_defaults)
from vitkit.evaluation import evaluate
from vitkit.train.trainer import train
from vitkit.data import Transformed
from vitkit.weights import WeightsError, load_model

timm_pos_embed = pytest.importorskip("timm.layers.pos_embed")


def pretrained(**overrides):
    torch.manual_seed(0)
    model = create_model("Ti/4", img_size=16, in_chans=3, num_classes=7, width=32, depth=2, heads=4, mlp_dim=64,
                         **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" model: nothing left at its initial zero
    return model.eval()


def test_new_head_is_exactly_zero_and_everything_else_is_kept():
    source = pretrained(representation_size=24)
    model = adapt_for_finetune(source, num_classes=3)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.head.weight.shape == (3, 32)  # the pre-logits layer is dropped, as in the paper
    theirs = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, theirs[key]), key
    kept = adapt_for_finetune(source, num_classes=3, keep_pre_logits=True)
    assert kept.head.weight.shape == (3, 24)
    assert torch.equal(kept.pre_logits.fc.weight, source.pre_logits.fc.weight)
    assert source.head.weight.shape == (7, 24)  # the source is untouched


def test_same_grid_keeps_the_position_embedding_bit_for_bit():
    source = pretrained()
    model = adapt_for_finetune(source, num_classes=3, img_size=16)
    assert torch.equal(model.pos_embed, source.pos_embed)


@pytest.mark.parametrize("size", [24, 32, (16, 28)])
def test_new_grid_matches_timm_resample_and_is_stored(size):
    source = pretrained()
    model = adapt_for_finetune(source, num_classes=3, img_size=size)
    new_grid = model.cfg.grid_size
    expected = timm_pos_embed.resample_abs_pos_embed(source.pos_embed.detach(), list(new_grid), [4, 4],
                                                     num_prefix_tokens=1, interpolation="bicubic", antialias=True)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-5)
    assert model.pos_embed.shape == (1, 1 + new_grid[0] * new_grid[1], 32)
    model(torch.randn(1, 3, *model.cfg.img_size))


@pytest.mark.parametrize("old,new", [(1, 3), (3, 1)])
def test_channel_change_keeps_grey_images_unchanged(old, new):
    torch.manual_seed(0)
    source = pretrained() if old == 3 else create_model("Ti/4", img_size=16, in_chans=1, num_classes=7, width=32,
                                                        depth=2, heads=4, mlp_dim=64).eval()
    model = adapt_for_finetune(source, num_classes=3, in_chans=new)
    grey = torch.randn(2, 1, 16, 16)
    src_in = grey.expand(-1, old, -1, -1)
    new_in = grey.expand(-1, new, -1, -1)
    torch.testing.assert_close(model.forward_features(new_in), source.forward_features(src_in), rtol=1e-5, atol=1e-5)


def test_unsupported_changes_are_clear_errors():
    source = pretrained()
    with pytest.raises(ValueError, match=r"30x30 is not divisible by the patch size 4"):
        adapt_for_finetune(source, num_classes=3, img_size=30)
    with pytest.raises(ValueError, match="at least 2 classes"):
        adapt_for_finetune(source, num_classes=1)
    with pytest.raises(ValueError, match="3-channel patch embedding to 4 channels"):
        adapt_input_channels(source.patch_embed.proj.weight, 4)


# --- `vitkit finetune`: the training loop started from pretrained weights ---------------------------------------

@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    """Weights pretrained for a few seconds on the synthetic set (10 classes, 3 x 16 x 16 images)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    cfg = TrainConfig(model=ModelOptions(name="Ti/4", width=32, depth=2, heads=2, mlp_dim=64),
                      data=DataOptions(dataset="synthetic", flip=False),
                      optim=OptimOptions(batch_size=32, epochs=3, lr=3e-3, warmup=0.1),
                      run=RunOptions(out=str(out), progress=False, tensorboard=False))
    train(cfg)
    return out / "model.safetensors"


def finetune_config(weights, out, **optim) -> TrainConfig:
    cfg = finetune_defaults()
    cfg.init.weights = str(weights)
    cfg.data.dataset = "synthetic"
    cfg.optim.batch_size, cfg.optim.epochs = 32, 2
    for key, value in optim.items():
        setattr(cfg.optim, key, value)
    cfg.run = RunOptions(out=str(out), progress=False, tensorboard=False, checkpoint_every=7)
    return cfg


def test_weights_without_a_config_give_the_same_finetune_model(pretrained_file, tmp_path):
    source = load_model(pretrained_file)
    model = model_for_finetune(InitOptions(weights=str(pretrained_file)), finetune_defaults().model, num_classes=4,
                               img_size=(16, 16), in_chans=3)
    assert model.head.weight.shape == (4, 32)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    plain = tmp_path / "timm_layout.safetensors"  # what timm's save gives: the tensors, no vitkit config
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, plain)
    with pytest.raises(WeightsError, match=r"number of attention heads for width 32.*--model\.heads"):
        model_for_finetune(InitOptions(weights=str(plain)), finetune_defaults().model, 4, (16, 16), 3)
    options = finetune_defaults().model
    options.heads = 2  # shapes do not tell the heads of a non-standard width
    again = model_for_finetune(InitOptions(weights=str(plain)), options, num_classes=4, img_size=(16, 16), in_chans=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
        if not key.startswith("head."):
            assert torch.equal(value, source.state_dict()[key]), key


def test_finetune_run_on_synthetic_starts_at_a_zero_head_and_improves_accuracy(pretrained_file, tmp_path,
                                                                                 monkeypatch):
    import vitkit.train.trainer as trainer

    built = {}
    real_build, real_load = trainer.build_model, trainer._load_data

    def recording_build(*args):
        model = real_build(*args)
        built["model"] = copy.deepcopy(model)
        return model

    def recording_load(cfg):
        built["data"], image_size = real_load(cfg)
        return built["data"], image_size

    monkeypatch.setattr(trainer, "build_model", recording_build)
    monkeypatch.setattr(trainer, "_load_data", recording_load)
    result = train(finetune_config(pretrained_file, tmp_path / "ft", epochs=3, lr=0.03))
    start, data = built["model"], built["data"]
    assert torch.count_nonzero(start.head.weight) == 0 and torch.count_nonzero(start.head.bias) == 0
    # A zero head gives every class the same score, so the first class wins everywhere: its share of the test set.
    test_set = Transformed(data.test, eval_transform(data.mean, data.std, data.image_size))
    before = evaluate(start, test_set, data.num_classes, torch.device("cpu"))
    assert before.top1 == pytest.approx(float((data.test.labels == 0).double().mean()))
    assert result.test.top1 > before.top1 + 0.3, (before.top1, result.test.top1)


def test_frozen_backbone_trains_only_the_head(pretrained_file, tmp_path):
    cfg = finetune_config(pretrained_file, tmp_path / "probe", epochs=1)
    cfg.init.freeze = True
    train(cfg)
    tuned, source = load_file(tmp_path / "probe" / "model.safetensors"), load_file(pretrained_file)
    for key, value in tuned.items():
        if key.startswith("head."):
            assert torch.count_nonzero(value) > 0, key
        else:
            assert torch.equal(value, source[key]), key


def test_higher_resolution_finetune_stores_the_new_grid(pretrained_file, tmp_path):
    cfg = finetune_config(pretrained_file, tmp_path / "hi", epochs=0.5)
    cfg.data.image_size = 24
    train(cfg)
    model = load_model(tmp_path / "hi" / "model.safetensors")
    assert model.cfg.img_size == (24, 24) and model.pos_embed.shape == (1, 1 + 6 * 6, 32)
    start = model_for_finetune(cfg.init, cfg.model, 10, (24, 24), 3)
    expected = timm_pos_embed.resample_abs_pos_embed(load_model(pretrained_file).pos_embed.detach(), [6, 6], [4, 4],
                                                     num_prefix_tokens=1, interpolation="bicubic", antialias=True)
    torch.testing.assert_close(start.pos_embed.detach(), expected, rtol=0, atol=1e-5)


def test_finetune_resumes_bit_exactly(pretrained_file, tmp_path):
    train(finetune_config(pretrained_file, tmp_path / "whole"))
    _stopped_and_resumed(finetune_config(pretrained_file, tmp_path / "part"), 9)
    _assert_same_weights(tmp_path / "whole", tmp_path / "part")


def test_sweep_keeps_the_learning_rate_with_the_best_validation_accuracy(pretrained_file, tmp_path):
    best, runs = finetune_sweep(finetune_config(pretrained_file, tmp_path / "sweep", epochs=1), [1e-4, 0.03])
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    vals = {r["lr"]: r["val_top1"] for r in summary["runs"]}
    assert vals == {r.lr: r.val_top1 for r in runs}
    assert summary["chosen_lr"] == best.lr == max(vals, key=vals.get)
    chosen = tmp_path / "sweep" / f"lr-{best.lr:g}" / "model.safetensors"
    assert (tmp_path / "sweep" / "model.safetensors").read_bytes() == chosen.read_bytes()


def test_finetune_short_options_and_paper_defaults():
    parser = build_parser()
    argv = expand_aliases(["finetune", "--weights", "w.safetensors", "--data", "digits", "--resolution=28",
                            "--freeze"])
    cfg = parser.instantiate(parser.parse_args(argv)).finetune
    assert (cfg.init.weights, cfg.data.dataset, cfg.data.image_size, cfg.init.freeze) == (
        "w.safetensors", "digits", 28, True)
    optim = cfg.optim
    assert (optim.optimizer, optim.momentum, optim.weight_decay, optim.clip_grad) == ("sgd", 0.9, 0.0, 1.0)
    assert cfg.optim.schedule == "cosine" and 0 < cfg.optim.warmup < 1
    assert cfg.model.name is None and cfg.model.width is None  # the architecture is the weights'


def _one_class_folder(root: Path) -> Path:
    from PIL import Image

    (root / "only").mkdir(parents=True)
    for i in range(12):
        Image.new("L", (16, 16), i * 20).save(root / "only" / f"{i}.png")
    return root


@pytest.mark.parametrize("options,message", [
    (["--model.name", "Ti/8"], r"ask for patch_size 8 \(the weights have 4\)"),
    (["--model.width", "64"], r"width 64 \(the weights have 32\)"),
    (["--resolution", "30"], r"--resolution 30x30 is not divisible by the patch size 4"),
    (["--data.dataset", "image-folder"], r"has 1 class; classification needs at least 2"),
    (["--weights", "nowhere.safetensors"], r"nowhere\.safetensors does not exist"),
])
def test_finetune_bad_input_is_a_clear_error_and_writes_nothing(pretrained_file, tmp_path, capsys, options, message):
    folder = _one_class_folder(tmp_path / "folder")
    out = tmp_path / "run"
    code = main(["finetune", "--weights", str(pretrained_file), "--data", "synthetic", "--data.data_dir", str(folder),
                 "--run.out", str(out), *options])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_bad_finetune_options_leave_the_run_they_would_overwrite_intact(pretrained_file, tmp_path, capsys):
    cfg = finetune_config(pretrained_file, tmp_path / "run", epochs=0.2)
    train(cfg)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    code = main(["finetune", "--weights", str(pretrained_file), "--data", "synthetic", "--resolution", "30",
                 "--run.out", str(tmp_path / "run"), "--run.overwrite", "true"])
    assert code == 2 and "not divisible" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_finetune_needs_weights(capsys, tmp_path):
    assert main(["finetune", "--data", "synthetic", "--run.out", str(tmp_path / "r")]) == 2
    assert "needs --weights" in capsys.readouterr().err


def test_patch_dropout_is_set_for_fine_tuning_like_the_other_regularisers():
    source = pretrained(patch_dropout=0.5)
    for rate in (0.0, 0.25):
        model = adapt_for_finetune(source, num_classes=3, patch_dropout=rate)
        assert model.cfg.patch_dropout == rate and source.cfg.patch_dropout == 0.5


def test_vitkit_finetune_trains_without_patch_dropout_whatever_the_train_default(pretrained_file):
    assert TrainConfig().model.patch_dropout > 0  # the Fashion-MNIST recipe uses it ...
    options = finetune_defaults().model  # ... `vitkit finetune` does not, unless asked
    model = model_for_finetune(InitOptions(weights=str(pretrained_file)), options, num_classes=4,
                               img_size=(16, 16), in_chans=3)
    assert options.patch_dropout == 0.0 and model.cfg.patch_dropout == 0.0
