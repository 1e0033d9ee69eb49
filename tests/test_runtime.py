"""What "auto" precision and compilation resolve to, and the one precision vocabulary."""

from __future__ import annotations

import torch

import pytest

from vitkit import runtime
from vitkit.runtime import autocast, resolve_precision
from vitkit.train import compile as compile_policy
from vitkit.train.compile import COMPILE_MIN_STEPS, resolve_compile

CPU = torch.device("cpu")


def test_explicit_precision_is_kept_and_auto_follows_the_cpu(monkeypatch):
    for precision in ("fp32", "bf16-mixed", "bf16", "int8"):
        assert resolve_precision(precision, CPU) == precision
    assert resolve_precision("bf16-mixed", CPU, training=True) == "bf16-mixed"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    # "auto" is one rule: bf16 arithmetic where native; training keeps fp32 weights, inference casts them
    assert resolve_precision("auto", CPU, training=True) == "bf16-mixed"
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", CPU, training=True) == "fp32"
    assert resolve_precision("auto", CPU) == "fp32"


def test_precisions_a_context_cannot_run_are_refused_with_the_reason():
    for precision in ("bf16", "int8"):
        with pytest.raises(ValueError, match=f"{precision}.*inference only.*bf16-mixed"):
            resolve_precision(precision, CPU, training=True)
    with pytest.raises(ValueError, match="unknown precision 'fp16'.*auto, fp32, bf16-mixed, bf16, int8"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="resolved precision"):
        autocast(CPU, "auto")


def test_autocast_runs_matmuls_in_bf16_only_for_bf16_mixed():
    a = torch.randn(4, 4)
    with autocast(CPU, "bf16-mixed"):
        assert (a @ a).dtype == torch.bfloat16
    for precision in ("fp32", "bf16", "int8"):
        with autocast(CPU, precision):
            assert (a @ a).dtype == torch.float32


def test_bf16_and_vnni_are_read_from_the_cpu_flags(monkeypatch, tmp_path):
    real_path = runtime.Path
    cases = [("fpu avx512f avx512_bf16 sse", True, False), ("fpu amx_bf16 amx_int8", True, True),
             ("fpu avx2 avx512f avx512_vnni", False, True), ("fpu avx2 avx_vnni", False, True),
             ("fpu avx2 avx512f", False, False)]
    try:
        for flags, bf16, vnni in cases:
            info = tmp_path / "cpuinfo"
            info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
            monkeypatch.setattr(runtime, "Path", lambda _: real_path(info))
            runtime.cpu_info.cache_clear()
            assert (runtime.cpu_has_native_bf16(), runtime.cpu_has_vnni()) == (bf16, vnni), flags
        monkeypatch.setattr(runtime, "Path", lambda _: real_path(tmp_path / "missing"))
        runtime.cpu_info.cache_clear()
        assert runtime.cpu_flags() == frozenset()
        assert not runtime.cpu_has_native_bf16() and not runtime.cpu_has_vnni()
    finally:
        runtime.cpu_info.cache_clear()  # the next caller reads the real CPU again


def test_auto_compiles_only_long_runs_with_a_compiler(monkeypatch):
    assert resolve_compile(True, CPU, 10) is True
    assert resolve_compile(False, CPU, 10**6) is False
    monkeypatch.setattr(compile_policy.shutil, "which", lambda name: "/usr/bin/" + name)
    assert resolve_compile("auto", CPU, COMPILE_MIN_STEPS - 1) is False
    assert resolve_compile("auto", CPU, COMPILE_MIN_STEPS) is True
    monkeypatch.setattr(compile_policy.shutil, "which", lambda name: None)
    assert resolve_compile("auto", CPU, COMPILE_MIN_STEPS) is False


def test_training_compilation_runs_under_the_activation_budget_and_restores_the_default(monkeypatch):
    import torch._functorch.config as functorch_config

    default = functorch_config.activation_memory_budget
    seen = []

    def fake_compile(module):  # records what a compilation on this call would read
        return lambda x: seen.append(functorch_config.activation_memory_budget) or module(x)

    monkeypatch.setattr(compile_policy.torch, "compile", fake_compile)
    forward = compile_policy.compile_for_training(torch.nn.Identity())
    assert torch.equal(forward(torch.ones(2)), torch.ones(2))
    assert seen == [compile_policy.TRAINING_ACTIVATION_BUDGET] and 0 < compile_policy.TRAINING_ACTIVATION_BUDGET < 1
    assert functorch_config.activation_memory_budget == default  # the process's setting is left as it was


def test_a_compiled_training_step_gives_the_eager_gradients():
    # Recomputing activations in backward (the budget) must not change what backward computes.
    import vitkit

    torch.manual_seed(0)
    model = vitkit.create_model("Ti/4", width=32, depth=2, heads=2, mlp_dim=64, img_size=8, in_chans=1, num_classes=3)
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    grads = []
    for forward in (model, compile_policy.compile_for_training(model)):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward(images), labels).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
