"""The speed benchmark's ONNX Runtime and OpenVINO contenders: they run the vitkit model they were given, and their
absence is reported rather than fatal."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import vitkit
from benchmark_scripts import benchmark_module

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

speed = benchmark_module("speed")


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
    pytest.importorskip("openvino", reason="the OpenVINO contenders need the bench extra (make setup)")
    pytest.importorskip("nncf", reason="the OpenVINO contenders need the bench extra (make setup)")
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


def test_the_raised_goals_compare_auto_and_fp32_with_the_fastest_runtime_and_the_ceiling():
    def row(name, images_per_s, ceiling):
        return {"contender": name, "images_per_s": images_per_s, "ceiling": ceiling}
    entry = {"model": "S/16", "batch": 16, "gflops_per_image": 10.0, "auto": {"precision": "int8", "median_ms": None},
             "rows": [row("timm fp32", 10.0, "fp32"), row("vitkit fp32", 21.0, "fp32"),
                      row("vitkit bf16", 30.0, "bf16"), row("vitkit int8", 48.0, "int8"),
                      row("onnxruntime fp32", 17.0, "fp32"), row("openvino fp32", 20.0, "fp32"),
                      row("openvino bf16", 40.0, "bf16"), row("onnxruntime int8", 32.0, "int8")]}
    checks = {c["goal"].split(": ", 1)[1]: c for c in speed.runtime_goal_checks(entry, {"bf16": 400.0, "int8": 600.0})}
    auto = checks["vitkit auto >= 1.2x the fastest ONNX Runtime / OpenVINO mode"]
    assert auto["met"] and "1.20x openvino bf16 40.0" in auto["measured"]  # 48 / 40, exactly the goal
    fp32 = checks["vitkit fp32 (eager or compiled) >= the fastest runtime fp32"]
    assert fp32["met"] and "vitkit fp32: 1.05x openvino fp32" in fp32["measured"]
    ceiling = checks["fastest vitkit mode >= 75% of its matmul ceiling (bf16 or int8)"]
    assert ceiling["met"] and "vitkit int8: 80.0% of the int8 ceiling" in ceiling["measured"]  # 10 x 48 / 600
    entry["rows"].append(row("vitkit fp32 + compile", 24.0, "fp32"))  # the faster of vitkit's two fp32 forms counts
    fp32 = {c["goal"].split(": ", 1)[1]: c for c in speed.runtime_goal_checks(entry, {"bf16": 400.0, "int8": 600.0})}[
        "vitkit fp32 (eager or compiled) >= the fastest runtime fp32"]
    assert fp32["met"] and "vitkit fp32 + compile: 1.20x openvino fp32" in fp32["measured"]
    entry["auto"] = {"precision": "bf16", "median_ms": None}
    assert not {c["goal"]: c for c in speed.runtime_goal_checks(entry, {"bf16": 400.0, "int8": 600.0})}[
        "S/16 @224 batch 16: vitkit auto >= 1.2x the fastest ONNX Runtime / OpenVINO mode"]["met"]  # 30 / 40


def test_autos_choice_is_reported_with_its_timings_fastest_first():
    timed = {"precision": "int8", "median_ms": {"bf16": 30.1, "int8": 21.4}}
    assert speed.describe_auto(timed) == "int8 (timed: int8 21.40 ms, bf16 30.10 ms)"
    assert speed.describe_auto({"precision": "fp32", "median_ms": None}) == "fp32 (by the CPU's features alone)"


def test_each_mode_is_held_to_the_ceiling_of_its_number_format():
    measured = {name: {"seconds": 1.0} for name in ("timm fp32", "vitkit bf16", "vitkit int8", "onnxruntime int8")}
    rows = {r["contender"]: r for r in speed._rows(measured, 16, 1e9, {"fp32": 100.0, "bf16": 200.0, "int8": 400.0},
                                                   {})}
    assert {name: (r["ceiling"], r["ceiling_fraction"]) for name, r in rows.items()} == {
        "timm fp32": ("fp32", 0.16), "vitkit bf16": ("bf16", 0.08), "vitkit int8": ("int8", 0.04),
        "onnxruntime int8": ("int8", 0.04)}
    assert speed.matmul_ceiling(torch.int8, n=64, reps=1) > 0


def test_with_the_accuracy_bound_only_the_runtime_modes_that_kept_it_count(tmp_path):
    rows = [{"contender": name, "images_per_s": ips, "ceiling": "int8" if "int8" in name else "bf16"}
            for name, ips in (("vitkit int8", 48.0), ("openvino bf16", 40.0), ("openvino int8", 67.0))]
    entry = {"model": "S/16", "batch": 16, "gflops_per_image": 9.2, "rows": rows,
             "auto": {"precision": "int8", "median_ms": None}}
    accuracy = tmp_path / "inference_accuracy.json"
    accuracy.write_text(json.dumps({"modes": [{"mode": "int8", "meets_goals": True},
                                              {"mode": "openvino bf16", "meets_goals": True},
                                              {"mode": "openvino int8", "meets_goals": False}]}))
    within = set(speed.accuracy_bound(accuracy)["within_bound"])
    assert within == {"vitkit int8", "openvino bf16"}
    (free,) = [c for c in speed.runtime_goal_checks(entry, {"int8": 869.0}) if "auto" in c["goal"]]
    (bound,) = [c for c in speed.runtime_goal_checks(entry, {"int8": 869.0}, within) if "auto" in c["goal"]]
    assert "0.72x openvino int8" in free["measured"] and not free["met"]
    assert "1.20x openvino bf16" in bound["measured"] and bound["met"]
    assert bound["goal"].endswith("within the accuracy bound")
    with pytest.raises(SystemExit, match="not a results file"):
        speed.accuracy_bound(tmp_path / "missing.json")


@pytest.mark.parametrize("with_bf16, expected", [
    (True, {"timm fp32", "vitkit fp32", "timm bf16 autocast", "vitkit bf16 autocast", "timm compile + bf16 autocast",
            "vitkit compile + bf16 autocast"}),
    (False, {"timm fp32", "vitkit fp32", "timm compile + fp32", "vitkit compile + fp32"})])
def test_without_bf16_the_training_steps_compile_in_fp32(with_bf16, expected):
    pytest.importorskip("timm")
    contenders, images, labels, _ = speed.training_contenders("fashion-mnist default", 2, True, with_bf16=with_bf16)
    assert set(contenders) == expected and images.shape == (2, 1, 28, 28) and labels.shape == (2,)
    contenders["vitkit fp32"]()  # an eager step runs (the compiled ones would take a compilation each)


@pytest.mark.parametrize("timm_compiled", ["timm compile + bf16 autocast", "timm compile + fp32"])
def test_the_training_goal_holds_vitkit_against_the_compiled_timm_step_that_ran(timm_compiled):
    vitkit_compiled = timm_compiled.replace("timm", "vitkit")
    rows = [{"contender": name, "images_per_s": speed_, "vs_timm_fp32": speed_ / 500.0, "peak_extra_mb": memory}
            for name, speed_, memory in [("timm fp32", 500.0, 158.2), ("vitkit fp32", 495.0, 180.4),
                                         (timm_compiled, 600.0, 160.0), (vitkit_compiled, 780.0, 141.3)]]
    record = {"inference": [], "training": [{"shape": "fashion-mnist default", "rows": rows}]}
    (goal,) = speed.goal_checks(record)
    assert goal["goal"] == (f"Fashion-MNIST training, {vitkit_compiled}: >= 1.5x timm fp32, >= 1.1x {timm_compiled}, "
                            "warm peak memory <= every timm contender's")
    assert goal["measured"] == f"1.56x timm fp32, 1.30x {timm_compiled}, warm peak 141.3 MB vs timm fp32 158.2 MB"
    assert goal["met"]
