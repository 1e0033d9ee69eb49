"""Every inference mode gives the fp32 logits, within the tolerance its arithmetic allows."""

from __future__ import annotations

import pytest
import torch

from randomised import randomise_
from vitkit.inference_modes import PRECISIONS, InferenceModel
from vitkit.model import create_model

# Largest logit difference allowed, relative to the largest fp32 logit. bf16 keeps 8 bits of mantissa
# (a relative rounding of 2^-9 per operation); int8 quantises weights per tensor and activations per batch.
TOLERANCE = {"fp32": 1e-6, "bf16": 0.02, "bf16-autocast": 0.02, "int8": 0.08}


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = randomise_(create_model("S/8", img_size=32, num_classes=10, depth=2), seed=3).eval()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(images)
    return model, images, reference


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mode_logits_agree_with_fp32(model_and_images, precision):
    model, images, reference = model_and_images
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = InferenceModel(model, precision)(images)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    error = (logits - reference).abs().max() / reference.abs().max()
    assert error <= TOLERANCE[precision], f"{precision}: relative error {error:.4f}"
    if precision != "fp32":
        assert error > 0, f"{precision} gave exactly the fp32 logits: the mode did not take effect"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the original model changed"


def test_compiled_fp32_matches_eager(model_and_images):
    model, images, reference = model_and_images
    logits = InferenceModel(model, "fp32", compile=True)(images)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_bf16_weights_are_cast_once():
    model = create_model("Ti/8", img_size=16, num_classes=3)
    runner = InferenceModel(model, "bf16")
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bad_mode_and_training_are_refused():
    model = create_model("Ti/8", img_size=16, num_classes=3)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        InferenceModel(model, "fp16")
    with pytest.raises(ValueError, match="inference only"):
        InferenceModel(model).train()
