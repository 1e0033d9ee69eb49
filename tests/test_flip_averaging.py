"""Test-time flip averaging: known answers on hand-built classifiers, and `vitkit eval --tta flip` against the
mean of two plain passes computed here."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from randomised import randomise_
from vitkit.cli import main
from vitkit.data import Transformed, load_dataset
from vitkit.flip_averaging import FlipAveraged
from vitkit.inference import ImageClassifier


class LeftRight(nn.Module):
    """Two classes: the sum of the image's left half, the sum of its right half."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        half = images.shape[-1] // 2
        return torch.stack([images[..., :half].sum((1, 2, 3)), images[..., half:].sum((1, 2, 3))], dim=1)


class MeanPooled(nn.Module):
    """Class scores from the image's per-channel means: a mirror image scores the same."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(images.mean((2, 3)))


def test_mirror_images_of_a_left_right_classifier_average_to_even_odds():
    # softmax([a, b]) + softmax([b, a]) = [1, 1], whatever a and b: the mean is exactly one half for each class.
    images = torch.randn(6, 1, 4, 8) + torch.linspace(-2, 2, 8)  # right halves brighter: the plain model is sure
    plain = LeftRight()(images).softmax(-1)
    assert (plain[:, 1] > 0.9).all()
    averaged = FlipAveraged(LeftRight())(images)
    torch.testing.assert_close(averaged, torch.full((6, 2), math.log(0.5)))
    torch.testing.assert_close(averaged.softmax(-1), torch.full((6, 2), 0.5))


def test_a_mirror_invariant_classifier_is_unchanged():
    torch.manual_seed(0)
    model = MeanPooled()
    images = torch.randn(4, 3, 5, 7)
    torch.testing.assert_close(FlipAveraged(model)(images), model(images).log_softmax(-1))


def test_it_keeps_the_mode_of_what_it_wraps():
    model = MeanPooled().eval()
    assert FlipAveraged(model).training is False
    assert FlipAveraged(MeanPooled()).training is True


def test_eval_with_flip_tta_is_the_mean_of_the_plain_and_mirrored_probabilities(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomise_(vitkit.create_model("Ti/4", img_size=16, in_chans=1, num_classes=10, width=32, depth=1,
                                           heads=2, mlp_dim=64))
    weights = tmp_path / "tiny.safetensors"
    vitkit.save_weights(model, weights)
    args = ["eval", "--weights", str(weights), "--data", "synthetic", "--precision", "fp32", "--device", "cpu"]
    assert main(args + ["--tta", "flip", "--out", str(tmp_path / "flip")]) == 0
    assert "images, flip-averaged)" in capsys.readouterr().out
    report = json.loads((tmp_path / "flip" / "eval_test.json").read_text())
    assert report["tta"] == "flip"

    # The same, by hand: the loaded model's probabilities of each test image and of its mirror image.
    classifier = ImageClassifier(str(weights), "fp32", device="cpu")
    split = Transformed(load_dataset("synthetic", image_size=(16, 16), in_chans=1).test, classifier.prepare)
    images = torch.stack([split[i][0] for i in range(len(split))])
    labels = torch.tensor([split[i][1] for i in range(len(split))])
    with torch.no_grad():
        probs = (classifier.model(images).softmax(-1) + classifier.model(images.flip(-1)).softmax(-1)) / 2
    assert report["count"] == len(labels)
    assert round(report["top1"] * len(labels)) == int((probs.argmax(-1) == labels).sum())
    assert math.isclose(report["loss"], F.nll_loss(probs.log(), labels).item(), rel_tol=1e-5)

    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "eval_test.json").read_text())
    assert plain["tta"] == "none"
    with torch.no_grad():
        plain_probs = classifier.model(images).softmax(-1)
    assert math.isclose(plain["loss"], F.nll_loss(plain_probs.log(), labels).item(), rel_tol=1e-5)
    assert not math.isclose(plain["loss"], report["loss"], rel_tol=1e-3)  # the averaging changed the answer
