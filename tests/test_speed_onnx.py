"""The speed benchmark's ONNX Runtime and OpenVINO contenders: they run the vitkit model they were given, and their
absence is reported rather than fatal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import vitkit

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # speed.py imports provenance from there
import speed  # noqa: E402


def test_onnx_runtime_contenders_give_the_models_logits():
    torch.manual_seed(0)
    model = vitkit.create_model("Ti/8", img_size=32, in_chans=3, num_classes=5, width=32, depth=1, heads=2,
                                mlp_dim=64).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the new head is zero: its logits would hide any difference
    contenders = speed.exported_contenders(model, with_onnx=True, with_openvino=False, batch=3)
    assert list(contenders) == ["onnxruntime fp32", "onnxruntime int8"]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # a batch the export never saw
    with torch.inference_mode():
        expected = model(images)
        fp32, int8 = (contenders[name](images) for name in contenders)
    assert fp32.shape == int8.shape == (3, 5)
    scale = float(expected.abs().max())
    assert float((fp32 - expected).abs().max()) < 1e-4 * scale
    # int8 weights and activations: near, not equal (a generous bound; the benchmark reports the actual figure)
    assert float((int8 - expected).abs().max()) < 0.2 * scale


def test_openvino_contenders_give_the_models_logits():
    pytest.importorskip("openvino", reason="the OpenVINO contenders need `pip install openvino nncf`")
    pytest.importorskip("nncf", reason="the OpenVINO contenders need `pip install openvino nncf`")
    torch.manual_seed(0)
    model = vitkit.create_model("Ti/8", img_size=32, in_chans=3, num_classes=5, width=32, depth=1, heads=2,
                                mlp_dim=64).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the new head is zero: its logits would hide any difference
    contenders = speed.exported_contenders(model, with_onnx=False, with_openvino=True, batch=3)
    assert list(contenders) == ["openvino fp32", "openvino bf16", "openvino int8"]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(images)
    scale = float(expected.abs().max())
    outputs = {name: run(images) for name, run in contenders.items()}
    assert all(out.shape == (3, 5) for out in outputs.values())
    assert float((outputs["openvino fp32"] - expected).abs().max()) < 1e-4 * scale
    # bf16 arithmetic and int8 weights and activations: near, not equal (generous bounds; the benchmark reports
    # the actual figures)
    assert float((outputs["openvino bf16"] - expected).abs().max()) < 0.1 * scale
    assert float((outputs["openvino int8"] - expected).abs().max()) < 0.2 * scale


def test_a_missing_onnx_package_is_named(monkeypatch):
    assert speed.onnx_unavailable() is None
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` raise ImportError
    reason = speed.onnx_unavailable()
    assert reason is not None and "onnxscript" in reason and "vitkit[export]" in reason
