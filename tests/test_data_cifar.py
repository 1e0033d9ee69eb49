"""CIFAR batch files: exact pixels from batches we pickle ourselves, and crafted pickles refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkit.data import DataFileError, DatasetNotFoundError, load_dataset
from vitkit.data.safe_pickle import load_data_pickle

NAMES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def batch(n: int, offset: int, num_classes: int = 10, label_key: str = "labels", byte_keys: bool = False) -> dict:
    rng = np.random.default_rng(offset)
    content = {"batch_label": f"batch {offset}", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               label_key: [int(v) for v in (np.arange(n) + offset) % num_classes],
               "filenames": [f"img_{offset}_{i}.png" for i in range(n)]}
    return {k.encode() if byte_keys else k: v for k, v in content.items()}


def dump(path: Path, obj, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, protocol: int = 2, byte_keys: bool = False, per_batch: int = 4) -> dict:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = batch(per_batch, 10 * i, byte_keys=byte_keys)
        dump(directory / f"data_batch_{i}", batches[f"data_batch_{i}"], protocol)
    batches["test_batch"] = batch(3, 99, byte_keys=byte_keys)
    dump(directory / "test_batch", batches["test_batch"], protocol)
    dump(directory / "batches.meta", {"label_names": NAMES10, "num_vis": 3072}, protocol)
    return batches


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VITKIT_DATA_DIR", raising=False)


@pytest.mark.parametrize("protocol, byte_keys", [(2, False), (2, True), (4, False), (5, False)])
def test_cifar10_pixels_labels_and_names_are_exact(tmp_path, protocol, byte_keys):
    batches = write_cifar10(tmp_path, protocol, byte_keys)
    key = (lambda k: k.encode()) if byte_keys else (lambda k: k)
    data = load_dataset("cifar10", data_dir=tmp_path, val_size=5, seed=1)
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 3)
    pool = np.concatenate([batches[f"data_batch_{i}"][key("data")] for i in range(1, 6)])
    pool_labels = np.concatenate([batches[f"data_batch_{i}"][key("labels")] for i in range(1, 6)])
    for split in (data.train, data.val):
        np.testing.assert_array_equal(split.images.reshape(len(split), 3072).numpy(), pool[split.indices.numpy()])
        np.testing.assert_array_equal(split.labels.numpy(), pool_labels[split.indices.numpy()])
    test_rows = batches["test_batch"][key("data")]
    image, label = data.test[2]
    # row layout: 1024 red values, then green, then blue, each 32 rows of 32
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == (2 + 99) % 10
    assert image[1, 5, 7].item() == test_rows[2, 1024 + 5 * 32 + 7]
    assert image[2, 31, 0].item() == test_rows[2, 2048 + 31 * 32]
    assert data.class_names == NAMES10 and data.num_classes == 10 and data.in_chans == 3
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2470, 0.2435, 0.2616)


def test_cifar100_uses_fine_labels_and_names(tmp_path):
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    train = batch(200, 0, num_classes=100, label_key="fine_labels")
    train["coarse_labels"] = [0] * 200
    dump(directory / "train", train, 2)
    dump(directory / "test", batch(100, 1, num_classes=100, label_key="fine_labels"), 2)
    names = [f"fine{i}" for i in range(100)]
    dump(directory / "meta", {"fine_label_names": names, "coarse_label_names": ["c"] * 20}, 2)
    data = load_dataset("cifar100", data_dir=directory, val_size=100)  # the directory itself works too
    assert (len(data.train), len(data.val), len(data.test)) == (100, 100, 100)
    assert np.bincount(data.val.labels.numpy()).tolist() == [1] * 100
    assert data.test.labels[:3].tolist() == [1, 2, 3] and data.class_names == names and data.num_classes == 100


class Payload:
    """Unpickling this runs `callable(*args)`: what a crafted 'dataset file' would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("make_payload, refused", [
    (lambda marker: Payload(exec, f"open({str(marker)!r}, 'w').write('pwned')"), "builtins.exec"),
    (lambda marker: Payload(os.system, f"touch {marker}"), ".system"),
    (lambda marker: Payload(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"), "builtins.eval"),
], ids=["exec", "os.system", "eval"])
def test_crafted_batch_is_refused_and_runs_nothing(tmp_path, make_payload, refused):
    write_cifar10(tmp_path)
    marker = tmp_path / "MARKER"
    crafted = batch(4, 10)
    crafted["data"] = make_payload(marker)  # hidden inside an otherwise ordinary batch
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    dump(path, crafted, 2)
    with pytest.raises(DataFileError, match="refused to unpickle") as caught:
        load_dataset("cifar10", data_dir=tmp_path, val_size=2)
    assert str(path) in str(caught.value) and refused in str(caught.value)
    assert not marker.exists()
    if refused == "builtins.exec":
        pickle.loads(path.read_bytes())  # proof that the file is a real payload: plain pickle runs it
        assert marker.exists()


def test_restricted_unpickler_still_reads_plain_data(tmp_path):
    obj = {"a": [1, 2, "x", b"\x00\xff"], "arr": np.arange(6, dtype=np.int32).reshape(2, 3)}
    for protocol in (2, 3, 4, 5):
        dump(tmp_path / "p", obj, protocol)
        back = load_data_pickle(tmp_path / "p")
        assert back["a"] == obj["a"] and np.array_equal(back["arr"], obj["arr"])


@pytest.mark.parametrize("content, reason", [
    (lambda: pickle.dumps(batch(4, 10))[:-40], "not a readable pickle"),
    (lambda: b"this is not a pickle", "not a readable pickle"),
    (lambda: pickle.dumps([1, 2, 3]), "expected a dict"),
    (lambda: pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}), "uint8 array (N, 3072)"),
    (lambda: pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}), "3 labels for 4 images"),
    (lambda: pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}), "labels must lie in 0..9"),
    (lambda: pickle.dumps({"data": np.zeros((4, 3072), np.uint8)}), "expected keys"),
], ids=["truncated", "text", "list", "shape", "count", "range", "keys"])
def test_malformed_batches_name_the_file_and_the_fault(tmp_path, content, reason):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(content())
    with pytest.raises(DataFileError, match=reason.replace("(", r"\(").replace(")", r"\)")) as caught:
        load_dataset("cifar10", data_dir=tmp_path, val_size=2)
    assert str(path) in str(caught.value)


def test_cifar_not_found_lists_places_and_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("cifar10")
    cache = tmp_path / "home" / ".cache" / "vitkit"
    assert caught.value.places == [str(tmp_path / "env"), str(tmp_path / "env" / "cifar-10-batches-py"),
                                   str(cache), str(cache / "cifar-10-batches-py")]
    assert "--download" in str(caught.value) and "--data-dir" in str(caught.value)
