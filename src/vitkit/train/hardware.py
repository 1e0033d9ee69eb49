"""What "auto" means for training precision and compilation on the machine at hand.

bf16 autocast pays only where the hardware multiplies bf16 natively: on CPUs with AVX-512 BF16 or AMX
matmuls run 2.4-3x faster than fp32 (measured on the 2-core development machine, docs/results/speed_*),
while CPUs without them emulate bf16 and get slower. torch.compile costs about 45 s of compilation on
that machine and then makes each step about 1.2x faster, so it pays only for runs of thousands of steps.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch._functorch.config as functorch_config

# A run this long recovers the compilation time (45 s at a 1.2x faster step of about 0.1 s needs ~2,500 steps).
COMPILE_MIN_STEPS = 3000

# The share of its activations a compiled training step may keep for backward. At 1.0 (torch's default) the
# compiler stores everything backward reads; just below it, it recomputes cheap elementwise results (LayerNorm's
# normalised input, GELU, casts) in backward instead. At the default Fashion-MNIST shape (batch 128) the compiled
# graph then keeps 64 instead of 101 MiB for backward, and the step was no slower (1.03x in one interleaved
# comparison: fewer bytes to write and read). torch 2.14, the 2-core machine; benchmarks/speed.py measures both.
TRAINING_ACTIVATION_BUDGET = 0.95


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86 AVX-512 BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot products that accumulate in 32 bits (AVX-512 VNNI, AVX-VNNI or AMX)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the device computes bf16 natively, else "fp32"; other values unchanged."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def resolve_compile(compile: bool | str, device: torch.device, total_steps: int) -> bool:
    """"auto" -> compile runs of at least COMPILE_MIN_STEPS steps (on a CPU only if a C++ compiler is there)."""
    if compile != "auto":
        return bool(compile)
    if total_steps < COMPILE_MIN_STEPS:
        return False
    if device.type == "cpu":
        return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))
    return device.type == "cuda"


def compile_for_training(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """torch.compile `module` for training steps: called like the module, it compiles on its first call with
    TRAINING_ACTIVATION_BUDGET in force, so the compiled step recomputes cheap activations instead of storing them."""
    compiled = torch.compile(module)

    def forward(*args, **kwargs):
        # The budget is read when a graph is compiled (on a first call, or on a recompilation); setting it per
        # call keeps it scoped to vitkit's training graphs instead of changing torch's default for the process.
        with functorch_config.patch(activation_memory_budget=TRAINING_ACTIVATION_BUDGET):
            return compiled(*args, **kwargs)

    return forward
