"""The inspection analyses of section 4.5 (vitkit.inspect): known answers computed here, figures, bad input.

Known answers are computed independently in the tests (numpy, itertools), never by the code under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.inspect import (
    ANALYSES,
    SOURCE_CLASS_TOKEN,
    SOURCE_PATCH_MEAN,
    attention_distance_from_maps,
    attention_rollout,
    embedding_filters,
    last_layer_attention,
    mean_attention_distance,
    plot_attention_distance,
    plot_embedding_filters,
    plot_pos_embed_similarity,
    plot_prediction_explained,
    plot_rollout,
    pos_embed_similarity,
    rollout_from_maps,
    upsample_map,
    write_inspection,
)
from vitkit.inspect import figures, report

GRID = (7, 7)  # 28 px images, patch 4
PATCH = 4
TOKENS = 1 + GRID[0] * GRID[1]


def tiny(pool: str = "cls", **overrides) -> vitkit.ViT:
    torch.manual_seed(0)
    cfg = dict(img_size=28, in_chans=1, num_classes=10, width=64, depth=2, heads=2, mlp_dim=128, pool=pool)
    cfg.update(overrides)
    return vitkit.create_model("Ti/4", **cfg)


def shapes_batch(b: int = 3) -> torch.Tensor:
    """(b, 1, 28, 28) images of bright bars and squares on black, normalised to mean 0, std 1 per image."""
    gen = torch.Generator().manual_seed(1)
    x = torch.zeros(b, 1, 28, 28)
    for i in range(b):
        r, c = torch.randint(0, 18, (2,), generator=gen).tolist()
        x[i, 0, r:r + 10, c:c + 4 + 2 * i] = 1.0
    return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)


def mean_pairwise_distance(grid: tuple[int, int], patch: int) -> float:
    """Mean of patch * ||g_i - g_j|| over all ordered pairs of grid cells, i == j included."""
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    total = sum(math.dist(a, b) for a, b in itertools.product(cells, cells))
    return patch * total / len(cells) ** 2


def random_row_stochastic(rng: np.random.Generator, *shape: int) -> np.ndarray:
    a = rng.random(shape) + 0.05
    return a / a.sum(axis=-1, keepdims=True)


# ---- forced attention: known answers ----


@pytest.mark.parametrize("prefix", [1, 0])
def test_uniform_attention_gives_uniform_rollout_and_mean_pairwise_distance(prefix):
    t = prefix + GRID[0] * GRID[1]
    attn = [np.full((2, 3, t, t), 1.0 / t) for _ in range(4)]  # 4 blocks, B 2, h 3
    dist = attention_distance_from_maps(attn, GRID, PATCH, prefix)
    assert dist.shape == (4, 3)
    np.testing.assert_allclose(dist, mean_pairwise_distance(GRID, PATCH), rtol=1e-12)

    roll = rollout_from_maps(attn, prefix, GRID)
    assert roll.maps.shape == (2, *GRID)
    np.testing.assert_allclose(roll.maps, roll.maps.flat[0], rtol=1e-12)
    assert roll.source == (SOURCE_CLASS_TOKEN if prefix else SOURCE_PATCH_MEAN)


def test_identity_attention_gives_zero_distance_and_identity_rollout():
    attn = np.broadcast_to(np.eye(TOKENS), (3, 2, 2, TOKENS, TOKENS))  # (L, B, h, T, T)
    np.testing.assert_allclose(attention_distance_from_maps(attn, GRID, PATCH, 1), 0.0, atol=1e-12)
    roll = rollout_from_maps(attn, 1, GRID)
    np.testing.assert_allclose(roll.matrices, np.broadcast_to(np.eye(TOKENS), (2, TOKENS, TOKENS)), atol=1e-12)
    np.testing.assert_allclose(roll.maps, 0.0, atol=1e-12)  # the class token attends only to itself


def test_rollout_of_three_random_layers_is_the_hand_product():
    rng = np.random.default_rng(0)
    t, heads = 1 + 2 * 3, 3
    attn = [random_row_stochastic(rng, 2, heads, t, t) for _ in range(3)]  # 3 blocks, B 2, grid (2, 3)
    expected = np.zeros((2, t, t))
    for b in range(2):
        steps = []
        for a in attn:
            fused = a[b].mean(axis=0) + np.eye(t)
            steps.append(fused / fused.sum(axis=1, keepdims=True))
        expected[b] = steps[2] @ steps[1] @ steps[0]
    roll = rollout_from_maps(attn, 1, (2, 3))
    np.testing.assert_allclose(roll.matrices, expected, rtol=1e-12)
    np.testing.assert_allclose(roll.maps, expected[:, 0, 1:].reshape(2, 2, 3), rtol=1e-12)
    np.testing.assert_allclose(roll.matrices.sum(axis=-1), 1.0, rtol=1e-12)
    # The stacked (L, B, h, T, T) form gives the same answer as the list.
    np.testing.assert_allclose(rollout_from_maps(np.stack(attn), 1, (2, 3)).matrices, expected, rtol=1e-12)


def test_rollout_discard_keeps_rows_stochastic_and_the_diagonal():
    rng = np.random.default_rng(1)
    attn = [random_row_stochastic(rng, 1, 2, TOKENS, TOKENS) for _ in range(2)]
    roll = rollout_from_maps(attn, 1, GRID, head_fusion="max", discard_ratio=0.9)
    np.testing.assert_allclose(roll.matrices.sum(axis=-1), 1.0, rtol=1e-12)
    assert (np.diagonal(roll.matrices, axis1=1, axis2=2) > 0).all()


def test_distance_doubles_with_patch_size():
    rng = np.random.default_rng(2)
    attn = [random_row_stochastic(rng, 2, 2, TOKENS, TOKENS) for _ in range(2)]
    d8 = attention_distance_from_maps(attn, GRID, 8, 1)
    d16 = attention_distance_from_maps(attn, GRID, 16, 1)
    np.testing.assert_allclose(d16, 2 * d8, rtol=1e-12)
    assert (d8 > 0).all()


def test_distance_renormalises_over_patch_keys():
    # Half of each row on the class token, the rest on the patch one grid step to the right (or left at the edge):
    # renormalised over the patch keys, every query's distance is exactly one patch.
    n = GRID[0] * GRID[1]
    a = np.zeros((1, 1, TOKENS, TOKENS))
    a[..., :, 0] = 0.5
    for i in range(n):
        r, c = divmod(i, GRID[1])
        a[..., 1 + i, 1 + r * GRID[1] + (c + 1 if c + 1 < GRID[1] else c - 1)] = 0.5
    np.testing.assert_allclose(attention_distance_from_maps([a], GRID, PATCH, 1), [[PATCH]], rtol=1e-12)


# ---- parameters: position embedding and patch embedding ----


def sincos_table(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> np.ndarray:
    """(gh * gw, dim) 2D sin-cos table: a quarter of the dims sin/cos of the row, a quarter of the column."""
    quarter = dim // 4
    omega = temperature ** -(np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    parts = []
    for pos in (rows.ravel(), cols.ravel()):
        angle = np.outer(pos, omega)  # (N, dim / 4)
        parts += [np.sin(angle), np.cos(angle)]
    return np.concatenate(parts, axis=1)


def test_pos_embed_similarity_of_a_sincos_table_peaks_at_each_position():
    model = tiny()
    table = sincos_table(GRID, model.cfg.width)
    with torch.no_grad():
        model.pos_embed[0, 1:] = torch.from_numpy(table)
        model.pos_embed[0, 0] = 5.0  # the class-token entry must not enter
    sim = pos_embed_similarity(model)
    assert sim.shape == (*GRID, *GRID)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    np.testing.assert_allclose(sim.reshape(49, 49), unit @ unit.T, atol=1e-6)  # float32 parameter
    cells = np.array(list(itertools.product(range(GRID[0]), range(GRID[1]))))
    for i, j in itertools.product(range(GRID[0]), range(GRID[1])):
        own = sim[i, j]
        assert np.unravel_index(own.argmax(), GRID) == (i, j)
        dist = np.linalg.norm(cells - (i, j), axis=1).reshape(GRID)
        # Every neighbour one step away is more similar than every position three or more steps away.
        assert own[np.isclose(dist, 1)].min() > own[dist >= 3].max()


def test_pca_recovers_known_components_and_variances():
    model = tiny()
    d, cpp = model.cfg.width, PATCH * PATCH
    rng = np.random.default_rng(3)
    components = np.linalg.qr(rng.standard_normal((cpp, 3)))[0].T  # (3, 16) orthonormal
    coeffs = rng.standard_normal((d, 3))
    coeffs = np.linalg.qr(coeffs - coeffs.mean(axis=0))[0]  # (D, 3) orthonormal, zero mean over the filters
    scales = np.array([3.0, 2.0, 0.5])
    weight = coeffs * scales @ components + rng.standard_normal(cpp)  # + a mean filter PCA must remove
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(torch.from_numpy(weight.reshape(d, 1, PATCH, PATCH)))
    got, ratio = embedding_filters(model, k=3)
    assert got.shape == (3, 1, PATCH, PATCH) and ratio.shape == (3,)
    flat = got.reshape(3, cpp)
    cosines = np.abs(np.sum(flat * components, axis=1)) / np.linalg.norm(flat, axis=1)
    assert (cosines > 0.999).all(), cosines
    np.testing.assert_allclose(ratio, scales**2 / np.sum(scales**2), atol=1e-5)
    # k is clipped to min(D, C*P*P) = 16.
    got_all, ratio_all = embedding_filters(model)
    assert got_all.shape == (cpp, 1, PATCH, PATCH) and ratio_all.shape == (cpp,)


# ---- the real model path ----


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_real_model_distance_and_rollout_are_in_range(pool):
    model = tiny(pool).train()
    images = shapes_batch()
    dist = mean_attention_distance(model, images)
    assert dist.shape == (2, 2)
    far = PATCH * math.hypot(GRID[0] - 1, GRID[1] - 1)
    assert ((dist > 0) & (dist <= far)).all()

    roll = attention_rollout(model, images)
    t = model.cfg.num_prefix_tokens + 49
    assert roll.maps.shape == (3, *GRID) and roll.matrices.shape == (3, t, t)
    np.testing.assert_allclose(roll.matrices.sum(axis=-1), 1.0, rtol=1e-9)
    assert (roll.maps >= 0).all() and (roll.matrices >= 0).all()
    assert roll.source == (SOURCE_CLASS_TOKEN if pool == "cls" else SOURCE_PATCH_MEAN)

    last = last_layer_attention(model, images)
    assert last.shape == (3, 2, *GRID) and (last >= 0).all()
    assert model.training and all(m.training for m in model.modules())  # training flags restored


def test_last_layer_attention_is_the_class_token_row():
    model = tiny().eval()
    images = shapes_batch(2)
    with torch.no_grad():
        (a,) = model.forward_intermediates(images, blocks=[-1], attention=True).attention  # (B, h, T, T)
    np.testing.assert_allclose(last_layer_attention(model, images), a[:, :, 0, 1:].reshape(2, 2, *GRID).numpy(),
                               rtol=1e-5, atol=1e-7)


def test_upsample_map_keeps_a_constant_and_the_shape():
    up = upsample_map(np.full((7, 7), 0.25), (28, 28))
    assert up.shape == (28, 28)
    np.testing.assert_allclose(up, 0.25)
    assert upsample_map(torch.rand(3, 7, 7), (14, 21)).shape == (3, 14, 21)


# ---- figures ----


def assert_png(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        assert np.asarray(im.convert("RGB"), dtype=np.float64).std() > 0


def test_each_plot_writes_a_png_of_its_stated_size(tmp_path):
    rng = np.random.default_rng(4)
    images = shapes_batch(2)
    maps = rng.random((2, *GRID))
    plot_embedding_filters(rng.standard_normal((5, 3, 4, 4)), np.linspace(0.3, 0.1, 5), tmp_path / "f.png")
    assert_png(tmp_path / "f.png", figures.FILTERS_SIZE)
    plot_pos_embed_similarity(rng.uniform(-1, 1, (*GRID, *GRID)), tmp_path / "p.png", title="pos")
    assert_png(tmp_path / "p.png", figures.POS_EMBED_SIZE)
    plot_attention_distance(rng.random((4, 3)) * 20, tmp_path / "d.png")
    assert_png(tmp_path / "d.png", figures.DISTANCE_SIZE)
    plot_rollout(images, maps, SOURCE_PATCH_MEAN, tmp_path / "r.png", mean=[0.5], std=[0.25])
    assert_png(tmp_path / "r.png", figures.ROLLOUT_SIZE)
    probs = rng.dirichlet(np.ones(10))
    plot_prediction_explained(images[0], maps[0], [f"class {i}" for i in range(10)], probs, tmp_path / "e.png")
    assert_png(tmp_path / "e.png", figures.PREDICTION_SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "e.png", "f.png", "p.png", "r.png"]


def test_write_inspection_writes_every_figure_and_the_arrays(tmp_path):
    model = tiny()
    out = tmp_path / "inspect"
    written = write_inspection(model, shapes_batch(2), out, mean=[0.0], std=[1.0])
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.png" for n in ANALYSES] + ["arrays.npz"])
    assert set(written) == set(ANALYSES) | {"arrays"}
    assert_png(out / "rollout.png", figures.ROLLOUT_SIZE)
    with np.load(out / "arrays.npz") as arrays:
        assert arrays["attention_distance"].shape == (2, 2)
        assert arrays["rollout_maps"].shape == (2, *GRID)
        assert str(arrays["rollout_source"]) == SOURCE_CLASS_TOKEN
        assert arrays["pos_embed_similarity"].shape == (*GRID, *GRID)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspect"]  # no temporary directory left
    # Into the existing directory again: the named files are replaced, the others stay.
    write_inspection(model, None, out, analyses="filters")
    assert len(list(out.iterdir())) == len(ANALYSES) + 1
    with np.load(out / "arrays.npz") as arrays:
        assert sorted(arrays.files) == ["filters_components", "filters_variance_ratio"]


def test_the_output_gets_the_modes_a_plain_mkdir_and_write_would(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_inspection(tiny(), None, tmp_path / "inspect", analyses="filters")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "inspect").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "inspect").iterdir()} == {0o644}


# ---- bad input ----


@pytest.mark.parametrize("shape,needle", [
    ((2, 1, 30, 30), "30x30"),
    ((2, 1, 28, 26), "28x26"),
    ((2, 3, 28, 28), "3 channels"),
    ((0, 1, 28, 28), "empty"),
])
def test_bad_images_are_named(shape, needle):
    model = tiny()
    for run in (mean_attention_distance, attention_rollout, last_layer_attention):
        with pytest.raises(ValueError, match=needle):
            run(model, torch.zeros(shape))


def test_require_class_token_on_a_gap_model():
    model = tiny("gap")
    for run in (attention_rollout, last_layer_attention):
        with pytest.raises(ValueError, match=r"require_class_token.*pool='gap'"):
            run(model, shapes_batch(1), require_class_token=True)
    with pytest.raises(ValueError, match="no class token"):
        rollout_from_maps([np.full((1, 1, 4, 4), 0.25)], 0, (2, 2), require_class_token=True)


def test_unknown_analysis_lists_the_known_ones_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"'bogus'.*filters.*pos_embed.*attention_distance.*rollout"):
        write_inspection(tiny(), shapes_batch(1), out, analyses=["filters", "bogus"])
    assert list(tmp_path.iterdir()) == []


def test_bad_images_or_stats_write_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="30x30"):
        write_inspection(tiny(), torch.zeros(1, 1, 30, 30), out)
    with pytest.raises(ValueError, match="empty"):
        write_inspection(tiny(), torch.zeros(0, 1, 28, 28), out)
    with pytest.raises(ValueError, match=r"std.*\[0\.5, 0\.5\]"):
        write_inspection(tiny(), shapes_batch(1), out, std=[0.5, 0.5])
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []
    out.rmdir()
    with pytest.raises(ValueError, match="3 channels"):
        write_inspection(tiny(), torch.zeros(1, 3, 28, 28), out)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_plotting_leaves_no_partial_output(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report.figures, "plot_rollout", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_inspection(tiny(), shapes_batch(1), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
