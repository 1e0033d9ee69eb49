"""Calibrated (static) int8: ranges measured once, the product over them, the uint8 hand-over, the file, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from randomised import randomise_
from vitkit.cli import main
from vitkit.inference_modes import CalibratedInt8Linear, InferenceModel, Int8PatchProjection, onednn_int8_available
from vitkit.int8_calibration import Int8Calibration, calibrate_int8, linear_names
from vitkit.model import create_model
from vitkit.runtime import cpu_has_vnni

needs_onednn_int8 = pytest.mark.skipif(not onednn_int8_available(),
                                       reason="calibrated int8 runs on oneDNN's int8 linear")
# Without VNNI the int8 modes keep weights on 7 bits (-63..63): 8-bit weights times 8-bit activations saturate the
# 16-bit pair sums of the AVX2 kernels there.
WEIGHT_LEVELS = [63, 127] if cpu_has_vnni() else [63]


def levels(low: float, high: float) -> tuple[float, int]:
    scale = (high - low) / 255
    return scale, round(-low / scale)


def rounded(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """x clipped to [low, high] and rounded onto its 256 levels, in float."""
    scale, zero = levels(low, high)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero) * scale


@pytest.fixture(scope="module")
def model_and_images():
    model = randomise_(create_model("S/8", img_size=32, num_classes=10, depth=2), seed=3).eval()
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return model, images


def test_calibration_records_each_linears_input_range(model_and_images):
    model, images = model_and_images
    calibration = calibrate_int8(model, images, batch_size=10)  # batches of 10, 10 and 4
    assert calibration.images == 24 and set(calibration.ranges) == set(linear_names(model)) | {"patch_embed.proj"}
    assert len(calibration.ranges) == 2 * 4 + 1 + 1  # qkv, proj, fc1, fc2 per block, the head, the patch projection
    assert all(low <= 0 <= high and high > low for low, high in calibration.ranges.values())
    # Known answers: the patch projection's input is the images themselves ...
    assert calibration.ranges["patch_embed.proj"] == (min(images.min().item(), 0.0), max(images.max().item(), 0.0))
    # ... and the head's input is the pooled, normalised representation, computed in the same batches (a float
    # matmul's rounding may depend on the batch: it did with the Intel Xeon with AMX's kernels).
    with torch.no_grad():
        pooled = torch.cat([model.forward_head(model.forward_features(batch), pre_logits=True)
                            for batch in images.split(10)])  # (B, D)
    assert calibration.ranges["head"] == (min(pooled.min().item(), 0.0), max(pooled.max().item(), 0.0))
    # Ranges over all images are the union of the ranges over any split of them (here along the same batches).
    first, second = calibrate_int8(model, images[:10], batch_size=10), calibrate_int8(model, images[10:], batch_size=10)
    for name, (low, high) in calibration.ranges.items():
        assert low == min(first.ranges[name][0], second.ranges[name][0])
        assert high == max(first.ranges[name][1], second.ranges[name][1])
    assert not model.training


@needs_onednn_int8
@pytest.mark.parametrize("weight_levels", WEIGHT_LEVELS)
@pytest.mark.parametrize("for_compile", [False, True])
def test_calibrated_linear_computes_the_product_over_its_fixed_range(for_compile, weight_levels):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64) * 2 + 0.3
    low, high = -1.5, 2.5  # narrower than x: values outside are clipped
    w = linear.weight.detach()
    w_scale = w.abs().amax(dim=1, keepdim=True) / weight_levels
    w_rounded = (w / w_scale).round() * w_scale
    expected = torch.nn.functional.gelu(rounded(x, low, high) @ w_rounded.T + linear.bias.detach())  # (5, 7, 48)
    reduce_range = weight_levels == 63
    fc1 = CalibratedInt8Linear(linear, (low, high), "gelu", for_compile=for_compile, reduce_range=reduce_range)
    assert fc1.weight_levels == weight_levels
    got = fc1(x)
    assert got.shape == (5, 7, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Handing over in uint8: the output rounded onto the next layer's levels inside the matmul.
    out_low, out_high = -0.2, 1.0
    handing = CalibratedInt8Linear(linear, (low, high), "gelu", output_range=(out_low, out_high),
                                   reduce_range=reduce_range)
    as_uint8 = handing(x)
    scale, zero = levels(out_low, out_high)
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (5, 7, 48)
    expected_levels = ((expected / scale).round() + zero).clamp(0, 255)
    assert (as_uint8.float() - expected_levels).abs().max() <= 1  # a tie of the float sums may round either way
    assert (as_uint8.float() != expected_levels).float().mean() < 0.01
    # The next layer takes those bytes as they are: the same as its float input rounded onto its levels.
    fc2_linear = torch.nn.Linear(48, 16)
    fc2 = CalibratedInt8Linear(fc2_linear, (out_low, out_high), reduce_range=reduce_range)
    torch.testing.assert_close(fc2(as_uint8), fc2((as_uint8.float() - zero) * scale), atol=1e-5, rtol=0)


@needs_onednn_int8
@pytest.mark.parametrize("weight_levels", WEIGHT_LEVELS)
@pytest.mark.parametrize("for_compile", [False, True])
def test_int8_patch_projection_is_the_convolution_of_the_rounded_image(for_compile, weight_levels):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 18, 21)  # ragged edges, which the convolution drops
    low, high = -2.0, 2.5
    w = conv.weight.detach()  # (16, 3, 4, 4), one scale per output channel
    w_scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / weight_levels
    w_rounded = (w / w_scale).round() * w_scale
    expected = torch.nn.functional.conv2d(rounded(x, low, high), w_rounded, conv.bias.detach(), stride=4)
    got = Int8PatchProjection(conv, (low, high), for_compile=for_compile, reduce_range=weight_levels == 63)(x)
    assert got.shape == expected.shape == (2, 16, 4, 5)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@needs_onednn_int8
def test_the_patch_projection_runs_in_int8_when_calibrated_and_in_float_without_its_range(model_and_images):
    model, images = model_and_images
    calibration = calibrate_int8(model, images)
    inner = InferenceModel(model, "int8", int8_calibration=calibration).model
    assert isinstance(inner.patch_embed.proj, Int8PatchProjection)
    ranges = {name: bounds for name, bounds in calibration.ranges.items() if name != "patch_embed.proj"}
    older = Int8Calibration(ranges, calibration.images, calibration.model, calibration.weights)
    assert isinstance(InferenceModel(model, "int8", int8_calibration=older).model.patch_embed.proj, torch.nn.Conv2d)


@needs_onednn_int8
def test_calibrated_int8_mode_hands_the_mlp_over_in_uint8_and_keeps_the_logits(model_and_images):
    model, images = model_and_images
    calibration = calibrate_int8(model, images)
    with torch.no_grad():
        reference = model(images)
    dynamic = InferenceModel(model, "int8", int8_attention="fp32")
    calibrated = InferenceModel(model, "int8", int8_attention="fp32", int8_calibration=calibration)
    assert calibrated.int8_calibrated and not dynamic.int8_calibrated
    block = calibrated.model.blocks[0]
    assert block.mlp.fc1.emits_uint8 and not block.mlp.fc2.emits_uint8 and not block.attn.qkv.emits_uint8
    assert block.mlp.fc1.output_scale == block.mlp.fc2.input_scale
    logits = calibrated(images)
    error = (logits - reference).abs().max() / reference.abs().max()
    assert 0 < error <= (0.04 if cpu_has_vnni() else 0.07)  # int8's tolerance (tests/test_inference_modes.py)
    assert block.mlp.fc1.weight_levels == (127 if cpu_has_vnni() else 63)
    assert not torch.equal(logits, dynamic(images))  # the calibrated ranges took effect


@needs_onednn_int8
def test_compiled_calibrated_int8_is_one_graph_with_the_eager_logits():
    from torch._dynamo.utils import counters

    model = randomise_(create_model("Ti/8", img_size=16, num_classes=5, depth=2), seed=3).eval()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    calibration = calibrate_int8(model, images)
    eager = InferenceModel(model, "int8", int8_attention="fp32", int8_calibration=calibration)(images)
    torch._dynamo.reset()
    counters.clear()
    compiled = InferenceModel(model, "int8", compile=True, int8_attention="fp32", int8_calibration=calibration)
    logits = compiled(images)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(logits, eager, atol=1e-3 * eager.abs().max().item(), rtol=0)


def test_calibration_file_round_trips_and_is_refused_for_another_model(model_and_images, tmp_path):
    model, images = model_and_images
    calibration = calibrate_int8(model, images[:4])
    path = tmp_path / "cal.json"
    calibration.save(path)
    assert Int8Calibration.load(path) == calibration
    other = create_model("S/8", img_size=32, num_classes=10, depth=3)
    with pytest.raises(ValueError, match="measured on another model .*depth"):
        InferenceModel(other, "int8", int8_calibration=calibration)
    retrained = randomise_(create_model("S/8", img_size=32, num_classes=10, depth=2), seed=4).eval()
    with pytest.raises(ValueError, match="measured on other weights of this architecture"):
        InferenceModel(retrained, "int8", int8_calibration=calibration)
    record = json.loads(path.read_text())
    del record["ranges"]["head"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="no range for the linear layers head"):
        Int8Calibration.load(path).check(model)
    record["ranges"]["blocks.0.attn.qkv"] = [0.5, 1.0]  # does not span 0: not a range vitkit writes
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="damaged int8 calibration file"):
        Int8Calibration.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match=f"{path} is not a readable int8 calibration file"):
        Int8Calibration.load(path)
    with pytest.raises(ValueError, match="no int8 calibration file at"):
        Int8Calibration.load(tmp_path / "missing.json")


def tiny_weights(path, seed: int):
    torch.manual_seed(seed)
    model = vitkit.create_model("Ti/4", img_size=16, in_chans=1, num_classes=10, width=32, depth=1, heads=2,
                                mlp_dim=64)
    vitkit.save_weights(model, path)
    return path


def eval_report(weights, out, *args) -> dict:
    assert main(["eval", "--weights", str(weights), "--data", "synthetic", "--precision", "int8", "--device", "cpu",
                 "--out", str(out), *args]) == 0
    return json.loads((out / "eval_test.json").read_text())


@needs_onednn_int8
def test_calibrate_then_eval_finds_the_file_beside_the_weights(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "tiny.safetensors", seed=0)
    assert eval_report(weights, tmp_path / "before")["int8_calibrated"] is False
    assert main(["calibrate", "--weights", str(weights), "--data", "synthetic", "--images", "30",
                 "--batch_size", "8", "--device", "cpu"]) == 0
    written = tmp_path / "tiny.int8_calibration.json"
    assert Int8Calibration.load(written).images == 30
    capsys.readouterr()
    assert eval_report(weights, tmp_path / "found")["int8_calibrated"] is True
    assert f"int8 calibrated by {written}" in capsys.readouterr().err
    assert eval_report(weights, tmp_path / "asked", "--int8_calibration", str(written))["int8_calibrated"] is True
    assert eval_report(weights, tmp_path / "none", "--int8_calibration", "none")["int8_calibrated"] is False
    # Trained again, the weights no longer fit the file beside them: it is ignored, with a warning, not an error.
    tiny_weights(weights, seed=1)
    with pytest.warns(UserWarning, match="ignoring .*tiny.int8_calibration.json .*other weights"):
        assert eval_report(weights, tmp_path / "stale")["int8_calibrated"] is False
    # Asked for by name, a file that does not fit or is not there is an error that names it.
    capsys.readouterr()
    assert main(["eval", "--weights", str(weights), "--data", "synthetic", "--precision", "int8",
                 "--int8_calibration", str(written), "--device", "cpu"]) == 2
    assert "other weights of this architecture" in capsys.readouterr().err
    assert main(["eval", "--weights", str(weights), "--data", "synthetic", "--precision", "int8",
                 "--int8_calibration", str(tmp_path / "nope.json"), "--device", "cpu"]) == 2
    assert f"no int8 calibration file at {tmp_path / 'nope.json'}" in capsys.readouterr().err
