"""The few-shot linear probe: the ridge solver, the draws, and `vitkit fewshot` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitkit.cli import main
from vitkit.data import eval_transform, load_dataset
from vitkit.fewshot import FewShotOptions, extract_features, few_shot_eval, few_shot_indices, fit_linear_probe
from vitkit.model import create_model
from vitkit.weights import save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small random ViT for the synthetic set's 3 x 16 x 16 images, saved with its config (seed 123, so
    that `--random_init` with seed 0 builds another network)."""
    torch.manual_seed(123)
    model = create_model("Ti/4", img_size=16, num_classes=10, width=32, depth=2, heads=2, mlp_dim=64)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_weights(model, path)
    return path


def test_linear_probe_matches_numpy_least_squares():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    labels = rng.integers(0, 4, size=40)
    l2 = 0.7
    w, b = fit_linear_probe(torch.from_numpy(x), torch.from_numpy(labels), num_classes=4, l2=l2)
    # The same ridge problem as plain least squares: [X 1; sqrt(l2) I 0] W = [Y; 0].
    y = -np.ones((40, 4))
    y[np.arange(40), labels] = 1
    a = np.vstack([np.hstack([x, np.ones((40, 1))]), np.hstack([np.sqrt(l2) * np.eye(6), np.zeros((6, 1))])])
    target = np.vstack([y, np.zeros((6, 4))])
    expected, *_ = np.linalg.lstsq(a, target, rcond=None)
    np.testing.assert_allclose(w.numpy(), expected[:6], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(b.numpy(), expected[6], rtol=1e-9, atol=1e-10)


def test_few_shot_draws_k_per_class_and_rejects_too_many():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 8)
    picked = few_shot_indices(labels, shots=3, seed=1)
    assert torch.equal(torch.bincount(labels[picked]), torch.tensor([3, 3, 3]))
    assert torch.equal(picked, few_shot_indices(labels, shots=3, seed=1))
    with pytest.raises(ValueError, match=r"--shots 4 .* smallest class \(3 training images\)"):
        few_shot_indices(labels, shots=4, seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        few_shot_indices(torch.zeros(5, dtype=torch.long), shots=1, seed=0)


def test_few_shot_eval_is_the_ridge_probe_of_the_drawn_images(weights):
    """One draw, one penalty: the result is what the public pieces give when put together by hand."""
    opts = FewShotOptions(weights=str(weights), data="synthetic", shots=[3], draws=1, seed=0, l2=[0.5],
                          device="cpu")
    [result] = few_shot_eval(opts)

    from vitkit.weights import load_model

    model = load_model(weights).eval()
    data = load_dataset("synthetic", seed=0)
    transform = eval_transform((0.5,) * 3, (0.5,) * 3, (16, 16))  # no stored statistics: the [-1, 1] scaling
    picked = few_shot_indices(data.train.labels, 3, seed=0)
    x = extract_features(model, torch.stack([transform(data.train.images[i]) for i in picked]))
    w, b = fit_linear_probe(x, data.train.labels[picked], 10, l2=0.5)
    test_x = extract_features(model, torch.stack([transform(image) for image in data.test.images]))
    expected = float(((test_x.double() @ w + b).argmax(1) == data.test.labels).double().mean())
    assert result.accuracies == [pytest.approx(expected, abs=1e-12)]
    assert result.l2 == [0.5] and result.mean == result.accuracies[0]


def test_few_shot_draws_are_seeded_and_penalties_come_from_the_list(weights, tmp_path):
    opts = FewShotOptions(weights=str(weights), data="synthetic", shots=[2, 5], draws=3, l2=[0.01, 1.0, 100.0],
                          device="cpu", out=str(tmp_path))
    first = few_shot_eval(opts)
    again = few_shot_eval(opts)
    assert [r.accuracies for r in first] == [r.accuracies for r in again]
    assert all(len(r.accuracies) == 3 and set(r.l2) <= {0.01, 1.0, 100.0} for r in first)
    saved = json.loads((tmp_path / "fewshot.json").read_text())
    assert [r["shots"] for r in saved["results"]] == [2, 5]
    assert saved["results"][1]["mean_top1"] == pytest.approx(np.mean(first[1].accuracies))


def test_random_init_baseline_and_weights_without_a_config(weights, tmp_path):
    from safetensors.torch import load_file

    plain = tmp_path / "plain.safetensors"  # a timm-layout file: tensors only
    save_file(load_file(weights), plain)
    opts = FewShotOptions(weights=str(plain), data="synthetic", shots=[2], draws=2, device="cpu")
    with pytest.raises(ValueError, match="--model.heads"):  # width 32 has no standard number of heads
        few_shot_eval(opts)
    opts.weights = str(weights)
    opts.random_init = True
    baseline = few_shot_eval(opts)
    opts.random_init = False
    assert baseline[0].accuracies != few_shot_eval(opts)[0].accuracies  # a different network was probed


@pytest.mark.parametrize("options,message", [
    (["--shots", "101"], r"--shots 101 must be between 1 and the size of the smallest class \(\d+"),
    (["--resolution", "18"], r"--resolution 18x18 is not divisible by the patch size 4"),
    (["--draws", "0"], r"--draws must be at least 1"),
])
def test_fewshot_bad_input_is_a_clear_error(weights, capsys, options, message):
    import re

    code = main(["fewshot", "--weights", str(weights), "--data", "synthetic", "--device", "cpu", *options])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
