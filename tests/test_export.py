"""`vitkit export`: ONNX files that ONNX Runtime runs like PyTorch (at the export size and, dynamic, at others),
the int8 copy, the refusal to write a file that fails its check, and the .npz / .safetensors formats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

import vitkit  # noqa: E402
from vitkit import export  # noqa: E402
from vitkit.cli import main  # noqa: E402
from vitkit.export import ExportOptions, export_weights  # noqa: E402

PREPROCESS = {"mean": [0.25], "std": [0.5], "class_names": [f"c{i}" for i in range(5)]}


def tiny(name: str, img_size: int, in_chans: int, **overrides) -> vitkit.ViT:
    """A small model of the family `name` whose head and position embedding are far from their initial values: a
    zero head gives zero logits, which would hide any difference, and a position embedding of std 0.02 would hide
    a wrong resampling of it."""
    torch.manual_seed(0)
    model = vitkit.create_model(name, img_size=img_size, in_chans=in_chans, num_classes=5, width=48, depth=2,
                                heads=3, mlp_dim=96, **overrides)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.5)
        torch.nn.init.normal_(model.pos_embed, std=1.0)
    return model.eval()


def saved(model: vitkit.ViT, directory: Path, preprocess: dict | None = None) -> Path:
    path = directory / "weights.safetensors"
    metadata = {"vitkit_preprocess": json.dumps(preprocess)} if preprocess else None
    vitkit.save_weights(model, path, metadata=metadata)
    return path


def onnx_error(model: vitkit.ViT, path: Path, batch: int, size: int) -> float:
    """max|onnx - torch| / max|torch| of the logits of random images, run here independently of the command's
    own check."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(batch, model.cfg.in_chans, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images).numpy()
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    assert got.shape == expected.shape
    return float(abs(got - expected).max() / abs(expected).max())


def printed_error(out: str) -> float:
    return float(re.search(r"max relative logit error (\S+)", out).group(1))


@pytest.mark.parametrize("name, in_chans, export_size, other_size", [("S/16", 3, 32, 48), ("Ti/4", 1, 28, 36)])
def test_a_dynamic_onnx_file_matches_pytorch_at_the_export_size_and_another(tmp_path, capsys, name, in_chans,
                                                                            export_size, other_size):
    model = tiny(name, export_size, in_chans)
    out = tmp_path / "model.onnx"
    written = export_weights(ExportOptions(weights=str(saved(model, tmp_path)), out=str(out), dynamic=True,
                                           check_sizes=[other_size]))
    assert written == out and out.exists()
    printed = capsys.readouterr().out
    assert "opset 18" in printed and f"{export_size}x{export_size}, {other_size}x{other_size}" in printed
    assert printed_error(printed) < 1e-4
    for size in (export_size, other_size):  # the position embedding is resampled inside the graph at other_size
        for batch in (1, 3):
            assert onnx_error(model, out, batch, size) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "weights.safetensors"]


def test_the_default_check_of_a_dynamic_export_is_two_patches_larger(tmp_path, capsys):
    model = tiny("Ti/4", 28, 1)
    export_weights(ExportOptions(weights=str(saved(model, tmp_path)), out=str(tmp_path / "m.onnx"), dynamic=True))
    assert "sizes 28x28, 36x36" in capsys.readouterr().out


def test_a_dynamic_export_serves_a_grid_of_one_patch(tmp_path, capsys):
    # The tracer fixes a dimension it sees at size 1: a 4 x 8 image (a 1 x 2 grid) is traced at two patches a side.
    model = vitkit.create_model("Ti/4", img_size=(4, 8), in_chans=1, num_classes=5, width=16, depth=1, heads=2,
                                mlp_dim=32)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.5)
    export_weights(ExportOptions(weights=str(saved(model.eval(), tmp_path)), out=str(tmp_path / "m.onnx"),
                                 dynamic=True, check_sizes=[4, 12]))
    assert "sizes 4x8, 4x4, 12x12," in capsys.readouterr().out


def test_a_static_export_has_a_dynamic_batch_only(tmp_path, capsys):
    model = tiny("S/16", 48, 3, pool="gap")
    out = tmp_path / "static.onnx"
    export_weights(ExportOptions(weights=str(saved(model, tmp_path)), out=str(out)))
    assert "sizes 48x48," in capsys.readouterr().out
    assert onnx_error(model, out, 3, 48) < 1e-4
    with pytest.raises(Exception):  # the graph was traced at 48 x 48 only
        onnx_error(model, out, 1, 64)


def test_int8_writes_the_quantised_model_and_measures_its_agreement(tmp_path, capsys):
    model = tiny("Ti/4", 28, 1)
    out = tmp_path / "tiny.onnx"
    export_weights(ExportOptions(weights=str(saved(model, tmp_path, PREPROCESS)), out=str(out), int8=True,
                                 data="synthetic", count=64))
    int8 = tmp_path / "tiny.int8.onnx"
    assert out.exists() and int8.exists() and int8.stat().st_size < out.stat().st_size
    line = re.search(r"int8 top-1 agreement with fp32 on synthetic test: (\S+)% \((\d+) images\)",
                     capsys.readouterr().out)
    assert 0 <= float(line.group(1)) <= 100 and line.group(2) == "64"
    batches = export.dataset_batches("synthetic", None, (28, 28), 1, (0.25,), (0.5,), 64)
    agreement, seen = export.int8_agreement(out, int8, batches)
    assert 0.0 <= agreement <= 1.0 and seen == 64


def test_a_failed_parity_check_fails_the_command_and_writes_nothing(tmp_path, monkeypatch, capsys):
    weights = saved(tiny("Ti/4", 28, 1), tmp_path)
    real = export.reference_logits
    monkeypatch.setattr(export, "reference_logits", lambda model, images: real(model, images) * 1.01)
    code = main(["export", "--weights", str(weights), "--out", str(tmp_path / "m.onnx"), "--dynamic", "--int8"])
    assert code == 2
    assert "differ from PyTorch's" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]  # no file, no leftover staging


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    weights = saved(tiny("Ti/4", 28, 1), tmp_path)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_weights(ExportOptions(weights=str(weights), out=str(tmp_path / "m.tflite"), format="tflite"))
    with pytest.raises(SystemExit) as exited:  # the command line refuses it before running anything
        main(["export", "--weights", str(weights), "--out", str(tmp_path / "m.tflite"), "--format", "tflite"])
    assert exited.value.code == 2
    cases = [
        (["--weights", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "m.onnx")], "does not exist"),
        (["--weights", str(weights), "--out", str(tmp_path / "m.onnx"), "--dynamic", "--check_sizes", "30"],
         "not divisible by the patch size 4"),
        (["--weights", str(weights), "--out", str(tmp_path / "m.onnx"), "--check_sizes", "32"], "--dynamic"),
        (["--weights", str(weights), "--out", str(tmp_path / "m.npz"), "--format", "npz", "--int8"],
         "--format onnx only"),
        (["--weights", str(weights), "--out", str(tmp_path / "m.onnx"), "--format", "npz"], "writes a .npz file"),
        (["--weights", str(weights), "--out", str(tmp_path / "m.onnx"), "--data", "synthetic"], "add --int8"),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_npz_and_safetensors_exports_load_back_to_the_same_model(tmp_path):
    model = tiny("Ti/4", 28, 1)
    weights = saved(model, tmp_path, PREPROCESS)
    images = torch.randn(2, 1, 28, 28)
    for fmt in ("npz", "safetensors"):
        out = tmp_path / "exported" / f"m.{fmt}"
        assert export_weights(ExportOptions(weights=str(weights), out=str(out), format=fmt)) == out
        loaded, preprocess = vitkit.load_pretrained(out)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(images), model(images), rtol=1e-5, atol=1e-5)
        if fmt == "safetensors":
            assert preprocess == PREPROCESS  # the preprocessing the weights came with


@pytest.mark.parametrize("reduce_range, largest", [(False, 127), (True, 64)])
def test_int8_weights_keep_7_bits_where_asked(tmp_path, reduce_range, largest):
    """ONNX Runtime's int8 multiply-adds saturate on CPUs without VNNI unless the weights keep 7 bits: with
    reduce_range every int8 weight lies in [-64, 63] (the largest magnitude 64), without it up to 127."""
    import onnx
    from onnx import numpy_helper

    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    export.export_onnx(tiny("Ti/8", 16, 3), fp32, dynamic=False, opset=18)
    export.quantise_int8(fp32, int8, reduce_range=reduce_range)
    weights = [numpy_helper.to_array(t) for t in onnx.load(int8).graph.initializer
               if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(abs(w.astype("int32")).max()) for w in weights) == largest
