"""Weights from timm, HF transformers and the official .npz layout give the same function in vitkit.

Every reference model is built with random weights (no downloads), its parameters re-randomised so no
head or bias is zero, and its outputs compared with vitkit's after conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from randomised import randomise_
from vitkit.model import ViT, ViTConfig, create_model
from vitkit.weights import export_npz, infer_config, load_weights, read_weights, to_vitkit

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models.vision_transformer import VisionTransformer

TIMM_NAMES = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224", "B/32": "vit_base_patch32_224"}
TINY = dict(img_size=32, num_classes=5, width=32, depth=2, heads=4, mlp_dim=64)


def images(n: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def outputs_and_input_grad(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # every logit reaches the gradient differently
    (out * weights).sum().backward()
    return out.detach(), x.grad


def tiny_timm(seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                              num_classes=5, **kwargs)
    return randomise_(model, seed).eval()


# ---- timm ----

@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_timm_weights_give_timm_outputs_and_gradients(name):
    torch.manual_seed(0)
    reference = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=10, dynamic_img_size=True)
    randomise_(reference, seed=0).eval()
    model = create_model(name, num_classes=10).eval()
    report = load_weights(model, reference.state_dict())
    assert report.format == "vitkit" and report.pos_embed_resampled is None
    reference.requires_grad_(False)  # input gradients only: skips the weight-gradient matmuls
    model.requires_grad_(False)

    for size in [(224, 224), (160, 256)]:  # the second is resampled on the fly by both, bicubic + antialias
        x = images(2, size)
        ref_out, ref_grad = outputs_and_input_grad(reference, x)
        out, grad = outputs_and_input_grad(model, x)
        assert ref_out.std() > 0.3, "logits too small for the comparison to mean anything"
        torch.testing.assert_close(out, ref_out, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kwargs,cfg", [
    ({"qkv_bias": False}, {}),  # no qkv bias: zero biases are the same function
    ({"class_token": False, "global_pool": "avg", "fc_norm": False}, {"pool": "gap"}),
    ({"no_embed_class": True}, {}),  # class token without a position-embedding row
])
def test_timm_variants_convert_exactly(kwargs, cfg):
    reference = tiny_timm(**kwargs)
    state = reference.state_dict()
    model = create_model("Ti/8", **{**TINY, **cfg}).eval()
    before = model(images(2, (32, 32)))
    load_weights(model, state)
    x = images(2, (32, 32))
    ref = reference(x)
    assert not torch.allclose(before, ref, atol=1e-2)
    torch.testing.assert_close(model(x), ref, rtol=1e-3, atol=1e-4)


# ---- HF transformers ----

def tiny_hf_config(**kwargs):
    return transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=5, layer_norm_eps=1e-6, hidden_act="gelu", **kwargs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("saved", [False, True], ids=["module-names", "saved-file"])
def test_hf_classifier_gives_hf_logits(tmp_path, attn, saved):
    torch.manual_seed(0)
    reference = randomise_(transformers.ViTForImageClassification(tiny_hf_config(attn_implementation=attn))).eval()
    if saved:
        # save_pretrained writes the checkpoint layout of the Hub (encoder.layer.{i}.attention.attention.query, ...)
        reference.save_pretrained(tmp_path)
        source = tmp_path / "model.safetensors"
        state, _ = read_weights(source)
        assert "vit.encoder.layer.1.attention.attention.query.weight" in state
    else:
        source = state = reference.state_dict()  # transformers 5 module names (layers.{i}.attention.q_proj, ...)
    cfg = infer_config(state, "hf", heads=4)
    assert cfg == ViTConfig(img_size=32, patch_size=8, num_classes=5, width=64, depth=2, heads=4, mlp_dim=128)
    model = ViT(cfg).eval()
    assert load_weights(model, source).format == "hf"

    x = images(2, (32, 32))
    with torch.no_grad():
        ref = reference(pixel_values=x).logits
    assert ref.std() > 0.3
    torch.testing.assert_close(model(x), ref, rtol=1e-3, atol=1e-3)


def test_hf_pooler_is_the_pre_logits_layer():
    torch.manual_seed(0)
    reference = randomise_(transformers.ViTModel(tiny_hf_config(), add_pooling_layer=True)).eval()
    model = ViT(infer_config(reference.state_dict(), heads=4)).eval()
    assert model.cfg.representation_size == 64 and model.cfg.num_classes == 0
    load_weights(model, reference.state_dict())
    x = images(2, (32, 32))
    with torch.no_grad():
        ref = reference(pixel_values=x)
    torch.testing.assert_close(model(x), ref.pooler_output, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(model.forward_features(x), ref.last_hidden_state, rtol=1e-3, atol=1e-3)


# ---- official .npz ----

def tiny_vitkit(**overrides) -> ViT:
    torch.manual_seed(0)
    return randomise_(create_model("Ti/8", **{**TINY, **overrides})).eval()


@pytest.mark.parametrize("overrides,timm_kwargs", [
    ({}, {}),
    ({"pool": "gap"}, {"class_token": False, "global_pool": "avg", "fc_norm": False}),
    # timm dropped the pre-logits layer (its npz loader skips 'pre_logits'), so it cannot run this model:
    # only vitkit's own round trip is checked.
    ({"representation_size": 24}, None),
])
def test_export_npz_reads_back_in_timm_and_bit_exactly_in_vitkit(tmp_path, overrides, timm_kwargs):
    model = tiny_vitkit(**overrides)
    path = export_npz(model, tmp_path / "vit.npz")
    x = images(2, (32, 32))

    state, metadata = read_weights(path)
    assert metadata == {} and "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in state
    assert state["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape == (32, 4, 8)
    converted = to_vitkit(state).state_dict
    assert sorted(converted) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        assert converted[key].dtype == value.dtype and torch.equal(converted[key], value), key
    again = create_model("Ti/8", **{**TINY, **overrides}).eval()
    load_weights(again, path)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)

    if timm_kwargs is None:
        return
    reference = tiny_timm(seed=1, **timm_kwargs)
    before = reference(x)
    reference.load_pretrained(str(path))  # timm's own loader of the official layout
    with torch.no_grad():
        ref = reference(x)
    assert not torch.allclose(before, ref, atol=1e-2)
    torch.testing.assert_close(model(x), ref, rtol=1e-3, atol=1e-4)


def rename_to_big_vision(state: dict[str, torch.Tensor], stacked: bool) -> dict[str, np.ndarray]:
    """The classic layout renamed to big_vision's: params/ prefix, _0/_1 indices, a top-level pos_embedding
    without the class-token row, optionally the blocks stacked on a leading axis."""
    out = {}
    for key, value in state.items():
        value = value.numpy()
        if key == "Transformer/posembed_input/pos_embedding":
            key, value = "pos_embedding", value[:, 1:] if "cls" in state else value
        for old, new in (("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
                         ("LayerNorm_2", "LayerNorm_1"), ("MlpBlock_3", "MlpBlock_0")):
            key = key.replace(old, new)
        out["params/" + key] = value
    if stacked:
        blocks = sorted({k.split("/")[2] for k in out if k.startswith("params/Transformer/encoderblock_")})
        for leaf in [k.split("/", 3)[3] for k in out if k.startswith("params/Transformer/encoderblock_0/")]:
            out[f"params/Transformer/encoderblock/{leaf}"] = np.stack(
                [out.pop(f"params/Transformer/{b}/{leaf}") for b in blocks])
    return out


@pytest.mark.parametrize("pool,stacked", [("cls", False), ("gap", True), ("cls", True)])
def test_big_vision_layouts_load_as_timm_loads_them(tmp_path, pool, stacked):
    source = tiny_vitkit(pool=pool)
    if pool == "cls":
        with torch.no_grad():
            source.pos_embed[:, 0] = 0  # big_vision has no position embedding for the class token
    classic, _ = read_weights(export_npz(source, tmp_path / "classic.npz"))
    path = tmp_path / "big_vision.npz"
    np.savez(path, **rename_to_big_vision(classic, stacked))

    # big_vision adds the position embedding before prepending the class token: timm's no_embed_class.
    kwargs = {"no_embed_class": True} if pool == "cls" else {"class_token": False, "global_pool": "avg",
                                                              "fc_norm": False}
    reference = tiny_timm(seed=1, **kwargs)
    reference.load_pretrained(str(path))
    model = create_model("Ti/8", **{**TINY, "pool": pool}).eval()
    assert load_weights(model, path).format == "official"
    x = images(2, (32, 32))
    with torch.no_grad():
        ref = reference(x)
    torch.testing.assert_close(model(x), ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)


def test_augreg_prefix_and_optimizer_state_are_handled(tmp_path):
    source = tiny_vitkit()
    classic, _ = read_weights(export_npz(source, tmp_path / "classic.npz"))
    arrays = {"opt/target/" + k: v.numpy() for k, v in classic.items()}
    arrays["opt/state/step"] = np.array(1000)  # optimizer state outside the parameters: ignored
    path = tmp_path / "augreg.npz"
    np.savez(path, **arrays)
    reference = tiny_timm(seed=1)
    reference.load_pretrained(str(path))
    model = create_model("Ti/8", **TINY).eval()
    load_weights(model, path)
    x = images(2, (32, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-3, atol=1e-4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
