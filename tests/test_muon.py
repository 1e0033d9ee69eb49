"""The muon optimiser: torch.optim.Muon's update (the reference, whose orthogonalisation runs in bf16) in fp32, the
parameters it takes, and a run that stops and resumes on it as if it had not stopped."""

from __future__ import annotations

import pytest
import torch

import vitkit
from test_train import _assert_same_weights, _losses, _stopped_and_resumed, tiny_config
from vitkit.train.optim import MuonWithAdamW, build_optimizer, build_scheduler, orthogonalise
from vitkit.train.trainer import train


def test_orthogonalised_updates_keep_the_singular_vectors_with_singular_values_near_one():
    torch.manual_seed(0)
    for shape in ((16, 48), (48, 16)):
        k = min(shape)
        u = torch.linalg.qr(torch.randn(shape[0], k)).Q
        v = torch.linalg.qr(torch.randn(shape[1], k)).Q
        update = u @ torch.diag(torch.logspace(-0.5, 1, k)) @ v.T  # singular values 0.3..10
        ortho = orthogonalise(update)
        assert ortho.shape == update.shape
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        values = u.T @ ortho @ vh.T  # diagonal if the singular vectors are kept
        off_diagonal = values - torch.diag(values.diagonal())
        assert off_diagonal.abs().max() < 1e-4
        assert values.diagonal().min() > 0.5 and values.diagonal().max() < 1.5, values.diagonal()


def test_muon_steps_like_torchs_muon_scaled_to_adamw():
    torch.manual_seed(0)
    weight = torch.randn(24, 8)
    grads = [torch.randn(24, 8) for _ in range(4)]
    lr, wd = 0.02, 0.1
    results = {}
    for name in ("vitkit", "torch"):
        param = torch.nn.Parameter(weight.clone())
        bias = torch.nn.Parameter(torch.zeros(3))  # AdamW's share: it refuses an empty list (no gradient here)
        optimizer = (MuonWithAdamW([param], [{"params": [bias]}], lr, wd, (0.9, 0.95)) if name == "vitkit" else
                     torch.optim.Muon([param], lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw"))
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        results[name] = param.detach()
    moved = (results["vitkit"] - weight).abs().max()
    assert moved > 0.02
    # torch's bf16 orthogonalisation rounds each update to about 3 significant digits
    torch.testing.assert_close(results["vitkit"], results["torch"], rtol=0, atol=0.02 * moved)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_at_one_schedule():
    model = vitkit.create_model("Ti/4", img_size=16, in_chans=1, num_classes=10, width=32, depth=2, heads=2,
                                mlp_dim=64, pos_embed="relative")
    optimizer = build_optimizer(model, "muon", 1e-3, weight_decay=0.05)
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(param): name for name, param in model.named_parameters()}
    muon = {names[id(param)] for group in optimizer.muon.param_groups for param in group["params"]}
    assert muon == {f"blocks.{i}.{layer}.weight" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                                 "mlp.fc2")}
    adamw = [names[id(param)] for group in optimizer.adamw.param_groups for param in group["params"]]
    assert sorted(adamw + sorted(muon)) == sorted(names.values())  # every parameter once
    assert "blocks.0.attn.relative_position_bias_table" in adamw and "head.weight" in adamw
    scheduler = build_scheduler(optimizer, total_steps=10, warmup=5, schedule="cosine")
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = [group["lr"] for group in optimizer.muon.param_groups + optimizer.adamw.param_groups]
    assert len(lrs) == 3 and all(abs(lr - 1e-3 * 4 / 5) < 1e-12 for lr in lrs), lrs  # warm-up's 4th step of 5


def test_muon_refuses_a_model_without_encoder_blocks():
    with pytest.raises(ValueError, match="optimizer muon .* this model has none: choose adamw or sgd"):
        build_optimizer(torch.nn.Linear(3, 4), "muon", 1e-3)


def test_muon_refuses_a_frozen_encoder_and_says_so(tmp_path, capsys):
    from vitkit.cli import main
    model = vitkit.create_model("Ti/4", img_size=28, in_chans=1, num_classes=10, width=16, depth=1, heads=2,
                                mlp_dim=32)
    vitkit.save_weights(model, tmp_path / "pretrained.safetensors")
    out = tmp_path / "run"
    assert main(["finetune", "--data", "synthetic", "--init.weights", str(tmp_path / "pretrained.safetensors"),
                 "--init.freeze", "true", "--optim.optimizer", "muon", "--run.out", str(out),
                 "--run.precision", "fp32", "--run.compile", "false", "--run.progress", "false",
                 "--run.tensorboard", "false"]) == 2
    err = capsys.readouterr().err
    assert "blocks are frozen (--init.freeze), so only the head trains: choose adamw or sgd" in err, err
    assert not out.exists()


def test_a_muon_run_resumed_mid_epoch_is_bit_exact(tmp_path):
    def config(out):
        cfg = tiny_config(out, optimizer="muon")
        cfg.run.log_every = 1
        return cfg

    train(config(tmp_path / "whole"))
    _stopped_and_resumed(config(tmp_path / "part"), stop_at=17)
    _assert_same_weights(tmp_path / "whole", tmp_path / "part")
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "part")
