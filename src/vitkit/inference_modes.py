"""How a trained model runs at inference: full precision, bfloat16 weights, bf16 autocast, int8, compiled.

`InferenceModel(model, precision, compile)` wraps a ViT once and is then called like it: float images in,
fp32 logits out, whatever runs inside. Each mode trades a little accuracy for speed; docs/results/ has
the measured speed and accuracy cost of each, and tests/test_inference_modes.py the tolerances.

- "fp32": the model as trained.
- "bf16": a bfloat16 copy of the weights made once; images are cast on the way in. On CPUs with
  AVX-512 BF16 or AMX the matmuls run at the bf16 rate and no per-call weight casts are paid.
- "bf16-autocast": fp32 weights, matmuls autocast to bf16 at every call (what training's bf16 does).
- "int8": the linear layers dynamically quantised to int8: weights once, symmetric per output channel;
  activations per call, per tensor, over the full 8-bit range on CPUs with VNNI (7 bits elsewhere, where
  the int8 kernels would saturate). CPU only.
`compile=True` adds torch.compile on top of any mode (a slow first call, faster calls after).
`keep_freed_memory=True` (CPU) lets the process reuse the memory it frees instead of faulting in fresh pages
for every batch (vitkit.allocator); it changes the C allocator's settings for the whole process.
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
from torch import nn

from vitkit.allocator import keep_freed_memory as _keep_freed_memory
from vitkit.train.hardware import cpu_has_vnni

Precision = Literal["fp32", "bf16", "bf16-autocast", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "bf16-autocast", "int8")


class InferenceModel(nn.Module):
    """`model` prepared for inference in one mode; the original is left as it was."""

    def __init__(self, model: nn.Module, precision: Precision = "fp32", compile: bool = False,
                 keep_freed_memory: bool = False):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        device = next(model.parameters()).device
        if precision == "int8" and device.type != "cpu":
            raise ValueError(f"precision int8 (dynamic quantisation) runs on the CPU only, not on {device}; "
                             "use bf16 on a GPU")
        self.precision = precision
        self.device = device
        if keep_freed_memory and device.type == "cpu":
            _keep_freed_memory()
        inner = copy.deepcopy(model).eval()
        if precision == "bf16":
            inner = inner.to(torch.bfloat16)
        elif precision == "int8":
            _quantise_linears(inner, reduce_range=not cpu_has_vnni())
        self.model = inner
        self.input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.run = torch.compile(inner) if compile else inner
        self.compiled = compile
        super().train(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, classes) fp32 logits."""
        images = images.to(self.device, self.input_dtype)
        if self.precision == "bf16-autocast":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.run(images).float()
        return self.run(images).float()

    def train(self, mode: bool = True) -> InferenceModel:
        if mode:
            raise ValueError("an InferenceModel is for inference only; train the original model")
        return super().train(False)

    def extra_repr(self) -> str:
        return f"precision={self.precision}, compiled={self.compiled}"


class DynamicInt8Linear(nn.Module):
    """An nn.Linear run by PyTorch's int8 kernels (fbgemm): int8 weights, activations quantised per call.

    torch.ao's quantize_dynamic does the same with per-tensor weight scales and, always, 7-bit activations
    (`reduce_range`), a guard for CPUs whose int8 multiply-add saturates in 16 bits. Per-channel scales, and
    the full 8 bits where VNNI accumulates in 32 bits, halve the logit error of a small random model and
    lift top-1 agreement with fp32 on the default Fashion-MNIST model from 99.26% to 99.67%
    (docs/results/inference_accuracy_*).
    """

    def __init__(self, linear: nn.Linear, reduce_range: bool):
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()  # (out,), symmetric
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantised tensors are deprecated, but fbgemm's int8 kernels take only them
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated.*")
            qweight = torch.quantize_per_channel(weight, scales, zero_points, axis=0, dtype=torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.reduce_range = reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, reduce_range={self.reduce_range}"


def _quantise_linears(module: nn.Module, reduce_range: bool) -> None:
    """Replace every nn.Linear inside `module` by a DynamicInt8Linear, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, DynamicInt8Linear(child, reduce_range))
        else:
            _quantise_linears(child, reduce_range)
