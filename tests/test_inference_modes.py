"""Every inference mode gives the fp32 logits, within the tolerance its arithmetic allows."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit.inference_modes as inference_modes
from randomised import randomise_
from vitkit.inference_modes import (MODES, DynamicInt8Linear, InferenceModel, PackedLinear, onednn_int8_available,
                                    packed_linears_available)
from vitkit.model import create_model
from vitkit.runtime import cpu_has_vnni

# Largest logit difference allowed, relative to the largest fp32 logit. fp32 runs its linears through oneDNN,
# which sums in another order than aten (measured 7.7e-7). bf16 keeps 8 bits of mantissa
# (a relative rounding of 2^-9 per operation); int8 rounds weights to 255 levels per output channel (127 without
# VNNI) and activations to 256 levels per call: measured 0.023 (0.042 with 7-bit weights; 0.053 with 7-bit
# activations, the form before).
TOLERANCE = {"fp32": 5e-6, "bf16": 0.02, "bf16-mixed": 0.02, "int8": 0.04 if cpu_has_vnni() else 0.07}


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = randomise_(create_model("S/8", img_size=32, num_classes=10, depth=2), seed=3).eval()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(images)
    return model, images, reference


@pytest.mark.parametrize("precision", MODES)
def test_mode_logits_agree_with_fp32(model_and_images, precision):
    model, images, reference = model_and_images
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = InferenceModel(model, precision)(images)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    error = (logits - reference).abs().max() / reference.abs().max()
    assert error <= TOLERANCE[precision], f"{precision}: relative error {error:.2e}"
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


KERNELS = [(False, "fbgemm"), (True, "fbgemm")] + ([(False, "onednn"), (True, "onednn")] if onednn_int8_available()
                                                    else [])


@pytest.mark.parametrize("reduce_range,kernel", KERNELS)
@pytest.mark.parametrize("activation,out_dtype", [("none", torch.float32), ("gelu", torch.float32),
                                                  ("none", torch.bfloat16)])
def test_int8_linear_computes_the_quantised_product(reduce_range, kernel, activation, out_dtype):
    if not reduce_range and not cpu_has_vnni():
        pytest.skip("without VNNI the int8 multiply-adds saturate in 16 bits with 8-bit weights: InferenceModel "
                    "takes 7 there, the reduce_range case")
    # The known answer: weights rounded symmetrically per output channel (scale max|w| / 127, or / 63 with
    # reduce_range), activations rounded per call onto 256 levels spanning [min(x, 0), max(x, 0)]; then an exact
    # integer product.
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64) * 2 + 0.3
    w = linear.weight.detach()
    w_levels = 63 if reduce_range else 127
    w_scale = w.abs().amax(dim=1, keepdim=True) / w_levels
    w_rounded = (w / w_scale).round().clamp(-w_levels, w_levels) * w_scale
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    x_scale = (high - low) / 255
    zero = round(-low / x_scale)
    x_rounded = ((x / x_scale).round() + zero).clamp(0, 255).sub(zero) * x_scale
    expected = x_rounded @ w_rounded.T + linear.bias.detach()  # (5, 7, 48)
    expected = torch.nn.functional.gelu(expected) if activation == "gelu" else expected
    got = DynamicInt8Linear(linear, reduce_range, activation, out_dtype, kernel)(x)
    assert got.shape == (5, 7, 48) and got.dtype == out_dtype
    # bf16 output: the exact product rounded once to 8 mantissa bits
    torch.testing.assert_close(got.float(), expected, atol=1e-4, rtol=0 if out_dtype == torch.float32 else 2**-8)
    fp32 = linear(x)
    assert (got.float() - (torch.nn.functional.gelu(fp32) if activation == "gelu" else fp32)).abs().max() > 1e-3


@pytest.mark.parametrize("attention, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_int8_mode_fuses_gelu_and_runs_attention_in_the_dtype_asked(attention, dtype):
    model = create_model("Ti/8", img_size=16, num_classes=3, depth=1)
    inner = InferenceModel(model, "int8", int8_attention=attention).model
    block = inner.blocks[0]
    assert isinstance(block.mlp.act, torch.nn.Identity) and block.mlp.fc1.activation == "gelu"
    assert block.mlp.fc2.activation == "none" and block.attn.proj.out_dtype == torch.float32
    assert block.attn.qkv.out_dtype == dtype
    assert isinstance(inner.head, DynamicInt8Linear)
    with pytest.raises(ValueError, match="unknown int8_attention 'fp16'"):
        InferenceModel(model, "int8", int8_attention="fp16")


@pytest.mark.parametrize("native_bf16", [False, True])
def test_int8_modes_attention_is_fp32_without_bf16_and_else_the_timed_faster(monkeypatch, tmp_path, native_bf16):
    monkeypatch.setenv("VITKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(inference_modes, "cpu_has_native_bf16", lambda: native_bf16)
    model = create_model("Ti/8", img_size=16, num_classes=3, depth=1)
    choice = inference_modes.int8_attention_choice(model, torch.device("cpu"), 4)
    inner = InferenceModel(model, "int8", batch_size=4).model
    assert inner.blocks[0].attn.qkv.out_dtype == (torch.bfloat16 if choice.precision == "bf16" else torch.float32)
    if native_bf16:
        assert set(choice.median_ms) == {"bf16", "fp32"}
        assert choice.median_ms[choice.precision] == min(choice.median_ms.values())
        (entry,) = json.loads((tmp_path / "fastest_mode.json").read_text()).values()
        assert entry["key"]["int8_attention"] is True and entry["precision"] == choice.precision
    else:
        assert choice.precision == "fp32" and choice.median_ms is None
        assert not (tmp_path / "fastest_mode.json").exists()


def test_compiled_int8_times_its_attention_choice_eagerly(monkeypatch):
    # Compiling both attention forms only to time them tripled the wait for a compiled model's first answer.
    asked = []

    def choice(model, device, batch_size=16, compile=False, cache=None, int8_calibration=None):
        asked.append(compile)
        return inference_modes.fastest_mode.ModeChoice("fp32", "test")

    monkeypatch.setattr(inference_modes, "int8_attention_choice", choice)
    InferenceModel(create_model("Ti/8", img_size=16, num_classes=3, depth=1), "int8", compile=True)
    assert asked == [False]


@pytest.mark.skipif(not onednn_int8_available(), reason="torch without oneDNN's int8 linear")
@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("activation,out_dtype", [("none", torch.float32), ("gelu", torch.float32),
                                                  ("none", torch.bfloat16)])
def test_int8_linears_traced_form_rounds_as_the_eager_kernel(reduce_range, activation, out_dtype):
    # The form torch.compile captures quantises the activations with tensor ops instead of quantize_per_tensor;
    # on the same input it must pick the same levels, hence the same integer product.
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    eager = DynamicInt8Linear(linear, reduce_range, activation, out_dtype, kernel="onednn")
    for_compile = DynamicInt8Linear(linear, reduce_range, activation, out_dtype, kernel="onednn", for_compile=True)
    x = torch.randn(5, 7, 64) * 2 + 0.3
    traced = for_compile._traced_forward(x)
    assert traced.shape == (5, 7, 48) and traced.dtype == out_dtype
    torch.testing.assert_close(traced.float(), eager(x).float(), atol=1e-6, rtol=0)
    zeros = torch.zeros(3, 64)  # no range at all: every activation is the zero point
    torch.testing.assert_close(for_compile._traced_forward(zeros).float(), eager(zeros).float(), atol=1e-6, rtol=0)
    assert eager.weight_int8 is None and for_compile.packed is None  # each keeps one copy of the weight
    # Called eagerly (as dynamo does past its recompile limit), the compile-built module packs its weight then.
    torch.testing.assert_close(for_compile(x), eager(x), atol=0, rtol=0)
    assert for_compile.packed is not None


@pytest.mark.skipif(not onednn_int8_available(),
                    reason="without oneDNN's int8 linear, int8 runs on fbgemm's, opaque to torch.compile")
def test_compiled_int8_is_one_graph_with_the_eager_modes_logits():
    # Before, every int8 linear was opaque to dynamo: a compiled int8 model broke into a graph per layer. Without
    # VNNI the eager mode runs fbgemm's kernel and the compiled one oneDNN's, both on 7-bit weights: the same product.
    from torch._dynamo.utils import counters

    model = randomise_(create_model("Ti/8", img_size=16, num_classes=5, depth=2), seed=3).eval()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    eager = InferenceModel(model, "int8", int8_attention="fp32")(images)
    torch._dynamo.reset()
    counters.clear()
    compiled = InferenceModel(model, "int8", compile=True, int8_attention="fp32")(images)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(compiled, eager, atol=1e-3 * eager.abs().max().item(), rtol=0)


def test_int8_linear_refuses_what_its_kernel_cannot_do():
    linear = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        DynamicInt8Linear(linear, False, activation="relu")
    with pytest.raises(ValueError, match="unknown int8 kernel 'mkl'"):
        DynamicInt8Linear(linear, False, kernel="mkl")


def test_int8_linear_without_onednn_is_refused_onednn_and_runs_fbgemm(monkeypatch):
    monkeypatch.setattr(inference_modes, "onednn_int8_available", lambda: False)
    linear = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="needs a torch built with oneDNN's int8 linear"):
        DynamicInt8Linear(linear, False, kernel="onednn")
    assert DynamicInt8Linear(linear, False).kernel == "fbgemm"
    assert DynamicInt8Linear(linear, True, for_compile=True).kernel == "fbgemm"


@pytest.mark.skipif(not onednn_int8_available(), reason="torch without oneDNN's int8 linear")
def test_int8_linear_kernel_by_levels_and_compilation():
    # 8-bit weights (VNNI): oneDNN, eager or compiled. 7-bit (no VNNI): fbgemm eagerly, which quantises inside its
    # kernel; oneDNN for torch.compile, whose quantisation fuses with the op before.
    linear = torch.nn.Linear(4, 3)
    assert DynamicInt8Linear(linear, False).kernel == "onednn"
    assert DynamicInt8Linear(linear, False, for_compile=True).kernel == "onednn"
    assert DynamicInt8Linear(linear, True).kernel == "fbgemm"
    assert DynamicInt8Linear(linear, True, for_compile=True).kernel == "onednn"
    assert DynamicInt8Linear(linear, True).weight_levels == 63 and DynamicInt8Linear(linear, False).weight_levels == 127


@pytest.mark.skipif(not packed_linears_available(torch.device("cpu"), torch.float32), reason="torch without oneDNN")
@pytest.mark.parametrize("activation,gelu_in_matmul", [("none", None), ("gelu", True), ("gelu", False)])
def test_packed_linear_computes_the_linear(activation, gelu_in_matmul):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64)
    expected = linear(x) if activation == "none" else torch.nn.functional.gelu(linear(x))
    got = PackedLinear(linear, activation, gelu_in_matmul=gelu_in_matmul)(x)
    assert got.shape == (5, 7, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not packed_linears_available(torch.device("cpu"), torch.float32), reason="torch without oneDNN")
@pytest.mark.parametrize("flags,fused", [({"avx2", "fma"}, False), ({"avx2", "avx512f", "avx512_vnni"}, True)])
def test_packed_linear_fuses_gelu_on_avx512_cpus_only(monkeypatch, flags, fused):
    # Without AVX-512, oneDNN's GELU as it writes the output was slower than aten's GELU after the matmul.
    monkeypatch.setattr(inference_modes, "cpu_flags", lambda: frozenset(flags))
    assert inference_modes.gelu_fuses_into_matmul() is fused
    assert PackedLinear(torch.nn.Linear(4, 3), "gelu").gelu_in_matmul is fused


@pytest.mark.skipif(not packed_linears_available(torch.device("cpu"), torch.float32), reason="torch without oneDNN")
def test_fp32_mode_packs_its_linears_unless_compiled():
    model = create_model("Ti/8", img_size=16, num_classes=3, depth=1)
    block = InferenceModel(model, "fp32", fp32_linears="packed").model.blocks[0]
    assert isinstance(block.attn.qkv, PackedLinear) and block.mlp.fc1.activation == "gelu"
    assert isinstance(block.mlp.act, torch.nn.Identity)
    compiled = InferenceModel(model, "fp32", compile=True).model.blocks[0]
    assert isinstance(compiled.attn.qkv, torch.nn.Linear) and isinstance(compiled.mlp.act, torch.nn.GELU)


@pytest.mark.skipif(not packed_linears_available(torch.device("cpu"), torch.float32), reason="torch without oneDNN")
def test_fp32_mode_with_aten_linears_is_the_plain_model_exactly(model_and_images):
    model, images, reference = model_and_images
    runner = InferenceModel(model, "fp32", fp32_linears="aten")
    assert not runner.packed_linears and not any(isinstance(m, PackedLinear) for m in runner.modules())
    assert torch.equal(runner(images), reference)
    assert InferenceModel(model, "fp32", fp32_linears="packed").packed_linears
    with pytest.raises(ValueError, match="unknown fp32_linears 'mkl'"):
        InferenceModel(model, "fp32", fp32_linears="mkl")


@pytest.mark.skipif(not packed_linears_available(torch.device("cpu"), torch.float32), reason="torch without oneDNN")
def test_auto_keeps_its_nested_choices_in_the_cache_it_was_given(monkeypatch, tmp_path):
    # "auto" times fp32 with the linears' own timed choice inside it: both belong in the record the caller named.
    default, given = tmp_path / "default", tmp_path / "given"
    monkeypatch.setenv("VITKIT_CACHE_DIR", str(default))
    monkeypatch.setattr(inference_modes, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(inference_modes.fastest_mode, "candidates", lambda device: ("bf16-mixed", "fp32"))
    model = create_model("Ti/8", img_size=16, num_classes=3, depth=1)
    choice = inference_modes.fastest_inference_mode(model, torch.device("cpu"), 4, cache=given)
    entries = json.loads((given / "fastest_mode.json").read_text()).values()
    assert sorted(bool(entry["key"].get("fp32_linears")) for entry in entries) == [False, True]
    assert choice.precision in ("bf16-mixed", "fp32")
    assert not default.exists()
    runner = InferenceModel(model, "auto", batch_size=4, timing_cache=given)  # both answered from the record
    assert runner.precision == choice.precision and "timed before" in runner.choice.reason
    assert not default.exists()


@pytest.mark.skipif(not packed_linears_available(torch.device("cpu"), torch.float32), reason="torch without oneDNN")
@pytest.mark.parametrize("avx512", [True, False])
def test_fp32_linears_are_packed_with_avx512_and_else_the_timed_faster(monkeypatch, tmp_path, avx512):
    monkeypatch.setenv("VITKIT_CACHE_DIR", str(tmp_path))
    flags = {"avx2", "fma", "avx512f"} if avx512 else {"avx2", "fma"}
    monkeypatch.setattr(inference_modes, "cpu_flags", lambda: frozenset(flags))
    model = create_model("Ti/8", img_size=16, num_classes=3, depth=1)
    choice = inference_modes.fp32_linears_choice(model, torch.device("cpu"), 4)
    runner = InferenceModel(model, "fp32", batch_size=4)
    assert runner.packed_linears is (choice.precision == "packed")
    assert isinstance(runner.model.blocks[0].attn.qkv, PackedLinear) is runner.packed_linears
    if avx512:
        assert choice.precision == "packed" and choice.median_ms is None
        assert not (tmp_path / "fastest_mode.json").exists()
    else:
        assert set(choice.median_ms) == {"packed", "aten"}
        assert choice.median_ms[choice.precision] == min(choice.median_ms.values())
        (entry,) = json.loads((tmp_path / "fastest_mode.json").read_text()).values()
        assert entry["key"]["fp32_linears"] is True and entry["precision"] == choice.precision
    # bf16 and compiled modes do not ask
    monkeypatch.setattr(inference_modes, "fp32_linears_choice", lambda *a, **k: pytest.fail("asked"))
    assert not InferenceModel(model, "fp32", compile=True).packed_linears
