"""IDX parsing and Fashion-MNIST: exact round trips, corrupt files, where the files are looked for."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkit.data import DataFileError, DatasetNotFoundError, fashion_mnist, load_dataset
from vitkit.data.idx import read_idx

TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of `array`, written independently of the reader under test."""
    code = TYPE_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([[-7, 300], [32767, -32768]], dtype=np.int16),
    np.array([-1, 0, 2**31 - 1], dtype=np.int32),
    np.array([1.5, -2.25, np.inf], dtype=np.float32),
    np.array([[np.pi]], dtype=np.float64),
    np.array([-128, 127], dtype=np.int8),
    np.zeros((0, 28, 28), dtype=np.uint8),
], ids=["uint8-3d", "int16-2d", "int32", "float32", "float64", "int8", "empty"])
def test_read_idx_returns_the_exact_array(tmp_path, array, compress):
    path = write_idx(tmp_path / "a.idx", array, compress)
    result = read_idx(path)
    assert result.dtype == array.dtype and result.dtype.isnative
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)


def test_compression_is_recognised_by_content_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "plain.gz", array)), array)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "packed", array, compress=True)), array)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("data, reason", [
    (b"\x01" + GOOD[1:], "two zero bytes"),
    (GOOD[:2] + b"\x07" + GOOD[3:], "unknown IDX type code 0x07"),
    (GOOD[:3] + b"\x00", "zero dimensions"),
    (GOOD[:-1], "truncated"),
    (GOOD[:10], "truncated"),
    (GOOD + b"\x00", "more bytes"),
    (b"", "truncated"),
    (gzip.compress(GOOD)[:-12], "corrupt gzip"),
    (b"\x1f\x8b" + b"garbage" * 5, "corrupt gzip"),
], ids=["magic", "type", "ndim0", "short-by-one", "short-dims", "trailing", "empty", "cut-gzip", "bad-gzip"])
def test_corrupt_idx_names_the_file_and_the_fault(tmp_path, data, reason):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataFileError) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)
    assert reason in str(caught.value)


# --- Fashion-MNIST from files we write ------------------------------------------------------------

def write_fashion(directory: Path, n_train: int = 40, n_test: int = 10, compress: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10)[::-1].astype(np.uint8).copy(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, name in fashion_mnist.FILES.items():
        write_idx(directory / (name + (".gz" if compress else "")), arrays[key], compress)
    return arrays


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No system copy, an empty home and no VITKIT_DATA_DIR: only what a test puts there exists."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (str(tmp_path / "system"),))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VITKIT_DATA_DIR", raising=False)
    return tmp_path


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_from_data_dir_gives_exact_pixels_and_splits(isolated, compress):
    arrays = write_fashion(isolated / "fm", compress=compress)
    data = load_dataset("fashion-mnist", data_dir=isolated / "fm", val_size=10, seed=3)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10)
    assert sorted(data.val.labels.tolist()) == list(range(10))  # stratified: one of each class
    assert sorted(data.train.indices.tolist() + data.val.indices.tolist()) == list(range(40))
    for split in (data.train, data.val):
        np.testing.assert_array_equal(split.images[:, 0].numpy(), arrays["train_images"][split.indices.numpy()])
        np.testing.assert_array_equal(split.labels.numpy(), arrays["train_labels"][split.indices.numpy()])
    np.testing.assert_array_equal(data.test.images[:, 0].numpy(), arrays["test_images"])
    image, label = data.test[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28) and label == 9
    assert (data.num_classes, data.in_chans, data.image_size) == (10, 1, (28, 28))
    assert data.class_names[9] == "Ankle boot" and data.mean == (0.2860,) and data.std == (0.3530,)


def test_fashion_found_through_env_subdirectory(isolated, monkeypatch):
    write_fashion(isolated / "env" / "fashion-mnist")
    monkeypatch.setenv("VITKIT_DATA_DIR", str(isolated / "env"))
    assert len(load_dataset("fashion-mnist", val_size=0.25).val) == 10


def test_fashion_found_in_torchvision_layout_of_the_cache(isolated):
    write_fashion(isolated / "home" / ".cache" / "vitkit" / "FashionMNIST" / "raw", compress=False)
    assert len(load_dataset("fashion-mnist", val_size=5).train) == 35


def test_fashion_not_found_lists_every_place_and_the_remedies(isolated, monkeypatch):
    monkeypatch.setenv("VITKIT_DATA_DIR", str(isolated / "env"))
    partial = isolated / "env" / "fashion-mnist"
    write_fashion(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("fashion-mnist")
    message, cache = str(caught.value), isolated / "home" / ".cache" / "vitkit"
    expected = [isolated / "env", partial, isolated / "env" / "FashionMNIST" / "raw", isolated / "system",
                cache, cache / "fashion-mnist", cache / "FashionMNIST" / "raw"]
    assert [p.split(" (")[0] for p in caught.value.places] == [str(p) for p in expected]
    positions = [message.index(f"- {p}") for p in expected]
    assert positions == sorted(positions)  # listed in search order
    assert "incomplete: no t10k-labels-idx1-ubyte" in message
    for remedy in ("sudo apt-get install dataset-fashion-mnist", "--data-dir", "--download"):
        assert remedy in message


def test_explicit_data_dir_is_the_only_place_searched(isolated, monkeypatch):
    write_fashion(isolated / "env")
    monkeypatch.setenv("VITKIT_DATA_DIR", str(isolated / "env"))  # would be found, but the user named another
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("fashion-mnist", data_dir=isolated / "typo")
    assert caught.value.places == [str(isolated / "typo"), str(isolated / "typo" / "fashion-mnist"),
                                   str(isolated / "typo" / "FashionMNIST" / "raw")]


def test_corrupt_fashion_file_is_an_error_not_a_fallback(isolated):
    write_fashion(isolated / "fm")
    write_fashion(isolated / "system")  # a good copy later in the search order must not be used instead
    bad = isolated / "fm" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros(39, dtype=np.uint8))))  # 39 labels for 40 images
    with pytest.raises(DataFileError, match="39 labels for the 40 images") as caught:
        load_dataset("fashion-mnist", data_dir=isolated / "fm", val_size=5)
    assert str(bad) in str(caught.value)


# --- the real files, when the Debian package is installed ----------------------------------------

@pytest.fixture(scope="module")
def real_fashion():
    if not (REAL_DIR / "train-images-idx3-ubyte.gz").exists():
        message = "Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist)"
        if os.environ.get("CI"):  # `make test` installs it: in CI a skip here would hide a missing set-up step
            pytest.fail(message)
        pytest.skip(message)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("VITKIT_DATA_DIR", raising=False)
        return load_dataset("fashion-mnist", seed=0)


def test_real_fashion_sizes_labels_and_split(real_fashion):
    data = real_fashion
    assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
    assert data.test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    pool_labels = np.empty(60000, dtype=np.int64)
    for split in (data.train, data.val):
        pool_labels[split.indices.numpy()] = split.labels.numpy()
    assert pool_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the official file's first labels
    assert np.bincount(data.val.labels.numpy()).tolist() == [500] * 10
    assert set(data.train.indices.tolist()).isdisjoint(data.val.indices.tolist())


def test_real_fashion_constants_match_the_training_images(real_fashion):
    counts = sum(np.bincount(split.images.numpy().ravel(), minlength=256)
                 for split in (real_fashion.train, real_fashion.val))  # a histogram: exact and fast
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert counts.sum() == 60000 * 28 * 28
    assert abs(mean - fashion_mnist.MEAN[0]) < 5e-5 and abs(std - fashion_mnist.STD[0]) < 5e-5


def test_real_fashion_val_split_depends_only_on_the_seed(real_fashion):
    again = load_dataset("fashion-mnist", data_dir=REAL_DIR, seed=0)
    other = load_dataset("fashion-mnist", data_dir=REAL_DIR, seed=1)
    assert np.array_equal(again.val.indices, real_fashion.val.indices)
    assert not np.array_equal(other.val.indices, real_fashion.val.indices)
    assert np.array_equal(other.test.labels, real_fashion.test.labels)
