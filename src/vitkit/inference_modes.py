"""How a trained model runs at inference: full precision, bfloat16 weights, bf16 autocast, int8, compiled.

`InferenceModel(model, precision, compile)` wraps a ViT once and is then called like it: float images in,
fp32 logits out, whatever runs inside. Each mode trades a little accuracy for speed; docs/results/ has
the measured speed and accuracy cost of each, and tests/test_inference_modes.py the tolerances.

- "fp32": the model as trained.
- "bf16": a bfloat16 copy of the weights made once; images are cast on the way in. On CPUs with
  AVX-512 BF16 or AMX the matmuls run at the bf16 rate and no per-call weight casts are paid.
- "bf16-autocast": fp32 weights, matmuls autocast to bf16 at every call (what training's bf16 does).
- "int8": the linear layers dynamically quantised to int8 (weights once, activations per batch),
  for CPUs with VNNI. CPU only.
`compile=True` adds torch.compile on top of any mode (a slow first call, faster calls after).
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "bf16-autocast", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "bf16-autocast", "int8")


class InferenceModel(nn.Module):
    """`model` prepared for inference in one mode; the original is left as it was."""

    def __init__(self, model: nn.Module, precision: Precision = "fp32", compile: bool = False):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        device = next(model.parameters()).device
        if precision == "int8" and device.type != "cpu":
            raise ValueError(f"precision int8 (dynamic quantisation) runs on the CPU only, not on {device}; "
                             "use bf16 on a GPU")
        self.precision = precision
        self.device = device
        inner = copy.deepcopy(model).eval()
        if precision == "bf16":
            inner = inner.to(torch.bfloat16)
        elif precision == "int8":
            with warnings.catch_warnings():  # torch.ao's eager quantisation still works but warns it is deprecated
                warnings.filterwarnings("ignore", message=".*deprecated.*")
                inner = torch.ao.quantization.quantize_dynamic(inner, {nn.Linear}, dtype=torch.qint8)
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
