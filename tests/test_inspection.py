"""`vitkit inspect` and `vitkit predict --explain`: the commands over vitkit.inspect, end to end on tiny weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit import inspection
from vitkit.cli import expand_values, main
from vitkit.data import load_dataset
from vitkit.inspect import ANALYSES, attention_rollout, figures

VITKIT = Path(sys.executable).with_name("vitkit")
CLASSES = [f"class {i}" for i in range(10)]
EVERY_FILE = sorted([f"{name}.png" for name in ANALYSES] + ["arrays.npz"])
SIZES = {"filters": figures.FILTERS_SIZE, "pos_embed": figures.POS_EMBED_SIZE,
         "attention_distance": figures.DISTANCE_SIZE, "rollout": figures.ROLLOUT_SIZE}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Tiny 1-channel 28 x 28 weights (7 x 7 patches, 2 blocks of 2 heads) with the preprocessing `vitkit train`
    stores: mean 0.5, std 0.5 and the class names."""
    torch.manual_seed(0)
    model = vitkit.create_model("Ti/4", img_size=28, in_chans=1, num_classes=10, width=32, depth=2, heads=2,
                                mlp_dim=64)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    preprocess = {"mean": [0.5], "std": [0.5], "class_names": CLASSES}
    vitkit.save_weights(model, path, metadata={"vitkit_preprocess": json.dumps(preprocess)})
    return path


def write_image(path: Path, shape: tuple[int, ...], seed: int) -> Path:
    """Random pixels of `shape` ((H, W) grey or (H, W, 3) RGB) saved at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def write_images(directory: Path) -> list[Path]:
    """Three image files, not all of the model's 28 x 28 grey: RGB 30 x 40, grey 28 x 28, grey JPEG 56 x 56."""
    return [write_image(directory / "wide.png", (30, 40, 3), 1), write_image(directory / "digit.png", (28, 28), 2),
            write_image(directory / "big.jpg", (56, 56), 3)]


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        assert np.asarray(image.convert("RGB"), dtype=np.float64).std() > 0  # not blank


def inspect(weights: Path, *args: str) -> int:
    return main(["inspect", "--weights", str(weights), "--device", "cpu", *args])


# ---- vitkit inspect ----


def test_inspect_a_dataset_split_writes_every_figure_of_the_evenly_spaced_images(weights, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert inspect(weights, "--data", "synthetic", "--count", "5", "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == EVERY_FILE
    assert sorted(capsys.readouterr().out.splitlines()) == sorted(f"wrote {out / name}" for name in EVERY_FILE)
    for name, size in SIZES.items():
        assert_png(out / f"{name}.png", size)

    # The images are the test split's 0th, 40th, ..., 160th of 200, normalised with the weights' mean and std.
    test = load_dataset("synthetic", image_size=28, in_chans=1).test
    picked = np.linspace(0, len(test), 5, endpoint=False).astype(int)
    images = torch.stack([test[int(i)][0] for i in picked]).float() / 255 * 2 - 1  # (x - 0.5) / 0.5
    expected = attention_rollout(vitkit.load_model(weights), images).maps
    with np.load(out / "arrays.npz") as arrays:
        np.testing.assert_allclose(arrays["rollout_maps"], expected, rtol=1e-5, atol=1e-8)
        assert arrays["attention_distance"].shape == (2, 2)  # (layers, heads)
        assert arrays["pos_embed_similarity"].shape == (7, 7, 7, 7)


def test_inspect_image_files_resizes_and_converts_them(weights, tmp_path, capsys):
    files = write_images(tmp_path / "images")
    out = tmp_path / "inspect"
    assert inspect(weights, "--images", *map(str, files), "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == EVERY_FILE
    assert len(capsys.readouterr().out.splitlines()) == len(EVERY_FILE)
    assert_png(out / "rollout.png", figures.ROLLOUT_SIZE)
    with np.load(out / "arrays.npz") as arrays:
        assert arrays["rollout_maps"].shape == (3, 7, 7)  # one map per file


def test_inspect_writes_only_the_analyses_asked_for(weights, tmp_path):
    out = tmp_path / "inspect"
    assert inspect(weights, "--data", "synthetic", "--count", "2", "--analyses", "rollout", "attention_distance",
                   "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["arrays.npz", "attention_distance.png", "rollout.png"]


def test_analyses_of_the_weights_alone_load_no_dataset(weights, tmp_path):
    # cifar10 is not in the empty data_dir: loading it would fail.
    opts = inspection.InspectOptions(weights=str(weights), device="cpu", data="cifar10", data_dir=str(tmp_path),
                                     analyses=["filters", "pos_embed"], out=str(tmp_path / "inspect"))
    written = inspection.inspect_weights(opts)
    assert sorted(written) == ["arrays", "filters", "pos_embed"]
    assert sorted(p.name for p in (tmp_path / "inspect").iterdir()) == ["arrays.npz", "filters.png", "pos_embed.png"]


@pytest.mark.parametrize("args,message", [
    (["--analyses", "filters", "bogus"], "unknown analysis 'bogus'"),
    (["--analyses"], "--analyses needs at least one value"),
    (["--images"], "--images needs at least one value"),
    (["--images", "{dir}/missing.png"], "cannot read image {dir}/missing.png: no such file"),
    (["--images", "{dir}/notes.png"], "cannot read image {dir}/notes.png"),
    (["--images", ""], "--images holds an empty file name"),
    (["--count", "0"], "--count must be a whole number of at least 1, got 0"),
    (["--precision", "bf16"], "--precision bf16 does not apply"),
    (["--compile", "true"], "--compile does not apply"),
    (["--data", "fashion-mnst"], "did you mean 'fashion-mnist'"),
    (["--data", "cifar10", "--data_dir", "{dir}/nothing"], "{dir}/nothing"),
])
def test_bad_input_is_named_and_writes_nothing(weights, tmp_path, capsys, args, message):
    (tmp_path / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    assert inspect(weights, "--out", str(out), *(arg.format(dir=tmp_path) for arg in args)) == 2
    assert message.format(dir=tmp_path) in capsys.readouterr().err
    assert not out.exists()


def test_out_is_required(weights, capsys):
    assert inspect(weights, "--data", "synthetic") == 2
    assert "--out is required" in capsys.readouterr().err


def test_the_default_analyses_are_all_of_vitkit_inspect():
    assert inspection.ANALYSES == ANALYSES
    assert inspection.InspectOptions().analyses == list(ANALYSES)


def test_evenly_spaced_indices():
    assert inspection.evenly_spaced(200, 5) == [0, 40, 80, 120, 160]
    assert inspection.evenly_spaced(10, 3) == [0, 3, 6]
    assert inspection.evenly_spaced(3, 16) == [0, 1, 2]  # no more than the split holds


def test_inspect_help_lists_the_options():
    done = subprocess.run([str(VITKIT), "inspect", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for text in ("usage: vitkit [options] inspect", "--weights", "--images", "--analyses", "--count", "--out",
                 "--split", "attention_distance"):
        assert text in done.stdout, text


# ---- vitkit predict --explain ----


def test_predict_explain_writes_one_figure_per_image(weights, tmp_path, capsys):
    files = [*write_images(tmp_path / "a"), write_image(tmp_path / "b" / "digit.png", (28, 28), 4)]
    out = tmp_path / "explained"
    assert main(["predict", "--weights", str(weights), "--device", "cpu", "--topk", "3", "--explain", "--out",
                 str(out), *map(str, files)]) == 0
    names = ["wide_explained.png", "digit_explained.png", "big_explained.png", "digit_2_explained.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert_png(out / name, figures.PREDICTION_SIZE)
    printed = capsys.readouterr().out.splitlines()
    written = [line.strip() for line in printed if line.strip().startswith("wrote ")]
    assert written == [f"wrote {out / name}" for name in names]  # in the order of the images
    assert any(name in line for line in printed for name in CLASSES)


def test_predict_explain_needs_out(weights, tmp_path, capsys):
    image = write_image(tmp_path / "x.png", (28, 28), 5)
    assert main(["predict", "--weights", str(weights), "--device", "cpu", "--explain", str(image)]) == 2
    assert "--explain writes a figure per image: give --out DIR" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_flags_and_several_values_are_written_out_for_the_parser():
    assert expand_values(["predict", "--explain", "a.png"]) == ["predict", "--explain=true", "a.png"]
    assert expand_values(["predict", "--explain", "false", "a.png"]) == ["predict", "--explain=false", "a.png"]
    assert expand_values(["predict", "--explain=false", "a.png"]) == ["predict", "--explain=false", "a.png"]
    assert expand_values(["inspect", "--images", "a b.png", "c.png", "--count", "2"]) == [
        "inspect", "--images", '["a b.png", "c.png"]', "--count", "2"]
    assert expand_values(["inspect", "--analyses=rollout"]) == ["inspect", "--analyses", '["rollout"]']
    assert expand_values(["inspect", "--analyses", "[filters, rollout]"]) == [
        "inspect", "--analyses", "[filters, rollout]"]  # already a YAML list
    with pytest.raises(ValueError, match="--images needs at least one value"):
        expand_values(["inspect", "--images", "--count", "2"])
