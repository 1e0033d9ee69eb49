"""When and how a training step is compiled.

torch.compile costs about 45 s of compilation on the 2-core development machine and then makes each step about
1.2x faster, so "auto" compiles only runs of thousands of steps.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

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
