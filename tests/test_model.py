"""The model: sizes, shapes of the public surface, resampling, initialisation and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.model import ViT, ViTConfig, count_parameters, create_model, model_config, resample_pos_embed

timm_pos_embed = pytest.importorskip("timm.layers.pos_embed")

TINY = dict(width=32, depth=2, heads=4, mlp_dim=64)

# Paper table 1 (Ti from DeiT), counted at 224 px with a 1000-class head.
PAPER_PARAMS = {"Ti/16": 5.7e6, "S/16": 22e6, "B/16": 86e6, "L/16": 304e6, "H/14": 632e6}


@pytest.mark.parametrize("name,expected", PAPER_PARAMS.items())
def test_variant_parameter_count_matches_paper(name, expected):
    count = count_parameters(model_config(name))
    assert abs(count - expected) / expected < 0.01, (name, count)


@pytest.mark.parametrize("name", ["Ti/16", "S/16", "S/32", "B/16", "B/32", "B/8", "L/16", "L/32", "H/14"])
def test_every_variant_builds_on_meta_with_counted_parameters(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.cfg)


def test_variant_names_decode():
    cfg = model_config("ViT-B/32", num_classes=10, img_size=(64, 96))
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.patch_size) == (768, 12, 12, 3072, 32)
    assert cfg.grid_size == (2, 3)
    assert model_config("s/7").patch_size == 7


@pytest.mark.parametrize("bad", ["X/16", "B16", "B/", "", "B/16/2"])
def test_unknown_variant_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown model name"):
        model_config(bad)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="colour"):
        create_model("Ti/16", colour=3)


def test_config_size_not_divisible_names_both_numbers():
    with pytest.raises(ValueError, match=r"30x30.*patch size 16"):
        model_config("Ti/16", img_size=30)


def tiny_model(**overrides) -> ViT:
    torch.manual_seed(0)
    cfg = dict(img_size=32, num_classes=5, **TINY)
    cfg.update(overrides)
    return create_model("Ti/8", **cfg).eval()


def test_official_initialisation():
    model = create_model("S/16", num_classes=10)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    fc1 = model.blocks[0].mlp.fc1
    bound = (6 / (fc1.in_features + fc1.out_features)) ** 0.5
    assert fc1.weight.abs().max() <= bound and fc1.weight.abs().max() > 0.9 * bound
    assert fc1.bias.abs().max() < 1e-5
    qkv = model.blocks[0].attn.qkv.weight  # three 384x384 xavier matrices, not one 1152x384
    assert qkv.abs().max() <= (6 / (384 + 384)) ** 0.5


def test_non_square_input_uses_resampled_position_embedding():
    model = tiny_model()
    x = torch.randn(2, 3, 24, 40)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 3 * 5, 32)
    # The same computation by hand: resample once, then run the encoder on it.
    pos = resample_pos_embed(model.pos_embed, (3, 5), (4, 4), 1, "bicubic")
    patches, grid = model.embed_patches(x)
    h = torch.cat([model.cls_token.expand(2, -1, -1), patches], 1) + pos
    for block in model.blocks:
        h, _ = block(h)
    torch.testing.assert_close(model.norm(h), tokens)


def test_bad_inputs_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"3-channel images but got 1 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"30x32 is not divisible by the patch size 8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("old,new", [((4, 4), (6, 6)), ((4, 4), (3, 5)), ((7, 7), (4, 4)), ((2, 3), (5, 4))])
def test_resample_matches_timm(mode, old, new):
    torch.manual_seed(1)
    pos = torch.randn(1, 1 + old[0] * old[1], 16)
    ours = resample_pos_embed(pos, new, old, num_prefix_tokens=1, mode=mode)
    theirs = timm_pos_embed.resample_abs_pos_embed(pos, list(new), list(old), num_prefix_tokens=1,
                                                   interpolation=mode, antialias=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert torch.equal(ours[:, :1], pos[:, :1])  # the class token's embedding is kept apart


def test_resample_same_grid_is_bit_exact():
    pos = torch.randn(1, 17, 8)
    assert torch.equal(resample_pos_embed(pos, (4, 4), (4, 4)), pos)


def test_resample_rejects_wrong_token_count():
    with pytest.raises(ValueError, match=r"does not fit a 4x4 grid"):
        resample_pos_embed(torch.randn(1, 10, 8), (5, 5), (4, 4))


def test_intermediates_and_attention():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_intermediates(x, attention=True)
    torch.testing.assert_close(out.tokens, model.forward_features(x), rtol=1e-5, atol=1e-5)
    assert len(out.hidden) == 2 and len(out.attention) == 2
    torch.testing.assert_close(model.norm(out.hidden[-1]), out.tokens)
    for attn in out.attention:
        assert attn.shape == (2, 4, 17, 17)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 17))
    only_last = model.forward_intermediates(x, blocks=[-1])
    assert len(only_last.hidden) == 1 and only_last.attention == []
    torch.testing.assert_close(only_last.hidden[0], out.hidden[1])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, blocks=[2])


def test_fused_attention_kernel_used_unless_weights_are_requested(monkeypatch):
    model = tiny_model()
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        assert len(calls) == 2
        calls.clear()
        model.forward_intermediates(x, attention=True)
        assert len(calls) == 0
    model(x)  # a backward may follow: on a CPU the small probabilities go through explicit matmuls
    assert len(calls) == 0


def test_bf16_on_cpu_takes_the_explicit_attention_path_with_the_same_result(monkeypatch):
    # bf16 training on a CPU avoids the fused kernel (its backward is slow there); the explicit path must compute
    # the same function.
    torch.manual_seed(0)
    model = tiny_model(drop_path=0.0).train()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a zero head would pass no gradient back to compare
    x = torch.randn(4, 3, 32, 32)
    model(x).square().sum().backward()
    fp32_logits = model(x).detach()
    fp32_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert calls == []
    logits.float().square().sum().backward()
    torch.testing.assert_close(logits.float(), fp32_logits, atol=0.05, rtol=0.05)
    for p, g32 in zip(model.parameters(), fp32_grads):
        cos = F.cosine_similarity(p.grad.flatten(), g32.flatten(), dim=0)
        assert cos > 0.99, cos
    bf16_model = tiny_model(drop_path=0.0).to(torch.bfloat16).eval()
    explicit = bf16_model(x.bfloat16())  # parameters that want gradients: a backward may follow
    assert calls == []
    # Without a backward (inference) the fused forward runs, the faster there, and computes the same function.
    with torch.inference_mode():
        fused = bf16_model(x.bfloat16())
    assert len(calls) == 2
    torch.testing.assert_close(fused.float(), explicit.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_recomputed_attention_gives_the_explicit_matmuls_outputs_and_gradients(dtype):
    # The bf16 CPU path keeps only q, k, v for backward and recomputes the probabilities there; it must give
    # what autograd through softmax(scale * q k^T) v gives: bit for bit in bf16 (same kernels); in float64 a
    # transposed operand may take another BLAS path and round the last bit differently.
    from vitkit.model.vit import _RecomputedAttention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 50, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(3, 4, 50, 32, dtype=dtype)
    scale = 32**-0.5
    out = _RecomputedAttention.apply(q, k, v, scale)
    got = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]
    ref = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    want = [ref.detach(), *torch.autograd.grad(ref, (q, k, v), grad_out)]
    tolerance = 0 if dtype == torch.bfloat16 else 1e-12
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    small = [torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda a, b, c: _RecomputedAttention.apply(a, b, c, 0.3), small)


def test_bf16_cpu_attention_keeps_small_probabilities_and_recomputes_large_ones(monkeypatch):
    # Both paths are the same arithmetic: the outputs and gradients of a bf16 layer agree to the bit whether
    # autograd keeps the probabilities (small) or backward recomputes them (over KEPT_PROBABILITIES_MAX).
    from vitkit.model import vit

    torch.manual_seed(0)
    layer = vit.Attention(64, 4).to(torch.bfloat16)
    x = torch.randn(3, 20, 64, dtype=torch.bfloat16)
    recomputed = []
    apply = vit._RecomputedAttention.apply
    monkeypatch.setattr(vit._RecomputedAttention, "apply", lambda *a: recomputed.append(1) or apply(*a))

    def run():
        inputs = x.clone().requires_grad_()
        out = layer(inputs)[0]
        out.backward(torch.ones_like(out))
        return [out.detach(), inputs.grad, *(p.grad.clone() for p in layer.parameters())]

    kept = run()
    assert recomputed == []  # 3 x 4 x 20 x 20 values are far under the limit
    layer.zero_grad()
    monkeypatch.setattr(vit, "KEPT_PROBABILITIES_MAX", 3 * 4 * 20 * 20 - 1)
    again = run()
    assert recomputed == [1]
    for a, b in zip(kept, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fp32_cpu_training_takes_the_explicit_matmuls_where_the_probabilities_are_small(monkeypatch):
    # PyTorch's flash-attention backward on a CPU was slower than autograd through three matmuls in fp32 too. Both
    # compute softmax(q k^T / sqrt(d)) v: the outputs and gradients agree to float rounding.
    from vitkit.model import vit

    torch.manual_seed(0)
    layer = vit.Attention(64, 4)
    x = torch.randn(3, 20, 64)
    fused_calls = []
    sdpa = vit.F.scaled_dot_product_attention
    monkeypatch.setattr(vit.F, "scaled_dot_product_attention", lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k))

    def run():
        inputs = x.clone().requires_grad_()
        out = layer(inputs)[0]
        out.backward(torch.ones_like(out))
        grads = [out.detach(), inputs.grad, *(p.grad.clone() for p in layer.parameters())]
        layer.zero_grad()
        return grads

    explicit = run()
    assert fused_calls == []  # 3 x 4 x 20 x 20 values are far under the limit
    monkeypatch.setattr(vit, "KEPT_PROBABILITIES_MAX", 3 * 4 * 20 * 20 - 1)
    fused = run()
    assert fused_calls == [1]  # fp32 keeps the fused kernel for large probabilities (no recomputation)
    for a, b in zip(explicit, fused):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no backward follows: the fused kernel
        layer(x)
    assert fused_calls == [1, 1]


def test_every_parameter_gets_a_gradient_and_checkpointing_changes_nothing():
    model = tiny_model(drop_path=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # The head starts at zero, so only it gets a gradient on the first step; give it weights first.
    assert all(torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():
        model.head.weight.normal_()
    model.zero_grad()
    model(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in plain.values()), [n for n, g in plain.items() if g.abs().sum() == 0]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], msg=name)


def test_gap_pool_has_no_class_token_and_averages_patches():
    model = tiny_model(pool="gap")
    assert model.cls_token is None and model.pos_embed.shape == (1, 16, 32)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens.mean(1))


def test_pre_logits_layer_and_no_head():
    model = tiny_model(representation_size=24, num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    features = model(x)
    assert features.shape == (2, 24) and features.abs().max() <= 1.0  # tanh
    assert model.num_features == 24


def test_reset_classifier_is_zero_initialised():
    model = tiny_model()
    model.reset_classifier(7)
    assert model.head.out_features == 7 and model.cfg.num_classes == 7
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), torch.zeros(2, 7))


def test_config_round_trips_through_dict():
    cfg = model_config("B/16", img_size=(224, 160), num_classes=3, pool="gap")
    again = ViTConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.img_size == (224, 160)
    with pytest.raises(ValueError, match="unknown ViT config keys"):
        ViTConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_top_level_api():
    assert vitkit.create_model is create_model


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_patch_dropout_keeps_prefix_and_a_random_subset_of_patch_tokens_in_training_only(pool):
    torch.manual_seed(0)
    model = create_model("Ti/4", img_size=16, in_chans=1, num_classes=3, depth=1, pool=pool, patch_dropout=0.25)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    images = torch.randn(5, 1, 16, 16)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        patches, grid = model.embed_patches(images)
        full = model._tokens(patches, grid)  # (5, P + 16, D): every token with its position embedding
        model.train()
        model(images)
    prefix = 1 if pool == "cls" else 0
    kept = seen[-1]
    assert kept.shape == (5, prefix + 12, model.cfg.width)  # int(16 * 0.75) patch tokens
    torch.testing.assert_close(kept[:, :prefix], full[:, :prefix], rtol=0, atol=0)
    for image in range(5):
        matches = (kept[image, prefix:, None] == full[image, None, prefix:]).all(-1)  # (12, 16)
        assert (matches.sum(1) == 1).all() and (matches.sum(0) <= 1).all()  # distinct rows of this image
    assert len({tuple(m.nonzero()[:, 1].tolist()) for m in [
        (kept[i, prefix:, None] == full[i, None, prefix:]).all(-1) for i in range(5)]}) > 1  # chosen per image
    model.eval()
    with torch.no_grad():
        with_dropout = model(images)
        model.cfg.patch_dropout = 0.0
        assert torch.equal(with_dropout, model(images))  # evaluation sees every token
    assert seen[-1].shape[1] == prefix + 16


def test_patch_dropout_keeps_the_patches_of_lowest_given_noise():
    torch.manual_seed(0)
    model = create_model("Ti/4", img_size=16, in_chans=1, num_classes=3, depth=1, patch_dropout=0.25).train()
    images = torch.randn(3, 1, 16, 16)
    noise = torch.stack([torch.randperm(16).float() for _ in range(3)])  # (3, 16): distinct scores per image
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        patches, grid = model.embed_patches(images)
        full = model._tokens(patches, grid)  # (3, 1 + 16, D)
        first = model(images, patch_noise=noise)
        torch.manual_seed(123)  # the global RNG plays no part once the noise is given
        second = model(images, patch_noise=noise)
    lowest = noise.argsort(dim=1)[:, :12]  # int(16 * 0.75) patches, lowest score first
    expected = torch.cat([full[:, :1], full[:, 1:].gather(1, lowest[..., None].expand(-1, -1, full.shape[-1]))], 1)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match=r"patch_noise must hold one score per patch token, shape \(3, 16\)"):
        model(images, patch_noise=noise[:, :8])


def test_a_per_call_patch_dropout_rate_replaces_the_configs_while_training():
    torch.manual_seed(0)
    model = create_model("Ti/4", img_size=16, in_chans=1, num_classes=3, depth=1, patch_dropout=0.25).train()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    images = torch.randn(3, 1, 16, 16)
    noise = torch.stack([torch.randperm(16).float() for _ in range(3)])  # (3, 16)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        own = model(images, patch_noise=noise)
        same = model(images, patch_noise=noise, patch_dropout=0.25)
        half = model(images, patch_noise=noise, patch_dropout=0.5)
        none = model(images, patch_noise=noise, patch_dropout=0.0)
        model.eval()
        evaluated = model(images, patch_dropout=0.5)  # evaluation sees every token whatever the rate
    assert seen == [1 + 12, 1 + 12, 1 + 8, 1 + 16, 1 + 16]
    assert torch.equal(own, same) and not torch.allclose(own, half)
    assert torch.equal(none, evaluated)  # rate 0 while training is the whole-image forward


def test_patch_dropout_rate_is_checked():
    with pytest.raises(ValueError, match="patch_dropout must be in"):
        ViTConfig(img_size=16, patch_size=4, patch_dropout=1.0)
