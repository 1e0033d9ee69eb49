"""The hybrid of section 3.1 (a ResNet's feature map as the patch sequence) against timm's, both ways.

Reference models are built on the meta device and given random weights (randomise_), which are moved into vitkit;
no downloads. The default suite runs every named hybrid's ResNet in full, with fewer encoder blocks for the big ones
and at small images (the machine is shared); the named models at their native sizes are @pytest.mark.slow.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from randomised import randomise_
from vitkit.inference_modes import InferenceModel
from vitkit.model import (STEMS, ViT, ViTConfig, adapt_for_finetune, count_parameters, create_model, decode_variant,
                          model_config, resample_pos_embed)
from vitkit.model.resnet_stem import RootBlock, _pad_same, stem_channels, stem_parameters, stem_stride
from vitkit.model.vit import HybridEmbed, PatchEmbed
from vitkit.runtime import cpu_has_vnni
from vitkit.weights import (WeightsError, export_npz, infer_config, load_model, load_pretrained, load_weights,
                            read_weights, save_weights)

timm = pytest.importorskip("timm")
from timm.layers import HybridEmbed as TimmHybridEmbed
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import _resnetv2

# vitkit name -> (timm name, native image size). The number after the slash is the total stride in both, except
# timm's stem-only model, whose tokens span 32 pixels (see vitkit.model.variants).
NAMED = {
    "R+Ti/32": ("vit_tiny_r_s16_p8_224", 224),
    "R26+S/32": ("vit_small_r26_s32_224", 224),
    "R50+B/16": ("vit_base_r50_s16_224", 224),
    "R50+B/16@384": ("vit_base_r50_s16_384", 384),
    "R50+L/32": ("vit_large_r50_s32_224", 224),
}
SMALL = dict(width=32, depth=2, heads=4, mlp_dim=64)  # a small encoder on top of a full ResNet
SMALL_TIMM = dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)


def images(n: int, size: tuple[int, int], seed: int = 1, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, *size, generator=torch.Generator().manual_seed(seed))


def timm_named(timm_name: str, seed: int = 0, **kwargs) -> VisionTransformer:
    """timm's model with random weights: built on meta (skipping its initialisation), then randomised."""
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True, **kwargs)
    return randomise_(model.to_empty(device="cpu"), seed).eval()


def timm_generic(layers: tuple[int, ...], img_size: int, patch_size: int, in_chans: int = 3, seed: int = 0,
                 **kwargs) -> VisionTransformer:
    """A timm hybrid of any ResNet layout, as timm's vit_*_r*_s* builds theirs (vision_transformer_hybrid.py)."""
    with torch.device("meta"):
        backbone = _resnetv2(layers=layers, in_chans=in_chans)
        model = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, dynamic_img_size=True,
                                  embed_layer=partial(TimmHybridEmbed, backbone=backbone), **kwargs)
    return randomise_(model.to_empty(device="cpu"), seed).eval()


def empty(name: str | None = None, cfg: ViTConfig | None = None, **overrides) -> ViT:
    """A vitkit model whose tensors are all to be filled (built on meta, skipping the initialisation)."""
    with torch.device("meta"):
        model = create_model(name, **overrides) if cfg is None else ViT(cfg)
    return model.to_empty(device="cpu").eval()


def random_hybrid(name: str | None = None, cfg: ViTConfig | None = None, seed: int = 0, **overrides) -> ViT:
    return randomise_(empty(name, cfg, **overrides), seed)


def vitkit_from(reference: torch.nn.Module, name: str | None = None, cfg: ViTConfig | None = None,
                **overrides) -> ViT:
    """A vitkit model with the reference's weights (every tensor comes from the reference)."""
    model = empty(name, cfg, **overrides)
    report = load_weights(model, reference.state_dict())
    assert report.format == "vitkit" and report.pos_embed_resampled is None
    return model


def outputs_and_input_grad(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.requires_grad_(False)  # input gradients only
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad


def assert_same_function(model: torch.nn.Module, reference: torch.nn.Module, sizes, n: int = 2,
                         grads: bool = True) -> None:
    for size in sizes:
        x = images(n, size, chans=model.cfg.in_chans)
        if grads:
            ref_out, ref_grad = outputs_and_input_grad(reference, x)
            out, grad = outputs_and_input_grad(model, x)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)
        else:
            with torch.no_grad():
                ref_out, out = reference(x), model(x)
        assert ref_out.std() > 0.3, "logits too small for the comparison to mean anything"
        torch.testing.assert_close(out, ref_out, rtol=1e-3, atol=1e-4)


# ---- names and parameter counts ----

@pytest.mark.parametrize("name,layers,patch,stride", [
    ("R50+B/16", (3, 4, 9), 1, 16),
    ("R50+ViT-B/16", (3, 4, 9), 1, 16),  # the paper's spelling
    ("R50+L/32", (3, 4, 6, 3), 1, 32),
    ("R50+B/64", (3, 4, 6, 3), 2, 64),  # the largest stride that divides: four stages, 2x2 patches
    ("r26+s/32", (2, 2, 2, 2), 1, 32),
    ("R26+S/16", (2, 2, 4), 1, 16),  # the paper's rule: stage 4's units moved into stage 3
    ("R+Ti/32", (), 8, 32),  # timm's vit_tiny_r_s16_p8_224
    ("R+Ti/16", (), 4, 16),
])
def test_hybrid_names_mean_the_total_stride(name, layers, patch, stride):
    cfg = model_config(name, img_size=(4 * stride, 7 * stride))
    assert (cfg.stem_layers, cfg.patch_size, cfg.stem_stride * cfg.patch_size) == (layers, patch, stride)
    assert cfg.total_stride == stride and cfg.grid_size == (4, 7)
    assert decode_variant(name)["name"] == cfg.name and "+" in cfg.name


def test_named_models_have_timms_grids():
    for name, (timm_name, size) in NAMED.items():
        cfg = model_config(name.split("@")[0], img_size=size)
        with torch.device("meta"):
            reference = timm.create_model(timm_name, pretrained=False)
        assert cfg.grid_size == tuple(reference.patch_embed.grid_size), name
        assert cfg.patch_size == reference.patch_embed.patch_size[0], name


@pytest.mark.parametrize("name", list(NAMED))
def test_parameter_counts_equal_the_built_model_and_timm(name):
    timm_name, size = NAMED[name]
    cfg = model_config(name.split("@")[0], img_size=size)
    with torch.device("meta"):
        model = ViT(cfg)
        reference = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    counted = count_parameters(cfg)
    assert counted == sum(p.numel() for p in model.parameters())
    assert counted == sum(p.numel() for p in reference.parameters())
    assert stem_parameters(cfg.stem_layers, 3) == sum(p.numel() for p in reference.patch_embed.backbone.parameters())


@pytest.mark.parametrize("layers,patch,in_chans", [((), 2, 1), ((1,), 1, 3), ((1, 1), 2, 3), ((1, 2, 1, 1), 1, 4)])
def test_parameter_count_of_any_layout(layers, patch, in_chans):
    cfg = ViTConfig(img_size=64, patch_size=patch, in_chans=in_chans, stem_layers=layers, num_classes=3, **SMALL)
    with torch.device("meta"):
        model = ViT(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_plain_models_have_no_stem():
    cfg = model_config("B/16")
    assert cfg.stem_layers is None and cfg.stem_stride == 1 and cfg.total_stride == 16
    with torch.device("meta"):
        model = ViT(cfg)
    assert type(model.patch_embed) is PatchEmbed and not any("backbone" in k for k in model.state_dict())


# ---- bad input ----

def test_unknown_stem_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown ResNet stem 'R101'.*\['R', 'R26', 'R50'\]"):
        model_config("R101+B/16")
    assert list(STEMS) == ["R", "R26", "R50"]


@pytest.mark.parametrize("name,multiple", [("R50+B/8", "16 or 32"), ("R+Ti/6", "4"), ("R26+S/24", "16 or 32")])
def test_a_total_stride_the_resnet_cannot_make_is_refused(name, multiple):
    with pytest.raises(ValueError, match=f"total stride.*multiple of {multiple}"):
        model_config(name)


@pytest.mark.parametrize("layers", [(1, 2, 3, 4, 5), (0,), (2, -1), "349", 3, (1.0,)])
def test_bad_layouts_are_refused(layers):
    with pytest.raises(ValueError, match="stem_layers"):
        ViTConfig(stem_layers=layers)


def test_image_sizes_the_total_stride_does_not_divide_are_refused():
    with pytest.raises(ValueError, match=r"200x200 is not divisible by the total stride 16 .*ResNet stride 16 x "
                                         r"patch size 1"):
        model_config("R50+B/16", img_size=200)
    with pytest.raises(ValueError, match=r"224x240 .*total stride 32 .*ResNet stride 4 x patch size 8"):
        model_config("R+Ti/32", img_size=(224, 240))
    model = create_model("R+Ti/32", img_size=64, **SMALL).eval()
    with pytest.raises(ValueError, match=r"64x80 is not divisible by the total stride 32"):
        model(images(1, (64, 80)))
    with pytest.raises(ValueError, match="3-channel images but got 1"):
        model(images(1, (64, 64), chans=1))


def test_plain_and_hybrid_weights_do_not_mix(tmp_path):
    hybrid = random_hybrid("R+S/32", img_size=64, num_classes=5, **SMALL)
    plain = create_model("S/32", img_size=64, num_classes=5, **SMALL)
    with pytest.raises(WeightsError, match=r"weights are a hybrid whose ResNet is the root block alone "
                                           r"\(stem_layers=\(\)\) but the model is a plain ViT.*'R\+<size>/32'"):
        load_weights(plain, hybrid.state_dict())
    with pytest.raises(WeightsError, match=r"weights are a plain ViT .* model is a hybrid"):
        load_weights(hybrid, plain.state_dict())
    other = empty(cfg=ViTConfig(img_size=64, stem_layers=(1, 2), patch_size=4, num_classes=5, **SMALL))
    with pytest.raises(WeightsError, match=r"weights are a hybrid with a ResNet of 2 stage\(s\) of 1, 2 units "
                                           r"\(stem_layers=\(1, 2\)\) but the model is a hybrid whose ResNet is the "
                                           r"root block alone"):
        load_weights(hybrid, other.state_dict())
    # the same from files: the official layout and a vitkit file (whose stored config says it)
    with pytest.raises(WeightsError, match="weights are a hybrid .* model is a plain ViT"):
        load_weights(plain, export_npz(hybrid, tmp_path / "hybrid.npz"))
    with pytest.raises(WeightsError, match="weights are a plain ViT .* model is a hybrid"):
        load_weights(hybrid, save_weights(plain, tmp_path / "plain.safetensors"))
    # strict=False does not let a stem through either
    with pytest.raises(WeightsError, match="model is a plain ViT"):
        load_weights(plain, hybrid.state_dict(), strict=False)


def test_timm_hybrids_with_other_cnns_are_refused():
    with torch.device("meta"):
        reference = timm.create_model("vit_small_resnet26d_224", pretrained=False)
    model = empty("R26+S/32", img_size=64, **SMALL)
    with pytest.raises(WeightsError, match=r"hybrid CNN other than the paper's BiT ResNet .*backbone\.conv1"):
        load_weights(model, reference.state_dict())


def test_hf_vit_hybrid_is_refused_by_name():
    # transformers 5 dropped ViTHybrid; its checkpoints keep the BiT backbone under the patch embedding
    state = {"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(32, 1024, 1, 1),
             "vit.embeddings.patch_embeddings.backbone.bit.embedder.convolution.weight": torch.zeros(64, 3, 7, 7)}
    with pytest.raises(WeightsError, match="ViTHybrid"):
        load_weights(empty("R50+B/16", img_size=64, **SMALL), state)


# ---- timm parity ----

# Every named hybrid's ResNet in full, at small images; the encoders of the big ones cut to fewer blocks.
# Input gradients are compared through the root block only: through the stages of a randomised ResNet they are
# chaotic (ReLU and max-pool decisions flip), timm's own moving as much as vitkit's differs from it (6% of the
# input gradient's entries beyond 1e-3) when its input is scaled by 1 + 1e-6.
# A ResNet's forward costs about the same at any small size (reading and standardising its weights), so the deep
# ones run once, at their native size; the non-square sizes (the position embedding resampled on the fly, bicubic
# and antialiased, by both) run on the root block here and on other layouts in test_any_layout_and_patch_size_...
DEFAULT_PARITY = [
    # vitkit name, timm name, encoder depth (None: the variant's), the sizes
    ("R+Ti/32", "vit_tiny_r_s16_p8_224", None, [(64, 64), (32, 96)]),
    ("R26+S/32", "vit_small_r26_s32_224", 12, [(64, 64)]),
    ("R50+B/16", "vit_base_r50_s16_224", 2, [(64, 64)]),
    ("R50+L/32", "vit_large_r50_s32_224", 1, [(64, 64)]),
]


@pytest.mark.parametrize("name,timm_name,depth,sizes", DEFAULT_PARITY, ids=[p[0] for p in DEFAULT_PARITY])
def test_timm_hybrid_weights_give_timm_outputs(name, timm_name, depth, sizes):
    kwargs = {} if depth is None else {"depth": depth}
    reference = timm_named(timm_name, img_size=sizes[0], num_classes=10, **kwargs)
    model = vitkit_from(reference, name, img_size=sizes[0], num_classes=10, **kwargs)
    assert_same_function(model, reference, sizes, n=2 if depth is None else 1, grads=not model.cfg.stem_layers)


@pytest.mark.parametrize("layers,patch,in_chans", [((1,), 2, 1), ((1, 1), 2, 3)])
def test_any_layout_and_patch_size_match_timm(layers, patch, in_chans):
    size = 16 * stem_stride(layers) * patch // 4
    reference = timm_generic(layers, size, patch, in_chans, num_classes=5, **SMALL_TIMM)
    cfg = ViTConfig(img_size=size, patch_size=patch, in_chans=in_chans, stem_layers=layers, num_classes=5, **SMALL)
    model = vitkit_from(reference, cfg=cfg)
    stride = cfg.total_stride
    for shape in [(size, size), (2 * stride, 3 * stride)]:
        x = images(2, shape, chans=in_chans)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-3, atol=1e-4)
    if len(layers) == 1:  # one stage: the input gradients are still stable (see DEFAULT_PARITY)
        assert_same_function(model, reference, [(size, size)])


@pytest.mark.parametrize("in_chans,size", [(1, (32, 32)), (3, (27, 38))])
def test_the_root_block_pooling_before_rectifying_gives_the_values_and_gradients_of_the_papers_order(in_chans, size):
    # The root block pools channels-last and rectifies after (for speed); the paper's (and timm's) order is
    # conv -> GroupNorm -> ReLU -> max-pool, in NCHW. About half the pooled windows here hold no positive value.
    torch.manual_seed(0)
    block = RootBlock(in_chans)
    x = torch.randn(4, in_chans, *size, requires_grad=True)

    def papers_order(x):
        y = torch.relu(block.norm(block.conv(x)))
        return torch.nn.functional.max_pool2d(_pad_same(y, 3, 2, value=float("-inf")), kernel_size=3, stride=2)

    expected = papers_order(x)
    got = block(x)
    assert got.shape == expected.shape == (4, 64, math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert torch.equal(got, expected)
    weights = torch.randn_like(expected)
    grads = torch.autograd.grad((got * weights).sum(), [x, *block.parameters()])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *block.parameters()])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NAMED))
def test_named_hybrids_at_their_native_size_match_timm(name):
    timm_name, size = NAMED[name]
    reference = timm_named(timm_name, num_classes=1000)
    model = vitkit_from(reference, name.split("@")[0], img_size=size)
    other = (size - 64, size + 96)  # divisible by 16 and 32
    assert_same_function(model, reference, [(size, size), other], n=1, grads=False)


# ---- the official .npz layout ----

def stem_keys(layers: tuple[int, ...]) -> set[str]:
    """The official names of a ResNet of this layout (vit_jax/models_resnet.py)."""
    keys = {"conv_root/kernel", "gn_root/scale", "gn_root/bias"}
    for i, units in enumerate(layers):
        for j in range(units):
            unit = f"block{i + 1}/unit{j + 1}/"
            keys |= {unit + f"conv{r}/kernel" for r in (1, 2, 3)}
            keys |= {unit + f"gn{r}/{p}" for r in (1, 2, 3) for p in ("scale", "bias")}
            if j == 0:
                keys |= {unit + "conv_proj/kernel", unit + "gn_proj/scale", unit + "gn_proj/bias"}
    return keys


# The root block alone (named), and two stages: a projection at stride 1 and one at stride 2, a unit without one.
@pytest.mark.parametrize("layers,patch", [((), 8), ((1, 2), 4)])
def test_export_npz_reads_back_in_timm_and_bit_exactly_in_vitkit(tmp_path, layers, patch):
    cfg = ViTConfig(img_size=64, patch_size=patch, stem_layers=layers, num_classes=5, **SMALL)
    model = random_hybrid(cfg=cfg)
    path = export_npz(model, tmp_path / "hybrid.npz")

    state, _ = read_weights(path)
    assert {k for k in state if not k.startswith(("Transformer/", "embedding/", "cls", "head/"))} == stem_keys(layers)
    assert state["conv_root/kernel"].shape == (7, 7, 3, 64)  # (k, k, in, out)
    patch = model.cfg.patch_size
    assert state["embedding/kernel"].shape == (patch, patch, stem_channels(layers), 32)  # on the feature map
    cfg = infer_config(state)  # no config in an .npz: the ResNet is found from the keys
    assert (cfg.stem_layers, cfg.patch_size, cfg.img_size, cfg.heads) == (layers, model.cfg.patch_size, (64, 64), 4)
    again = empty(cfg=cfg)
    assert load_weights(again, path).format == "official"
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())

    reference = (timm_named("vit_tiny_r_s16_p8_224", seed=1, img_size=64, num_classes=5, **SMALL_TIMM) if not layers
                 else timm_generic(layers, 64, patch, seed=1, num_classes=5, **SMALL_TIMM))
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.load_pretrained(str(path))  # timm's own loader of the official layout (_load_weights)
    assert not any(torch.equal(v, before[k]) for k, v in reference.state_dict().items())  # every tensor was set
    x = images(2, (64, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-3, atol=1e-4)


def test_augreg_prefixed_hybrid_npz_loads(tmp_path):
    source = random_hybrid("R+Ti/32", img_size=64, num_classes=5, **SMALL)
    classic, _ = read_weights(export_npz(source, tmp_path / "classic.npz"))
    arrays = {"opt/target/" + k: v.numpy() for k, v in classic.items()}
    arrays["opt/state/step"] = np.array(10)
    np.savez(tmp_path / "augreg.npz", **arrays)
    model, _ = load_pretrained(tmp_path / "augreg.npz")
    assert model.cfg.stem_layers == () and model.cfg.patch_size == 8
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


# ---- vitkit's own files and config inference ----

def test_safetensors_keep_the_stem(tmp_path):
    model = random_hybrid("R+S/16", img_size=64, num_classes=5, **SMALL)  # the root block and 4x4 patches
    path = save_weights(model, tmp_path / "hybrid.safetensors")
    again = load_model(path).eval()
    assert again.cfg == model.cfg and again.cfg.stem_layers == () and again.cfg.name == "R+S/16"
    x = images(2, (64, 64))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        bigger = load_model(path, img_size=96).eval()  # the grid 4x4 -> 6x6
        assert bigger.cfg.grid_size == (6, 6) and bigger(images(1, (96, 96))).shape == (1, 5)
    pretrained, _ = load_pretrained(path)
    assert pretrained.cfg == model.cfg


def test_config_inferred_from_timm_hybrid_state_dict():
    with torch.device("meta"):
        reference = timm.create_model("vit_large_r50_s32_224", pretrained=False, num_classes=7)
    cfg = infer_config(reference.state_dict())
    assert cfg == model_config("R50+L/32", num_classes=7)
    with torch.device("meta"):
        reference = timm.create_model("vit_tiny_r_s16_p8_384", pretrained=False, in_chans=1)
    cfg = infer_config(reference.state_dict())
    assert (cfg.stem_layers, cfg.patch_size, cfg.in_chans, cfg.img_size) == ((), 8, 1, (384, 384))


# ---- the model's public surface on a hybrid ----

@pytest.fixture(scope="module")
def small_hybrid() -> ViT:
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=1, stem_layers=(1, 1), num_classes=5, **SMALL)  # stride 8: a 4x4 grid
    return randomise_(ViT(cfg)).eval()


def test_forward_intermediates_and_attention_on_a_hybrid(small_hybrid):
    x = images(2, (32, 48))  # a 4x6 grid
    out = small_hybrid.forward_intermediates(x, blocks=[0, -1], attention=True)
    assert len(out.hidden) == 2 and len(out.attention) == 2
    assert out.attention[0].shape == (2, 4, 25, 25)
    torch.testing.assert_close(out.attention[1].sum(-1), torch.ones(2, 4, 25))
    with torch.no_grad():
        torch.testing.assert_close(out.tokens, small_hybrid.forward_features(x))


def test_patch_dropout_on_a_hybrid_keeps_the_stem_trainable():
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=1, stem_layers=(1,), num_classes=5, patch_dropout=0.5, **SMALL)
    model = randomise_(ViT(cfg)).train()  # stride 4: an 8x8 grid, 32 patches kept
    x = images(2, (32, 32))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(2))
    tokens = model.forward_features(x, patch_noise=noise)
    assert tokens.shape == (2, 1 + 32, 32)
    model.forward_head(tokens).sum().backward()
    assert model.patch_embed.backbone.stem.conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, patch_noise=noise), tokens)  # the noise decides
        assert not torch.allclose(model.forward_features(x, patch_noise=noise.flip(1)), tokens)
        assert model.eval().forward_features(x).shape == (2, 1 + 64, 32)  # every patch at evaluation


def test_grad_checkpointing_gives_the_same_gradients():
    cfg = ViTConfig(img_size=16, patch_size=1, stem_layers=(1,), num_classes=5, **SMALL)
    grads = []
    for enable in (False, True):
        model = random_hybrid(cfg=cfg).train()
        model.set_grad_checkpointing(enable)
        assert model.patch_embed.backbone.grad_checkpointing is enable
        model(images(2, (16, 16))).square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-7)


def test_official_initialisation_of_the_resnet():
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=32, patch_size=1, stem_layers=(1, 1), num_classes=5, **SMALL))
    backbone = model.patch_embed.backbone
    unit = backbone.stages[1].blocks[0]
    assert torch.count_nonzero(unit.norm3.weight) == 0  # each unit starts as its shortcut
    assert torch.equal(unit.norm1.weight, torch.ones(128)) and torch.count_nonzero(unit.norm1.bias) == 0
    conv = unit.conv2.weight  # LeCun normal: std 1 / sqrt(fan_in)
    assert abs(conv.std().item() * math.sqrt(conv[0].numel()) - 1) < 0.05
    standardised = unit.conv2.standardised_weight().flatten(1)
    torch.testing.assert_close(standardised.mean(1), torch.zeros(128), atol=1e-6, rtol=0)
    torch.testing.assert_close(standardised.var(1, correction=0), torch.ones(128), atol=1e-4, rtol=0)
    with torch.no_grad():
        assert torch.isfinite(model(images(2, (32, 32)))).all()


# ---- fine-tuning and inference ----

def test_hybrid_finetune_at_another_resolution(small_hybrid):
    model = adapt_for_finetune(small_hybrid, num_classes=3, img_size=48)
    assert model.cfg.stem_layers == (1, 1) and model.cfg.grid_size == (6, 6)
    old = small_hybrid.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("patch_embed."):
            assert torch.equal(value, old[key]), key  # the ResNet and the projection carry over
    torch.testing.assert_close(model.pos_embed, resample_pos_embed(small_hybrid.pos_embed, (6, 6), (4, 4)))
    assert torch.count_nonzero(model.head.weight) == 0 and model.head.weight.shape == (3, 32)
    model.train()
    with torch.no_grad():
        model.head.weight.normal_()  # the zero head passes no gradient back on the first step
    loss = torch.nn.functional.cross_entropy(model(images(4, (48, 48))), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert model.patch_embed.backbone.stem.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="total stride 8"):
        adapt_for_finetune(small_hybrid, num_classes=3, img_size=44)


def test_hybrid_finetune_from_grey_images_keeps_the_function():
    torch.manual_seed(0)
    grey = randomise_(ViT(ViTConfig(img_size=32, patch_size=1, stem_layers=(1,), in_chans=1, num_classes=5,
                                    **SMALL))).eval()
    colour = adapt_for_finetune(grey, num_classes=5, in_chans=3).eval()
    assert colour.patch_embed.backbone.stem.conv.weight.shape == (64, 3, 7, 7)
    x = images(2, (32, 32), chans=1)
    with torch.no_grad():  # weight standardisation undoes the 1/C, the GroupNorm after it the factor C
        torch.testing.assert_close(colour.forward_features(x.expand(-1, 3, -1, -1)), grey.forward_features(x),
                                   rtol=1e-4, atol=1e-4)


# The largest logit difference relative to the largest fp32 logit: those of tests/test_inference_modes.py, but for
# bf16, which also rounds the ResNet's weights: measured 0.005 with the root block alone and 0.022 with one stage
# here; a randomised R26's feature map alone moves by 5% when its weights are rounded to bf16 (int8 leaves the
# ResNet in fp32: 0.010 and 0.019 here).
TOLERANCE = {"fp32": 5e-6, "bf16": 0.04, "int8": 0.04 if cpu_has_vnni() else 0.07}


@pytest.mark.parametrize("precision", list(TOLERANCE))
@pytest.mark.parametrize("layers,patch", [((), 2), ((1,), 2)], ids=["root-block", "one-stage"])
def test_inference_modes_run_a_hybrid(precision, layers, patch):
    cfg = ViTConfig(img_size=32, patch_size=patch, stem_layers=layers, num_classes=10, width=64, depth=2, heads=4,
                    mlp_dim=128)
    model = random_hybrid(cfg=cfg, seed=3)
    x = images(8, (32, 32), seed=5)
    with torch.no_grad():
        reference = model(x)
    runner = InferenceModel(model, precision)
    logits = runner(x)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    error = (logits - reference).abs().max() / reference.abs().max()
    assert error <= TOLERANCE[precision], f"{precision}: relative error {error:.2e}"
    # bf16 casts the ResNet with the rest (its weights are standardised in fp32 at each call); int8 quantises the
    # linear layers only, so the ResNet and the projection of its feature map stay fp32
    conv_dtype = runner.model.patch_embed.backbone.stem.conv.weight.dtype if layers else \
        runner.model.patch_embed.backbone.conv.weight.dtype
    assert conv_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert isinstance(runner.model.patch_embed, HybridEmbed)
