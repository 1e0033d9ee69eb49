"""The kinds of position information (--model.pos_embed): known answers, resampling, saving, loading, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vitkit
import vitkit.inspect
from vitkit.model import POS_EMBEDS, adapt_for_finetune, count_parameters
from vitkit.model.pos_embed import (
    relative_index,
    resample_1d,
    resample_relative_table,
    sincos_2d_table,
)
from vitkit.model.vit import _RecomputedAttention
from vitkit.weights import WeightsError, export_npz, load_weights

WIDTH = 32


def tiny(kind: str, img_size: int = 28, pool: str = "cls", **overrides) -> vitkit.ViT:
    """A small model of `kind` whose learned position tables are far from zero, so that a wrong one shows."""
    torch.manual_seed(0)
    model = vitkit.create_model("Ti/4", img_size=img_size, in_chans=1, num_classes=5, width=WIDTH, depth=2, heads=2,
                                mlp_dim=64, pool=pool, pos_embed=kind, **overrides)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.5)
        for name, param in model.named_parameters():
            if name.startswith("pos_embed") or name.endswith("relative_position_bias_table"):
                torch.nn.init.normal_(param, std=1.0)
    return model.eval()


def permute_patches(images: torch.Tensor, order: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) images with their P x P patches moved: patch `order[i]` (row-major) goes to place i."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    patches = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, patch,
                                                                                             patch)
    moved = patches[:, order].reshape(b, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return moved.reshape(b, c, h, w)


def test_without_position_information_the_model_is_permutation_equivariant():
    model = tiny("none", pool="gap")
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(49, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = model.forward_features(images)  # (B, N, D): no class token with gap
        moved = model.forward_features(permute_patches(images, order, 4))
        torch.testing.assert_close(moved, tokens[:, order], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(permute_patches(images, order, 4)), model(images), rtol=1e-5, atol=1e-5)
    # The learned 1D embedding breaks the symmetry: the same permutation changes the logits.
    learned = tiny("learned", pool="gap")
    with torch.no_grad():
        assert (learned(permute_patches(images, order, 4)) - learned(images)).abs().max() > 1e-3


def test_learned_2d_gives_each_patch_its_row_and_column_entries():
    model = tiny("learned_2d")
    with torch.no_grad():
        table = model.pos_embed_for((7, 7))[0]  # (T, D)
    rows, cols = model.pos_embed_row[0], model.pos_embed_col[0]  # (7, D/2) each
    assert torch.equal(table[0], torch.zeros(WIDTH))  # the class token gets none
    for r in range(7):
        for c in range(7):
            assert torch.equal(table[1 + 7 * r + c], torch.cat([rows[r], cols[c]]))


def test_sincos_2d_equals_an_independently_computed_table():
    gh, gw, d = 3, 5, 16
    expected = np.zeros((gh * gw, d))
    k = d // 4
    for r in range(gh):
        for c in range(gw):
            for i in range(k):
                w = 1.0 / 10000 ** (i / k)
                expected[r * gw + c, [i, k + i, 2 * k + i, 3 * k + i]] = [math.sin(r * w), math.cos(r * w),
                                                                          math.sin(c * w), math.cos(c * w)]
    np.testing.assert_allclose(sincos_2d_table((gh, gw), d)[0].numpy(), expected, atol=1e-6)
    model = tiny("sincos_2d")
    with torch.no_grad():
        torch.testing.assert_close(model.pos_embed_for((4, 6))[0, 1:], sincos_2d_table((4, 6), WIDTH)[0])
    assert not any("pos_embed" in name for name, _ in model.named_parameters())  # fixed, nothing to learn


def test_relative_with_zero_bias_is_none_plus_the_class_token():
    relative, plain = tiny("relative"), tiny("none")
    state = {k: v for k, v in relative.state_dict().items() if not k.endswith("relative_position_bias_table")}
    plain.load_state_dict(state)
    with torch.no_grad():
        for block in relative.blocks:
            block.attn.relative_position_bias_table.zero_()
        images = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(relative(images), plain(images), rtol=1e-5, atol=1e-6)


def test_relative_bias_follows_the_offset_between_patches():
    model = tiny("relative")
    attn = model.blocks[0].attn
    table = attn.relative_position_bias_table  # ((2*7 - 1)^2, h)
    with torch.no_grad():
        bias = attn.position_bias((7, 7), None, prefix=1)[0]  # (h, T, T)
    assert bias.shape == (2, 50, 50) and bias[:, 0].abs().sum() == 0 and bias[:, :, 0].abs().sum() == 0
    for i, j in [(0, 0), (0, 48), (48, 0), (10, 24), (3, 45)]:
        dr, dc = i // 7 - j // 7, i % 7 - j % 7
        assert torch.equal(bias[:, 1 + i, 1 + j], table[(dr + 6) * 13 + (dc + 6)])
    # Same offset, same bias, anywhere on the grid.
    assert torch.equal(bias[:, 1 + 8, 1 + 0], bias[:, 1 + 48, 1 + 40])
    # Under PatchDropout the kept patches' rows and columns of the full bias.
    kept = torch.tensor([[5, 0, 33], [48, 7, 7]])
    with torch.no_grad():
        dropped = attn.position_bias((7, 7), kept, prefix=1)  # (B, h, 4, 4)
    for b in range(2):
        index = torch.cat([torch.tensor([0]), 1 + kept[b]])
        assert torch.equal(dropped[b], bias[:, index][:, :, index])


def test_recomputed_attention_with_a_bias_has_autograds_gradients():
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 5, 3, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(3))
    for batch in (1, 2):
        bias = torch.randn(batch, 2, 5, 5, dtype=torch.float64, generator=generator, requires_grad=True)
        assert torch.autograd.gradcheck(lambda q, k, v, b: _RecomputedAttention.apply(q, k, v, 0.5, b), (q, k, v, bias))


@pytest.mark.parametrize("kind", ["learned_2d", "relative"])
def test_resampling_to_a_larger_grid_and_back_is_the_identity(kind):
    # 7 -> 13 = 2 * (7 - 1) + 1 positions: with the end points fixed every old position is a new one, so
    # sampling back returns the table. (The 1D `learned` kind resamples like timm, antialiased and without fixed
    # end points, for exact interop: it is not invertible and is left out here.)
    model = tiny(kind)
    if kind == "learned_2d":
        row = model.pos_embed_row.detach()
        there = resample_1d(row, 13)
        torch.testing.assert_close(resample_1d(there, 7), row, rtol=0, atol=1e-5)
        assert there.shape == (1, 13, WIDTH // 2)
    else:
        table = model.blocks[0].attn.relative_position_bias_table.detach()
        there = resample_relative_table(table, (13, 13), (7, 7))
        assert there.shape == (25 * 25, 2)
        torch.testing.assert_close(resample_relative_table(there, (7, 7), (13, 13)), table, rtol=0, atol=1e-5)
        # The zero offset stays at the centre of the offset plane.
        torch.testing.assert_close(there[12 * 25 + 12], table[6 * 13 + 6])


def test_relative_index_counts_offsets_from_the_key_to_the_query():
    index = relative_index((2, 3))  # offsets dr in [-1, 1], dc in [-2, 2]: a 3 x 5 table
    assert index.shape == (6, 6) and int(index.max()) == 14 and int(index.min()) == 0
    assert int(index[0, 0]) == 1 * 5 + 2 and int(index[5, 0]) == 2 * 5 + 4 and int(index[0, 5]) == 0


@pytest.mark.parametrize("kind", POS_EMBEDS)
def test_every_kind_runs_at_another_size_trains_and_counts_its_parameters(kind):
    # gap pooling: with a class token, the last block's relative bias only changes patch tokens nobody reads
    model = tiny(kind, pool="gap", patch_dropout=0.5)
    assert count_parameters(model.cfg) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(2, 1, 36, 40)).shape == (2, 5)  # another grid: 9 x 10
    model.train()
    model(torch.randn(4, 1, 28, 28)).sum().backward()  # PatchDropout keeps half the patches
    position = [p for n, p in model.named_parameters()
                if n.startswith("pos_embed") or n.endswith("relative_position_bias_table")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in position)


@pytest.mark.parametrize("kind", POS_EMBEDS)
def test_every_kind_round_trips_through_safetensors_and_fine_tuning(kind, tmp_path):
    model = tiny(kind)
    path = tmp_path / "w.safetensors"
    vitkit.save_weights(model, path)
    loaded, _ = vitkit.load_pretrained(str(path))
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    assert loaded.cfg.pos_embed == kind
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model(images))
    tuned = adapt_for_finetune(model, num_classes=3, img_size=36).eval()  # 7 x 7 -> 9 x 9 patches
    assert tuned.cfg.grid_size == (9, 9) and tuned.cfg.pos_embed == kind
    with torch.no_grad():  # the position information the model adds at 9 x 9 is the one it added there before
        expected, got = model.pos_embed_for((9, 9)), tuned.pos_embed_for((9, 9))
        if expected is not None:
            torch.testing.assert_close(got, expected)
        if kind == "relative":
            torch.testing.assert_close(tuned.blocks[1].attn.position_bias((9, 9), None, 1),
                                       model.blocks[1].attn.position_bias((9, 9), None, 1))


def test_bad_kinds_and_widths_are_refused():
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        tiny("rotary")
    with pytest.raises(ValueError, match="width 30 is not divisible by 4"):
        vitkit.create_model("Ti/4", img_size=28, in_chans=1, width=30, heads=2, pos_embed="sincos_2d")
    with pytest.raises(ValueError, match="width 33 is odd"):
        vitkit.create_model("Ti/4", img_size=28, in_chans=1, width=33, heads=3, pos_embed="learned_2d")


def test_weights_of_one_kind_do_not_load_into_a_model_of_another(tmp_path):
    path = tmp_path / "learned.safetensors"
    vitkit.save_weights(tiny("learned"), path)
    with pytest.raises(WeightsError, match="the weights use the position embedding 'learned' but the model uses "
                                           "'relative'"):
        load_weights(tiny("relative"), str(path))
    # Foreign weights (timm's layout, no config) tell their kind by their keys.
    timm_style = tmp_path / "timm.pt"
    torch.save(tiny("learned").state_dict(), timm_style)
    with pytest.raises(WeightsError, match="pos_embed='learned'"):
        load_weights(tiny("sincos_2d"), str(timm_style))


def test_the_official_layout_holds_only_the_learned_kind(tmp_path):
    with pytest.raises(ValueError, match="learned 1D position embedding only; this model's is 'learned_2d'"):
        export_npz(tiny("learned_2d"), tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("kind", ["none", "learned_2d", "sincos_2d", "relative"])
def test_every_kind_exports_to_onnx_with_a_dynamic_size(kind, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from vitkit.export import ExportOptions, export_weights

    weights = tmp_path / "w.safetensors"
    vitkit.save_weights(tiny(kind), weights, metadata={"vitkit_preprocess": json.dumps({"mean": [0.5]})})
    export_weights(ExportOptions(weights=str(weights), out=str(tmp_path / "m.onnx"), dynamic=True, check_sizes=[36]))
    printed = capsys.readouterr().out
    assert float(printed.split("max relative logit error ")[1].split()[0].rstrip(",;)")) < 1e-4


@pytest.mark.parametrize("near, far, expected", [(0.6, 0.0, 1.0), (0.0, 0.6, -1.0)])
def test_grid_correlation_of_a_known_embedding(near, far, expected):
    # Three patches in a row: two pairs of neighbours (distance 1) and one pair two apart. Embeddings whose
    # neighbours are more alike than the far pair correlate exactly with closeness; the reverse, exactly against.
    model = vitkit.create_model("Ti/4", img_size=(4, 12), in_chans=1, num_classes=2, width=3, heads=1, depth=1,
                                mlp_dim=4)
    gram = torch.tensor([[1.0, near, far], [near, 1.0, near], [far, near, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        model.pos_embed[0, 1:] = torch.linalg.cholesky(gram).float()  # rows: unit vectors with these cosines
    similarity = vitkit.inspect.pos_embed_similarity(model).reshape(3, 3)
    np.testing.assert_allclose(similarity, gram.numpy(), atol=1e-6)
    assert vitkit.inspect.pos_embed_grid_correlation(model) == pytest.approx(expected, abs=1e-9)


def test_grid_correlation_tells_a_structured_embedding_from_a_random_one():
    torch.manual_seed(0)
    random = vitkit.create_model("Ti/4", img_size=28, in_chans=1, num_classes=2, width=256, heads=2, depth=1,
                                 mlp_dim=4)
    assert abs(vitkit.inspect.pos_embed_grid_correlation(random)) < 0.1
    assert vitkit.inspect.pos_embed_grid_correlation(tiny("sincos_2d")) > 0.5  # 0.68 at width 32
    with pytest.raises(ValueError, match="adds no position embedding"):
        vitkit.inspect.pos_embed_grid_correlation(tiny("relative"))


@pytest.mark.parametrize("kind", ["learned_2d", "sincos_2d", "relative"])
def test_every_kind_runs_in_the_inference_modes(kind):
    from vitkit.inference_modes import InferenceModel

    model = tiny(kind)
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(images)
    scale = float(expected.abs().max())
    for precision, tolerance in (("fp32", 1e-5), ("bf16", 0.05), ("bf16-mixed", 0.05), ("int8", 0.1)):
        got = InferenceModel(model, precision)(images)
        assert float((got - expected).abs().max()) < tolerance * scale, precision


def test_inspection_leaves_out_the_position_figure_of_a_model_without_one(tmp_path):
    from vitkit.inspect import ANALYSES, write_inspection

    model = tiny("relative")
    images = torch.randn(2, 1, 28, 28)
    written = write_inspection(model, images, tmp_path / "all", ANALYSES)
    assert sorted(written) == sorted(["filters", "attention_distance", "rollout", "arrays"])
    with pytest.raises(ValueError, match="pos_embed='relative'"):
        write_inspection(model, images, tmp_path / "some", ["filters", "pos_embed"])
    assert not (tmp_path / "some").exists()
    assert "pos_embed" in write_inspection(tiny("learned_2d"), images, tmp_path / "2d", ANALYSES)
