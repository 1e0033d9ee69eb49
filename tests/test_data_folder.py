"""Image folders: layouts, splits, sizes, channels, statistics, and bad files in error and skip modes."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from image_corpus import BOMB_LIMIT, RAISED_LIMIT, assert_decoded, assert_reason, write_corpus
from vitkit.data import BadImageError, DatasetNotFoundError, collate_skip_none, load_dataset


def grey_file(path: Path, value: int, size=(5, 6), fmt_suffix=".png") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size[::-1], value).save(path.with_suffix(fmt_suffix))
    return path.with_suffix(fmt_suffix)


def flat_tree(root: Path, per_class: int = 10) -> dict[str, int]:
    """Class 'black' all 0 and class 'white' all 255, PNG and BMP: {path: label}."""
    expected = {}
    for label, (name, value) in enumerate((("black", 0), ("white", 255))):
        for i in range(per_class):
            suffix = ".png" if i % 2 else ".bmp"
            expected[str(grey_file(root / name / f"img{i:02d}", value, fmt_suffix=suffix))] = label
    (root / "white" / "notes.txt").write_text("not an image, and not named like one")
    (root / "white" / ".hidden.png").write_bytes(b"")  # hidden: ignored, though unreadable
    return expected


def paths(dataset) -> list[str]:
    return [path for path, _ in dataset.samples]


def test_flat_folder_splits_labels_pixels_and_stats(tmp_path):
    expected = flat_tree(tmp_path)
    data = load_dataset("image-folder", data_dir=tmp_path, seed=0)
    assert data.class_names == ["black", "white"] and data.num_classes == 2
    assert (data.in_chans, data.image_size) == (1, (5, 6))  # all grey, all 5x6
    assert (len(data.train), len(data.val), len(data.test)) == (16, 2, 2)  # test 10%, val 10% of the rest
    every = paths(data.train) + paths(data.val) + paths(data.test)
    assert sorted(every) == sorted(expected)
    for split in (data.train, data.val, data.test):
        assert np.bincount([label for _, label in split.samples]).tolist() == [len(split) // 2] * 2  # stratified
        for i in range(len(split)):
            image, label = split[i]
            assert image.dtype == torch.uint8 and image.shape == (1, 5, 6)
            assert label == expected[split.samples[i][0]] and torch.all(image == 255 * label)
    assert data.mean == (0.5,) and data.std == (0.5,)  # eight black and eight white training images


def test_flat_folder_splits_are_deterministic_and_test_is_fixed(tmp_path):
    flat_tree(tmp_path, per_class=20)
    a = load_dataset("image-folder", data_dir=tmp_path, seed=0)
    b = load_dataset("image-folder", data_dir=tmp_path, seed=0)
    c = load_dataset("image-folder", data_dir=tmp_path, seed=1)
    assert paths(a.val) == paths(b.val) and paths(a.train) == paths(b.train)
    assert paths(a.test) == paths(c.test) and paths(a.val) != paths(c.val)
    sized = load_dataset("image-folder", data_dir=tmp_path, val_size=6, test_size=0.5)
    assert (len(sized.train), len(sized.val), len(sized.test)) == (14, 6, 20)


def test_split_folders_are_used_as_they_are(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for label, name in enumerate(("a", "b")):
            for i in range(n):
                grey_file(tmp_path / split / name / f"{i}", 100 * label)
    data = load_dataset("image-folder", data_dir=tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 6)
    assert all("/val/" in p for p in paths(data.val)) and all("/test/" in p for p in paths(data.test))
    with pytest.warns(UserWarning, match="val_size=3 is ignored"):
        load_dataset("image-folder", data_dir=tmp_path, val_size=3)


def test_missing_val_folder_is_split_from_train(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            for i in range(10):
                grey_file(tmp_path / split / name / f"{i}", 7)
    data = load_dataset("image-folder", data_dir=tmp_path, val_size=4)
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 20)
    assert all("/train/" in p for p in paths(data.val))


def test_unknown_class_in_test_folder_is_an_error(tmp_path):
    grey_file(tmp_path / "train" / "a" / "0", 0)
    grey_file(tmp_path / "test" / "zebra" / "0", 0)
    with pytest.raises(ValueError, match="zebra"):
        load_dataset("image-folder", data_dir=tmp_path)


def test_empty_class_folder_is_an_error(tmp_path):
    grey_file(tmp_path / "a" / "0", 0)
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'b'} holds no images"):
        load_dataset("image-folder", data_dir=tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nowhere-here"):
        load_dataset("image-folder", data_dir=tmp_path / "nowhere-here")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("image-folder")


def mixed_tree(root: Path) -> None:
    """RGB JPEGs, an RGBA PNG, a palette GIF and a 16-bit PNG, of different sizes."""
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir(parents=True)
    Image.new("RGB", (12, 10), (250, 0, 0)).save(root / "x" / "red.jpg", quality=95)
    Image.new("RGBA", (6, 4), (0, 0, 255, 0)).save(root / "x" / "clear.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(root / "y" / "deep.png")
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 200, 0] + [0] * 765)
    palette.save(root / "y" / "green.gif")


def test_different_sizes_need_image_size(tmp_path):
    mixed_tree(tmp_path)
    with pytest.raises(ValueError, match="give image_size") as caught:
        load_dataset("image-folder", data_dir=tmp_path)
    assert "red.jpg is 10x12" in str(caught.value) or "clear.png is 4x6" in str(caught.value)


def test_mixed_formats_are_resized_and_converted(tmp_path):
    mixed_tree(tmp_path)
    data = load_dataset("image-folder", data_dir=tmp_path, image_size=(8, 8), val_size=0, test_size=0)
    assert data.in_chans == 3 and data.image_size == (8, 8) and len(data.train) == 4
    decoded = {Path(path).name: data.train[i][0] for i, (path, _) in enumerate(data.train.samples)}
    assert all(image.shape == (3, 8, 8) and image.dtype == torch.uint8 for image in decoded.values())
    assert torch.all(decoded["clear.png"] == 255)  # transparent -> white, then resized
    assert torch.all(decoded["deep.png"] == 255)  # 16-bit 65535 -> 255
    assert decoded["green.gif"][:, 3, 3].tolist() == [0, 200, 0]
    assert (decoded["red.jpg"][:, 4, 4].int() - torch.tensor([250, 0, 0])).abs().max() <= 4
    grey = load_dataset("image-folder", data_dir=tmp_path, image_size=5, in_chans=1, val_size=0, test_size=0)
    assert grey.in_chans == 1 and all(grey.train[i][0].shape == (1, 5, 5) for i in range(4))


def bad_tree(root: Path) -> tuple[dict[str, int], set[str]]:
    """Eight good grey 4x4 images per class and one bad file of each kind spread over the classes."""
    good = {}
    for label, name in enumerate(("a", "b")):
        for i in range(8):
            good[str(grey_file(root / name / f"{i}", 10 + label, size=(4, 4)))] = label
    bad = {root / "a" / "empty.png", root / "a" / "truncated.png", root / "b" / "notes.jpg",
           root / "b" / "bomb.png"}
    (root / "a" / "empty.png").write_bytes(b"")
    Image.effect_noise((4, 4), 40).save(root / "a" / "full.png")  # its header says 4x4, like the good ones
    full = (root / "a" / "full.png").read_bytes()
    (root / "a" / "full.png").unlink()
    (root / "a" / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "b" / "notes.jpg").write_text("hello")
    Image.new("L", (300, 300)).save(root / "b" / "bomb.png")
    return good, {str(p) for p in bad}


@pytest.mark.parametrize("image_size", [None, 4], ids=["header-scan", "lazy"])
def test_skip_mode_lists_exactly_the_bad_files(tmp_path, image_size):
    good, bad = bad_tree(tmp_path)
    data = load_dataset("image-folder", data_dir=tmp_path, image_size=image_size, in_chans=1 if image_size else None,
                        on_bad_image="skip", max_pixels=10_000, val_size=0.2, test_size=0.2)
    assert data.image_size == (4, 4) and data.in_chans == 1
    for split in (data.train, data.val, data.test):
        for i, (path, label) in enumerate(split.samples):
            item = split[i]
            if path in bad:
                assert item is None
            else:
                assert item[1] == label == good[path] and torch.all(item[0] == 10 + label)
    skipped = {**data.train.skipped, **data.val.skipped, **data.test.skipped}
    assert set(skipped) == bad
    assert "empty" in skipped[str(tmp_path / "a" / "empty.png")]
    assert "truncated" in skipped[str(tmp_path / "a" / "truncated.png")]
    assert "max_pixels" in skipped[str(tmp_path / "b" / "bomb.png")]
    loader = DataLoader(data.train, batch_size=len(data.train), collate_fn=collate_skip_none)
    images, labels = next(iter(loader))
    assert len(images) == sum(path not in bad for path in paths(data.train)) and images.shape[1:] == (1, 4, 4)


def test_collate_skip_none_of_only_skipped_items_is_none():
    assert collate_skip_none([None, None]) is None
    images, labels = collate_skip_none([None, (torch.zeros(1, 2, 2, dtype=torch.uint8), 3)])
    assert images.shape == (1, 1, 2, 2) and labels.tolist() == [3]


def test_error_mode_names_the_bad_file(tmp_path):
    bad_tree(tmp_path)
    with pytest.raises(BadImageError) as caught:  # found while reading headers
        load_dataset("image-folder", data_dir=tmp_path, max_pixels=10_000)
    assert caught.value.path in {str(tmp_path / "a" / "empty.png"), str(tmp_path / "b" / "notes.jpg"),
                                 str(tmp_path / "b" / "bomb.png")}
    lazy = load_dataset("image-folder", data_dir=tmp_path, image_size=4, in_chans=1, max_pixels=10_000,
                        val_size=0, test_size=0, stats_images=1)  # only the first image is decoded up front
    position = paths(lazy.train).index(str(tmp_path / "a" / "truncated.png"))
    with pytest.raises(BadImageError, match="truncated") as caught:
        lazy.train[position]
    assert str(tmp_path / "a" / "truncated.png") in str(caught.value)


# --- the corpus of every awkward and broken kind, through the image-folder dataset ---------------------------

def corpus_dataset(root: Path, **options):
    """All of the corpus in the train split, each image resized to 2x2 RGB (a no-op for all but two)."""
    return load_dataset("image-folder", data_dir=root, image_size=2, val_size=0, test_size=0, **options).train


def test_corpus_in_error_mode_each_file_decodes_exactly_or_raises_naming_it(tmp_path):
    corpus = write_corpus(tmp_path)
    # Lazy (image size and channels given): only the first image is decoded up front, every other on access.
    train = corpus_dataset(tmp_path, in_chans=3, max_pixels=BOMB_LIMIT, stats_images=1)
    assert sorted(paths(train)) == sorted([*corpus.good, *corpus.bad])
    for i, path in enumerate(paths(train)):
        if path in corpus.bad:
            with pytest.raises(BadImageError) as caught:
                train[i]
            error = caught.value
            assert error.path == path and str(error).startswith(f"cannot read image {path}: ")
            assert_reason(error.reason, corpus.bad[path], path)
        else:
            assert_decoded(train[i][0], corpus.good[path], corpus.tolerance[path], path)

    # Header scan (channels not given): the first file in path order whose header is unusable stops the load.
    with pytest.raises(BadImageError) as caught:
        corpus_dataset(tmp_path, max_pixels=BOMB_LIMIT)
    assert caught.value.path == str(tmp_path / "a" / "empty.png")
    assert caught.value.reason == "the file is empty (0 bytes)"


@pytest.mark.parametrize("in_chans", [3, None], ids=["lazy", "header-scan"])
def test_corpus_in_skip_mode_decodes_the_good_and_lists_exactly_the_bad(tmp_path, in_chans):
    corpus = write_corpus(tmp_path)
    train = corpus_dataset(tmp_path, in_chans=in_chans, max_pixels=BOMB_LIMIT, on_bad_image="skip")
    assert train.mode == "RGB"
    for i, path in enumerate(paths(train)):
        item = train[i]
        if path in corpus.bad:
            assert item is None, path
        else:
            assert_decoded(item[0], corpus.good[path], corpus.tolerance[path], path)
    assert sorted(train.skipped) == sorted(corpus.bad)
    for path, reason in train.skipped.items():
        assert_reason(reason, corpus.bad[path], path)
    images, labels = collate_skip_none([train[i] for i in range(len(train))])
    assert images.shape == (len(corpus.good), 3, 2, 2)
    assert labels.tolist() == [label for path, label in train.samples if path in corpus.good]


def test_raising_the_pixel_limit_lets_the_large_image_through(tmp_path):
    corpus = write_corpus(tmp_path)
    train = corpus_dataset(tmp_path, in_chans=3, max_pixels=RAISED_LIMIT, on_bad_image="skip")
    position = paths(train).index(corpus.bomb)
    assert_decoded(train[position][0], corpus.bomb_expected, 0, corpus.bomb)
    for i in range(len(train)):
        train[i]
    assert sorted(train.skipped) == sorted(set(corpus.bad) - {corpus.bomb})  # the huge one stays refused


@pytest.mark.parametrize("context,workers", [("fork", 2), ("spawn", 1)])
def test_images_skipped_inside_loader_workers_are_listed_in_the_main_process(tmp_path, context, workers):
    corpus = write_corpus(tmp_path)
    # stats_images=1: the bad files are met for the first time inside the worker processes.
    train = corpus_dataset(tmp_path, in_chans=3, max_pixels=BOMB_LIMIT, on_bad_image="skip", stats_images=1)
    assert train.skipped == {}
    loader = DataLoader(train, batch_size=4, num_workers=workers, multiprocessing_context=context,
                        collate_fn=collate_skip_none)
    seen = sum(len(batch[1]) for batch in loader if batch is not None)
    assert seen == len(corpus.good)
    assert sorted(train.skipped) == sorted(corpus.bad)
    for path, reason in train.skipped.items():
        assert_reason(reason, corpus.bad[path], path)

    # The workers' file goes when the main process's dataset does, and not before.
    log_file = Path(train._log.path)
    assert log_file.exists()
    del train, loader
    gc.collect()
    assert not log_file.exists()
