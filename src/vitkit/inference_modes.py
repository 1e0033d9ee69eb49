"""How a trained model runs at inference: full precision, bfloat16 weights, bf16-mixed, int8, compiled.

`InferenceModel(model, precision, compile)` wraps a ViT once and is then called like it: float images in,
fp32 logits out (or the representation, for a model without a head), whatever runs inside. The precisions
are vitkit.runtime's vocabulary; "auto" is the fastest mode on this machine (vitkit.fastest_mode), timed once at
`batch_size` where the CPU's features do not decide it. Each mode trades a little accuracy for speed; docs/results/ has
the measured speed and accuracy cost of each, and tests/test_inference_modes.py the tolerances.

- "fp32": the model as trained. On a CPU with AVX-512 its linear layers run through oneDNN with their weights
  packed once and the MLP's GELU fused (PackedLinear): the same arithmetic up to float rounding, faster. Elsewhere
  packed or as the model's own, whichever was timed faster on the model at its batch (fp32_linears_choice).
- "bf16": a bfloat16 copy of the weights made once; images are cast on the way in. On CPUs with
  AVX-512 BF16 or AMX the matmuls run at the bf16 rate and no per-call weight casts are paid; the
  linear layers are packed as in fp32.
- "bf16-mixed": fp32 weights, matmuls autocast to bf16 at every call (what training's bf16-mixed does).
- "int8": the linear layers dynamically quantised to int8: weights once, symmetric per output channel;
  activations per call, per tensor, over the full 8-bit range (weights on 7 bits on CPUs without VNNI, where
  8 bits on both sides would saturate the int8 kernels), with the MLP's GELU fused into its first linear. The
  attention between the projections runs in bf16 or fp32, whichever this machine runs faster (timed once where
  the CPU has bf16 dot products, else fp32). CPU only. With `int8_calibration` (vitkit.int8_calibration: each
  linear's input range measured once on sample images) the activations are rounded onto those fixed levels
  instead, and the MLP's first linear hands its GELU output to the second in uint8 (CalibratedInt8Linear; it needs
  oneDNN's int8 linear, which every x86 torch build has).
`compile=True` adds torch.compile on top of any mode (a slow first call, faster calls after). On a CPU every mode
compiles with its weights packed once at compile time (freezing) and C++ calling the kernels. Compiled, int8 is
captured whole: each linear's activation quantisation becomes tensor ops that fuse with the LayerNorm or attention
before it. S/16 at batch 1 ran 1.25x the eager int8 mode, at batch 16 1.08x (torch 2.14, 2 cores, AVX-512 VNNI;
docs/results/speed_2026-12-03_1231); compiled bf16 1.24x and 1.06x eager bf16 (Intel Xeon with AMX).
`keep_freed_memory=True` (CPU) lets the process reuse the memory it frees instead of faulting in fresh pages
for every batch (vitkit.allocator); it changes the C allocator's settings for the whole process.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn
from torch.nn import functional as F

from vitkit import fastest_mode
from vitkit.allocator import keep_freed_memory as _keep_freed_memory
from vitkit.int8_calibration import PATCH_PROJECTION, Int8Calibration, quantised_names
from vitkit.model.vit import Attention, Mlp
from vitkit.runtime import Precision, autocast, cpu_flags, cpu_has_native_bf16, cpu_has_vnni, resolve_precision

# The concrete modes ("auto" resolves to one of them).
MODES: tuple[str, ...] = ("fp32", "bf16", "bf16-mixed", "int8")


class InferenceModel(nn.Module):
    """`model` prepared for inference in one mode; the original is left as it was."""

    def __init__(self, model: nn.Module, precision: Precision = "auto", compile: bool = False,
                 keep_freed_memory: bool = False, batch_size: int = 16,
                 int8_attention: Literal["auto", "bf16", "fp32"] = "auto",
                 int8_calibration: Int8Calibration | None = None,
                 fp32_linears: Literal["auto", "packed", "aten"] = "auto", timing_cache: Path | None = None):
        """`timing_cache`: the directory whose record of timed choices "auto", `fp32_linears="auto"` and
        `int8_attention="auto"` read and extend (default vitkit.fastest_mode.cache_dir())."""
        super().__init__()
        if fp32_linears not in ("auto", "packed", "aten"):
            raise ValueError(f"unknown fp32_linears {fp32_linears!r}: choose auto, packed or aten")
        device = next(model.parameters()).device
        if int8_calibration is not None:
            int8_calibration.check(model)
        self.choice: fastest_mode.ModeChoice | None = None
        """Why "auto" became the precision it did (None when a precision was given)."""
        if precision == "auto":
            self.choice = fastest_inference_mode(model, device, batch_size, compile, cache=timing_cache,
                                                 int8_calibration=int8_calibration)
            precision = self.choice.precision
        precision = resolve_precision(precision, device)
        self.precision = precision
        self.device = device
        if keep_freed_memory and device.type == "cpu":
            _keep_freed_memory()
        self.input_dtype = dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        inner = copy.deepcopy(model).eval()
        if precision == "bf16":
            inner = inner.to(torch.bfloat16)
        # Compiled, inductor lays out the weights itself.
        packable = precision in ("fp32", "bf16") and not compile and packed_linears_available(device, dtype)
        if packable and precision == "fp32" and fp32_linears == "auto":
            fp32_linears = fp32_linears_choice(model, device, batch_size, cache=timing_cache).precision
        self.packed_linears = packable and (precision == "bf16" or fp32_linears != "aten")
        """Whether the linear layers run packed for oneDNN (PackedLinear), else as the model's own (aten's)."""
        if self.packed_linears:
            _swap_linears(inner, lambda linear, activation, *_: PackedLinear(linear, activation, dtype))
        elif precision == "int8":
            # The attention between the int8 projections is the one part int8 does not cover (about a fifth of
            # the S/16 forward in fp32): it runs in bf16 or fp32, whichever is faster here (int8_attention_choice).
            if int8_attention == "auto":
                # Timed eagerly even for a compiled model: compiling both forms to time them tripled the wait for
                # the first answer (S/16 batch 16, AMD EPYC: 79 s of timing before a 40 s compilation), and the
                # order held compiled (bf16 373 against fp32 390 ms there; eagerly bf16 also led).
                int8_attention = int8_attention_choice(model, device, batch_size, False, cache=timing_cache,
                                                       int8_calibration=int8_calibration).precision
            elif int8_attention not in ("bf16", "fp32"):
                raise ValueError(f"unknown int8_attention {int8_attention!r}: choose auto, bf16 or fp32")
            attention_dtype = torch.bfloat16 if int8_attention == "bf16" else torch.float32
            reduce_range = not cpu_has_vnni()
            if int8_calibration is not None and not onednn_int8_available():
                warnings.warn("this torch has no oneDNN int8 linear: the int8 calibration is not used and activations "
                              "are quantised at every call", stacklevel=2)
                int8_calibration = None
            if int8_calibration is not None:
                ranges = int8_calibration.ranges
                _swap_linears(inner, lambda linear, activation, is_qkv, name, feeds: CalibratedInt8Linear(
                    linear, ranges[name], activation, attention_dtype if is_qkv else torch.float32,
                    output_range=ranges[feeds] if feeds else None, for_compile=compile, reduce_range=reduce_range))
                if PATCH_PROJECTION in ranges and PATCH_PROJECTION in quantised_names(inner):
                    parent, _, attribute = PATCH_PROJECTION.rpartition(".")
                    setattr(inner.get_submodule(parent), attribute, Int8PatchProjection(
                        inner.get_submodule(PATCH_PROJECTION), ranges[PATCH_PROJECTION], for_compile=compile,
                        reduce_range=reduce_range))
            else:
                _swap_linears(inner, lambda linear, activation, is_qkv, *_: DynamicInt8Linear(
                    linear, reduce_range, activation, attention_dtype if is_qkv else torch.float32,
                    for_compile=compile))
        self.int8_calibrated = precision == "int8" and int8_calibration is not None
        """Whether int8's activation ranges are the calibration's (else measured at every call)."""
        self.model = inner
        self.run = torch.compile(inner) if compile else inner
        # Compiled on a CPU: freezing makes each weight's packing a constant, computed once (int8's traced forward
        # packs it at every call otherwise; fp32 and bf16 weights get oneDNN's blocked layout, as PackedLinear gives
        # them eagerly); the C++ wrapper calls the kernels without Python in between, much of the time at batch 1.
        # Without the two, compiled bf16 ran at 0.86x the eager mode at S/16 batch 1 and 0.89x at batch 16; with them
        # at 1.24x and 1.06x (Intel Xeon with AMX, 2 cores). Set around each call, which may compile
        # (torch.compile's `options` did not reach freezing, torch 2.14), and not process-wide, where freezing would
        # turn other compiled models' weights into constants.
        self.compile_settings = {"freezing": True, "cpp_wrapper": True} if compile and device.type == "cpu" else {}
        self.compiled = compile
        super().train(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, classes) fp32 logits."""
        images = images.to(self.device, self.input_dtype)
        with autocast(self.device, self.precision), _inductor_settings(self.compile_settings):
            return self.run(images).float()

    def train(self, mode: bool = True) -> InferenceModel:
        if mode:
            raise ValueError("an InferenceModel is for inference only; train the original model")
        return super().train(False)

    def extra_repr(self) -> str:
        calibrated = ", int8 calibrated" if self.int8_calibrated else ""
        packed = ", linears packed" if self.packed_linears else ""
        return f"precision={self.precision}, compiled={self.compiled}{packed}{calibrated}"


def _inductor_settings(settings: dict) -> contextlib.AbstractContextManager:
    """torch.compile's inductor settings `settings` for the duration of a call (none: nothing)."""
    if not settings:
        return contextlib.nullcontext()
    import torch._inductor.config  # loaded only where a model is compiled
    return torch._inductor.config.patch(settings)


def fastest_inference_mode(model: nn.Module, device: torch.device, batch_size: int = 16, compile: bool = False,
                           cache: Path | None = None,
                           int8_calibration: Int8Calibration | None = None) -> fastest_mode.ModeChoice:
    """The precision "auto" stands for with `model` on `device` at `batch_size` (vitkit.fastest_mode), remembered in
    `cache` (a directory; default vitkit.fastest_mode.cache_dir()). With `int8_calibration`, int8 is timed in its
    calibrated form."""

    def build(precision: str, images: Callable[[], torch.Tensor]) -> Callable[[], object]:
        runner = InferenceModel(model, precision, compile, batch_size=batch_size, int8_calibration=int8_calibration,
                                timing_cache=cache)
        return lambda: runner(images())

    purpose = {"int8_calibrated": True} if int8_calibration is not None else None
    return fastest_mode.choose_on_model(model, device, batch_size, fastest_mode.candidates(device), build, compile,
                                        purpose=purpose, cache=cache)


def int8_attention_choice(model: nn.Module, device: torch.device, batch_size: int = 16, compile: bool = False,
                          cache: Path | None = None,
                          int8_calibration: Int8Calibration | None = None) -> fastest_mode.ModeChoice:
    """Whether int8 mode runs the attention between its projections in bf16 or fp32 on this machine: fp32 on a CPU
    without bf16 dot products (or a model without attention); else both are timed once on the model, as "auto"'s
    modes are (vitkit.fastest_mode), and the faster remembered. bf16 led on the AMD EPYC (2.63x the fp32 model's
    speed with it, 2.45x without); on an Intel Xeon without AMX, whose bf16 matmuls ran at half of fp32's speed,
    fp32 led (S/16: 22.6 against 19.0 images/s at batch 1, 34.4 against 31.9 at batch 16)."""
    if not cpu_has_native_bf16() or not any(isinstance(module, Attention) for module in model.modules()):
        return fastest_mode.ModeChoice("fp32", "no bf16 dot products on this CPU, or no attention in the model")

    def build(attention: str, images: Callable[[], torch.Tensor]) -> Callable[[], object]:
        runner = InferenceModel(model, "int8", compile, batch_size=batch_size, int8_attention=attention,
                                int8_calibration=int8_calibration, timing_cache=cache)
        return lambda: runner(images())

    purpose = {"int8_attention": True, **({"int8_calibrated": True} if int8_calibration is not None else {})}
    return fastest_mode.choose_on_model(model, device, batch_size, ("bf16", "fp32"), build, compile,
                                        purpose=purpose, cache=cache)


def fp32_linears_choice(model: nn.Module, device: torch.device, batch_size: int = 16,
                        cache: Path | None = None) -> fastest_mode.ModeChoice:
    """Whether fp32 mode runs its linear layers packed for oneDNN (PackedLinear: "packed") or as the model's own
    (aten's matmul, MKL's sgemm: "aten"). Packed on CPUs with AVX-512, where it ran faster at S/16 (PackedLinear's
    timings); elsewhere both are timed once on the model, as "auto"'s modes are (vitkit.fastest_mode), and the faster
    remembered. On an AMD EPYC with AVX2 only the order depends on the batch: at S/16 batch 16 aten's ran 1.06-1.08x
    the packed ones, at batch 1 0.90-1.01x."""
    if gelu_fuses_into_matmul():  # the AVX-512 test: where packing was measured faster
        return fastest_mode.ModeChoice("packed", "packed linears ran faster on CPUs with AVX-512")

    def build(linears: str, images: Callable[[], torch.Tensor]) -> Callable[[], object]:
        runner = InferenceModel(model, "fp32", batch_size=batch_size, fp32_linears=linears)
        return lambda: runner(images())

    return fastest_mode.choose_on_model(model, device, batch_size, ("packed", "aten"), build,
                                        purpose={"fp32_linears": True}, cache=cache)


class PackedLinear(nn.Module):
    """act(x W^T + b) by oneDNN, with the weight reordered once into oneDNN's blocked layout (fp32 or bf16).

    aten's linear gives the GEMM the plain (out, in) weight at every call. With the weight packed once,
    and the MLP's GELU applied as the matmul writes its output, S/16's fp32 layers at batch 16 took
    14.4 ms (qkv), 4.9 (proj), 20.6 (fc1 + GELU) and 18.1 (fc2) where aten took 20.6, 5.9, 22.8 and 25.7
    (torch 2.14, 2 cores, AVX-512); the results differ from aten's by float rounding only (about 1e-5 of
    the output's scale). This is what torch.compile's freezing does for a compiled model, here without
    compiling.
    """

    def __init__(self, linear: nn.Linear, activation: Literal["none", "gelu"] = "none",
                 dtype: torch.dtype = torch.float32, gelu_in_matmul: bool | None = None):
        super().__init__()
        _check_activation(activation)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype))  # opaque, (out, in)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation, self.dtype = activation, dtype
        self.gelu_in_matmul = gelu_fuses_into_matmul() if gelu_in_matmul is None else gelu_in_matmul
        """Whether a GELU is applied by oneDNN as it writes the output (else by aten's GELU after it, in place)."""

    @torch.compiler.disable  # an opaque oneDNN tensor, which dynamo need not trace
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu" and not self.gelu_in_matmul:
            return torch.ops.aten.gelu_(torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], ""))
        algorithm = "none" if self.activation == "gelu" else ""  # GELU's "none": the exact (erf) form
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.activation, [], algorithm)

    def extra_repr(self) -> str:
        gelu = "" if self.activation == "none" else f", gelu_in_matmul={self.gelu_in_matmul}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"
                f"{gelu}, dtype={self.dtype}")


def gelu_fuses_into_matmul() -> bool:
    """Whether oneDNN's matmul applies the MLP's GELU faster than a GELU after it: on CPUs with AVX-512. Without it
    (AVX2), oneDNN's GELU as it writes the output cost more than aten's pass afterwards: S/16's fc1 at batch 1 took
    2.24-2.38 ms with it and 1.70-1.79 ms with aten's after (AMD EPYC without AVX-512, torch 2.14, 2 cores)."""
    return "avx512f" in cpu_flags()


def _check_activation(activation: str) -> None:
    """The activations both kernels fuse into the matmul."""
    if activation not in ("none", "gelu"):
        raise ValueError(f"unknown activation {activation!r}: choose none or gelu")


def packed_linears_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PackedLinear can run here: a CPU, a torch with oneDNN, and native bf16 for bf16."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and (dtype == torch.float32 or cpu_has_native_bf16()))


class DynamicInt8Linear(nn.Module):
    """act(x W^T + b) on int8 kernels: int8 weights quantised once, activations quantised at every call.

    Weights: symmetric, one scale per output channel, on -127..127, or -63..63 where `reduce_range` (CPUs
    without VNNI, whose int8 multiply-adds sum pairs of uint8 x int8 products in 16 bits: 2 x 255 x 127 saturates,
    2 x 255 x 64 does not). Activations: one scale and zero point per call, spanning [min(x, 0), max(x, 0)] over 256
    levels. torch.ao's quantize_dynamic uses per-tensor weight scales and 128 activation levels; per-channel scales
    and the full 8 bits lift top-1 agreement with fp32 on the default Fashion-MNIST model from 99.26% to 99.67%
    (docs/results/inference_accuracy_*). Without VNNI the weights give up the bit rather than the activations, as
    ONNX Runtime's `reduce_range` does: with 128 activation levels a fast-preset model kept only 98.76% agreement
    (AMD EPYC with AVX2 only; inference_accuracy_2026-12-07_0432), under the 99.5% bound.

    Two kernels compute the same rounded product. With oneDNN present and VNNI, or compiled, oneDNN's int8 linear
    runs with the bias, the optional GELU and the output dtype folded into the matmul; measured at S/16 batch 16
    (torch 2.14, 2 cores, AVX-512 VNNI) its matmul reaches 770-860 int8 GOP/s, fbgemm's dynamic linear 570-650
    including its own quantisation, and the fused GELU saves a pass over the largest activation. In one
    interleaved comparison the int8 S/16 forward ran at 2.35x the fp32 model's speed with fbgemm, 2.45x with
    oneDNN, and 2.63x with oneDNN and the attention in bf16. Otherwise (eager calls without VNNI, or no oneDNN)
    fbgemm's dynamic linear, which quantises internally, with GELU and the cast applied after it.

    `for_compile=True` builds the oneDNN kernel's module for torch.compile: it keeps the int8 weight for the
    traced form (`_traced_forward`), which compiling with freezing packs once, and packs it for eager calls only
    if one comes.
    """

    def __init__(self, linear: nn.Linear, reduce_range: bool, activation: Literal["none", "gelu"] = "none",
                 out_dtype: torch.dtype = torch.float32, kernel: Literal["auto", "onednn", "fbgemm"] = "auto",
                 for_compile: bool = False):
        super().__init__()
        _check_activation(activation)
        if kernel not in ("auto", "onednn", "fbgemm"):
            raise ValueError(f"unknown int8 kernel {kernel!r}: choose auto, onednn or fbgemm")
        if kernel == "onednn" and not onednn_int8_available():
            raise ValueError("the onednn int8 kernel needs a torch built with oneDNN's int8 linear; use kernel='auto' "
                             "or 'fbgemm'")
        weight = linear.weight.detach().float()  # (out, in)
        self.weight_levels = 63 if reduce_range else 127
        """The largest weight magnitude after rounding: weights are rounded onto -weight_levels..weight_levels."""
        scales = (weight.abs().amax(dim=1) / self.weight_levels).clamp_min(1e-12)  # (out,), symmetric
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation, self.out_dtype = activation, out_dtype
        if kernel == "auto":
            # Without VNNI eager calls go to fbgemm, which quantises inside its kernel: S/16's linears at batch 1
            # ran at 194-243 GOP/s there against oneDNN's 143-194 after a separate quantisation (AMD EPYC, AVX2).
            # Compiled, that quantisation fuses with the op before it, and oneDNN's matmul alone ran at 243-275.
            kernel = "onednn" if onednn_int8_available() and (for_compile or not reduce_range) else "fbgemm"
        self.kernel = kernel
        if self.kernel == "onednn":
            # `for_compile`: the int8 (out, in) weight that the traced form packs, a buffer so that freezing makes it
            # (and its packing) a constant; else the packed weight for the eager form. One of the two, not both.
            weight_int8 = _round_to_int8(weight, scales, self.weight_levels)
            self.register_buffer("weight_int8", weight_int8 if for_compile else None, persistent=False)
            self.packed = None if for_compile else torch.ops.onednn.qlinear_prepack(weight_int8, None)
            self.weight_scales = scales
            self.weight_zero_points = torch.zeros(self.out_features, dtype=torch.int32)  # int32, as inductor keeps them
            self.bias = bias
        else:  # fbgemm's linear stays opaque to torch.compile: a graph break, compiled or not
            self.register_buffer("weight_int8", None, persistent=False)
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            with _quantised_tensors_allowed():
                qweight = torch.quantize_per_channel(weight, scales.double(), zero_points, axis=0, dtype=torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_int8 is not None and torch.compiler.is_compiling():
            return self._traced_forward(x)
        return self._eager_forward(x)

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The oneDNN path as tensor ops that torch.compile captures whole: the activations' range and rounding
        fuse with the LayerNorm or attention before them, and with freezing the weight's packing becomes a
        constant. The same levels as `_quantise_activations`; rounding ties may fall the other way."""
        rows = x.reshape(-1, self.in_features).float()  # (N, in)
        low, high = rows.amin().clamp(max=0.0), rows.amax().clamp(min=0.0)
        scale = torch.where(high > low, (high - low) / 255, 1.0)  # an all-zero input: any scale represents it
        zero_point = torch.round(-low / scale).clamp(0, 255).to(torch.int32)
        x_uint8 = (torch.round(rows / scale) + zero_point).clamp(0, 255).to(torch.uint8)
        packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
        out = torch.ops.onednn.qlinear_pointwise.tensor(
            x_uint8, scale, zero_point, packed, self.weight_scales, self.weight_zero_points, self.bias,
            1.0, 0, self.out_dtype, self.activation, [], "none")  # (N, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    @torch.compiler.disable  # opaque kernels and a storage view that dynamo need not trace
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm":
            out = torch.ops.quantized.linear_dynamic(x.float(), self.packed, False)  # (..., out); 256 levels
            return (F.gelu(out) if self.activation == "gelu" else out).to(self.out_dtype)
        if self.packed is None:
            # Built for compile but called eagerly: dynamo runs a frame eagerly once it has compiled it too often
            # (its recompile limit, 8 in torch 2.14; each compiled model is another entry), so pack now.
            self.packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
        rows = x.reshape(-1, self.in_features)  # (N, in)
        x_uint8, x_scale, x_zero_point = _quantise_activations(rows)
        out = torch.ops.onednn.qlinear_pointwise(
            x_uint8, x_scale, x_zero_point, self.packed, self.weight_scales, self.weight_zero_points, self.bias,
            1.0, 0, self.out_dtype, self.activation, [], "none")  # (N, out), dequantised, + bias, activation
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, "
                f"weight_levels={self.weight_levels}, activation={self.activation}, out_dtype={self.out_dtype}")


class CalibratedInt8Linear(DynamicInt8Linear):
    """act(x W^T + b) on oneDNN's int8 kernel, with the activations' range fixed beforehand (vitkit.int8_calibration)
    instead of measured at every call: the weights as DynamicInt8Linear's, the input rounded to 256 levels spanning
    `input_range`, values outside it clipped.

    With `output_range`, the output leaves in uint8, rounded to 256 levels over that range inside the matmul: the
    input of the next linear, which takes uint8 as it is. The MLP's GELU output, four times the width and the largest
    activation, then is never written in float nor read again to be quantised. At S/16 batch 16 (eager, AVX-512
    VNNI) the ranges alone were worth about 1.03x the dynamic int8 forward, the uint8 hand-over 1.10x with them;
    compiled, 1.02x and 1.19x.

    With `reduce_range` (CPUs without VNNI) the weights keep 7 bits, as the dynamic mode's do, and oneDNN's AVX2
    kernel computes the same exact product. There (AMD EPYC with AVX2 only, S/16, interleaved against eager dynamic
    int8) the calibrated form ran 1.11x at batch 16 and 0.91-0.95x at batch 1, where oneDNN's int8 matmul is slower
    than fbgemm's; compiled 1.14x and 1.03x. A fast-preset model kept 99.52% top-1 agreement with fp32
    (docs/results/inference_accuracy_2026-12-07_0547; dynamic int8 99.55%).
    """

    def __init__(self, linear: nn.Linear, input_range: tuple[float, float],
                 activation: Literal["none", "gelu"] = "none", out_dtype: torch.dtype = torch.float32,
                 output_range: tuple[float, float] | None = None, for_compile: bool = False,
                 reduce_range: bool = False):
        super().__init__(linear, reduce_range, activation, out_dtype, kernel="onednn", for_compile=for_compile)
        self.input_scale, self.input_zero_point = uint8_levels(*input_range)
        self.emits_uint8 = output_range is not None
        self.output_scale, self.output_zero_point = uint8_levels(*output_range) if output_range else (1.0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        if rows.dtype != torch.uint8:  # uint8: already rounded to this layer's levels by the linear before it
            rows = self._quantise(rows)
        if torch.compiler.is_compiling():
            packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)  # a constant under freezing
        else:
            if self.packed is None:  # built for compile, called eagerly (see DynamicInt8Linear._eager_forward)
                self.packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
            packed = self.packed
        out = torch.ops.onednn.qlinear_pointwise(
            rows, self.input_scale, self.input_zero_point, packed, self.weight_scales, self.weight_zero_points,
            self.bias, self.output_scale, self.output_zero_point, torch.uint8 if self.emits_uint8 else self.out_dtype,
            self.activation, [], "none")  # (N, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _quantise(self, rows: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # tensor ops, which inductor fuses with the op before
            levels = torch.round(rows.float() / self.input_scale) + self.input_zero_point
            return levels.clamp(0, 255).to(torch.uint8)
        with _quantised_tensors_allowed():
            quantised = torch.quantize_per_tensor(rows.float(), self.input_scale, self.input_zero_point, torch.quint8)
        return _uint8_bytes(quantised)

    def extra_repr(self) -> str:
        output = f", output uint8 scale={self.output_scale:.4g}" if self.emits_uint8 else ""
        return f"{super().extra_repr()}, input scale={self.input_scale:.4g} zero_point={self.input_zero_point}{output}"


class Int8PatchProjection(nn.Module):
    """The patch embedding's convolution (stride = kernel, vitkit.int8_calibration.is_patch_projection) as a
    calibrated int8 linear over the flattened patches: (B, C, H, W) -> (B, D, H / P, W / P), as the convolution.
    In float it is the one matmul int8 mode left in fp32, about 3% of the compiled calibrated S/16 forward; in an
    interleaved A/B (AMD EPYC, 2 cores) this form made that forward 1.04x faster at batch 16 and 1.02x at batch 1
    (eager: 1.03x at batch 16, 0.98x at batch 1). It costs a little accuracy: top-1 agreement with fp32 on the
    Fashion-MNIST model went from 99.70% to 99.60% (the bound: 99.5%)."""

    def __init__(self, conv: nn.Conv2d, input_range: tuple[float, float], for_compile: bool = False,
                 reduce_range: bool = False):
        super().__init__()
        width, channels, height, breadth = conv.weight.shape  # (D, C, P, P)
        as_linear = nn.Linear(channels * height * breadth, width, bias=conv.bias is not None)
        with torch.no_grad():
            as_linear.weight.copy_(conv.weight.reshape(width, -1))  # (D, C P P), C outermost as the patches below
            if conv.bias is not None:
                as_linear.bias.copy_(conv.bias)
        self.patch = (height, breadth)
        self.linear = CalibratedInt8Linear(as_linear, input_range, for_compile=for_compile, reduce_range=reduce_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        (ph, pw), (gh, gw) = self.patch, (h // self.patch[0], w // self.patch[1])
        patches = x[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw)  # a conv drops the ragged edge too
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)  # (B, N, C P P)
        return self.linear(patches).reshape(b, gh, gw, -1).permute(0, 3, 1, 2)  # (B, D, gh, gw)


def uint8_levels(low: float, high: float) -> tuple[float, int]:
    """The scale and zero point of 256 levels spanning [min(low, 0), max(high, 0)] (an all-zero range: scale 1)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255 or 1.0
    return scale, min(max(round(-low / scale), 0), 255)


def onednn_int8_available() -> bool:
    """Whether this torch has oneDNN's int8 linear (the kernel inductor's x86 quantisation emits)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def _round_to_int8(weight: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    """(out, in) float weights -> int8 on -levels..levels, symmetric with one scale per output channel."""
    return (weight / scales[:, None]).round().clamp(-levels, levels).to(torch.int8)


def _quantise_activations(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(N, in) float -> uint8 over 256 levels spanning [min(x, 0), max(x, 0)], with its scale and zero point."""
    scale, zero_point = uint8_levels(*(v.item() for v in torch.aminmax(x)))
    with _quantised_tensors_allowed():
        quantised = torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8)  # one vectorised pass
    return _uint8_bytes(quantised), scale, zero_point


def _uint8_bytes(quantised: torch.Tensor) -> torch.Tensor:
    """A quint8 tensor's bytes as a plain uint8 tensor, which oneDNN takes. int_repr() would copy them: 1.1 ms per
    call for the MLP's second input at S/16 batch 16, 7% of the whole forward."""
    return torch.empty(0, dtype=torch.uint8).set_(quantised.untyped_storage(), quantised.storage_offset(),
                                                  quantised.shape, quantised.stride())


@contextlib.contextmanager
def _quantised_tensors_allowed():
    """Silences torch 2.14's deprecation of quantised tensors: fbgemm's kernels and the fastest uint8
    rounding still go through them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated.*")
        yield


def _swap_linears(module: nn.Module, make: Callable[..., nn.Module], prefix: str = "") -> None:
    """Replace every nn.Linear inside `module` by make(linear, activation, is_qkv, name, feeds), in place.

    An MLP's GELU moves into its first linear (activation "gelu", the MLP's own GELU becomes an identity);
    `is_qkv` marks an attention block's input projection, whose output dtype sets the attention's. `name` is the
    linear's qualified name in `module`; `feeds` is the name of the linear that takes its output unchanged (the MLP's
    second, after a fused GELU), else None.
    """
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, Mlp) and isinstance(child.act, nn.GELU) and child.act.approximate == "none":
            child.fc1 = make(child.fc1, "gelu", False, f"{path}.fc1", f"{path}.fc2")
            child.act = nn.Identity()
            child.fc2 = make(child.fc2, "none", False, f"{path}.fc2", None)
        elif isinstance(child, Attention):
            child.qkv = make(child.qkv, "none", True, f"{path}.qkv", None)
            child.proj = make(child.proj, "none", False, f"{path}.proj", None)
        elif isinstance(child, nn.Linear):
            setattr(module, name, make(child, "none", False, path, None))
        else:
            _swap_linears(child, make, path + ".")
