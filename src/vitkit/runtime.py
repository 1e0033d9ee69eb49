"""Where and in what number format vitkit computes: the device, the CPU's matrix features, and precision.

One precision vocabulary serves every command and the Python API:

| precision    | weights | matmuls | training | inference |
|--------------|---------|---------|----------|-----------|
| "fp32"       | fp32    | fp32    | yes      | yes       |
| "bf16-mixed" | fp32    | bf16 (autocast, at every call) | yes | yes |
| "bf16"       | bf16 (cast once) | bf16 | no: training keeps fp32 weights | yes |
| "int8"       | int8 (quantised once) | int8, dynamic activations | no | yes, CPU only |
| "auto"       | by device | | the faster of bf16-mixed and fp32 | the fastest mode in the bound |

bf16 pays only where the hardware multiplies bf16 natively, and not always there: on the AMD EPYC's AVX-512 BF16,
matmuls ran 2.4-3x faster than fp32 (docs/results/speed_*), on an Intel Xeon with AVX-512 BF16 but no AMX at half
of fp32's speed, and CPUs with neither emulate bf16 and get slower. So "auto" decides by the CPU's features where
they settle it (no bf16 dot products: fp32) and otherwise by timing the model once (vitkit.fastest_mode), in
training between bf16-mixed and fp32, at inference among bf16, int8 and fp32. `resolve_precision` is the
features-only rule, for where no model is at hand.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16-mixed", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16-mixed", "bf16", "int8")
TRAINING_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16-mixed")


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo, name -> value (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU as /proc/cpuinfo lists them (empty where it cannot be read)."""
    return frozenset(cpu_info().get("flags", "").split())


def cpu_model_name() -> str:
    """This CPU's model name as /proc/cpuinfo gives it (empty where it cannot be read)."""
    return cpu_info().get("model name", "")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86 AVX-512 BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot products that accumulate in 32 bits (AVX-512 VNNI, AVX-VNNI or AMX)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_int8_kernels() -> bool:
    """Whether int8 inference has fast kernels on this CPU: int8 dot products (VNNI, AMX), or AVX2, on which fbgemm's
    int8 linear runs with 7-bit weights (8-bit weights and activations would saturate its 16-bit multiply-adds)."""
    return cpu_has_vnni() or "avx2" in cpu_flags()


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA if present, else the CPU), 'cpu' or 'cuda[:N]', checked against what this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively (the one test behind "auto")."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> str:
    """The concrete precision for `device`: "auto" resolved, and a precision the context cannot run refused."""
    allowed = TRAINING_PRECISIONS if training else PRECISIONS
    if precision not in allowed:
        if training and precision in PRECISIONS:
            raise ValueError(f"precision {precision!r} is for inference only: training keeps fp32 weights; "
                             "use bf16-mixed (bf16 matmuls on fp32 weights), fp32 or auto")
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(allowed)}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision int8 (dynamic quantisation) runs on the CPU only, not on {device}; "
                         "use bf16 on a GPU")
    if precision != "auto":
        return precision
    if not native_bf16(device):
        return "fp32"
    return "bf16-mixed" if training else "bf16"


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision: bf16 matmuls for "bf16-mixed", nothing otherwise."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision not in PRECISIONS or precision == "auto":
        raise ValueError(f"autocast needs a resolved precision, got {precision!r}")
    return contextlib.nullcontext()
