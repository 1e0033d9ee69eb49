"""`--init.zero_residual`: every block starts as the identity plus its branches' biases, and still learns."""

import pytest
import torch

from vitkit.model import ViT, ViTConfig
from vitkit.train.config import TrainConfig
from vitkit.train.setup import build_model


def small_vit() -> ViT:
    return ViT(ViTConfig(img_size=(28, 28), patch_size=4, in_chans=1, num_classes=10, width=32, depth=2, heads=2,
                         mlp_dim=64))


def test_each_block_starts_as_the_identity_plus_its_branch_biases():
    torch.manual_seed(0)
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_residual_branches()
    after = model.state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed == {f"blocks.{i}.{p}.weight" for i in range(2) for p in ("attn.proj", "mlp.fc2")}
    x = torch.randn(3, 50, 32)
    for block in model.blocks:
        out, _ = block(x)  # (B, T, D)
        # The attention branch adds proj's bias; the MLP branch fc2's bias: nothing of x passes through either.
        expected = x + block.attn.proj.bias + block.mlp.fc2.bias
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_the_zeroed_weights_still_get_gradients():
    torch.manual_seed(0)
    model = small_vit()
    model.zero_residual_branches()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # the head starts at zero too: give the loss a slope
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for block in model.blocks:
        assert block.attn.proj.weight.grad.abs().sum() > 0
        assert block.mlp.fc2.weight.grad.abs().sum() > 0


def test_training_from_scratch_applies_it_when_asked():
    cfg = TrainConfig()
    torch.manual_seed(5)
    official = build_model(cfg, 10, (28, 28), 1)
    cfg.init.zero_residual = True
    torch.manual_seed(5)
    zeroed = build_model(cfg, 10, (28, 28), 1)
    for name, value in zeroed.state_dict().items():
        if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            assert not value.any()
        else:  # the rest of the initialisation is the same draw
            assert torch.equal(value, official.state_dict()[name]), name


@pytest.mark.parametrize("start", ["weights", "resnet"])
def test_it_is_refused_where_there_are_no_new_branches_to_zero(start, tmp_path):
    cfg = TrainConfig()
    cfg.init.zero_residual = True
    if start == "weights":
        cfg.init.weights = str(tmp_path / "vit.safetensors")
        cfg.model.name = None
        expected = r"--init.weights .*vit\.safetensors starts from trained branches"
    else:
        cfg.model.name = "resnet18"
        expected = r"--model.name resnet18 is the ResNet-18 baseline, not a ViT"
    with pytest.raises(ValueError, match=expected):
        build_model(cfg, 10, (28, 28), 1)
