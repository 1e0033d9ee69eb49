"""Untrusted input, fuzzed: damaged or crafted .safetensors and .npz files and run configs either load
correctly or fail with vitkit's own clear error, never another exception and never a huge allocation.

The default suite runs a few hundred cases per reader; `make test-slow` runs many more.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from vitkit.train.config import TrainConfig
from vitkit.train.errors import TrainingError
from vitkit.train.run_dir import resumed_config
from vitkit.weights import WeightsError, read_weights

DEFAULT = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MAX_ALLOCATION = 64 * 2**20  # no input below is larger than a few kB; reading one must not take 64 MB

TENSORS = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.int64)}
SAFETENSORS = safetensors_bytes(TENSORS, metadata={"vitkit_config": "{}"})
NPZ = io.BytesIO()
np.savez(NPZ, a=TENSORS["a"].numpy(), b=TENSORS["b"].numpy())
NPZ = NPZ.getvalue()


def damaged(original: bytes):
    """The file with bytes overwritten, cut short or extended."""
    edits = st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), max_size=8)
    return st.tuples(edits, st.integers(1, len(original)), st.binary(max_size=64)).map(
        lambda t: _apply(original, *t))


def _apply(original: bytes, edits, cut: int, tail: bytes) -> bytes:
    data = bytearray(original)
    for position, value in edits:
        data[position] = value
    return bytes(data[:cut]) + tail


dims = st.lists(st.one_of(st.integers(0, 8), st.integers(2**31, 2**62)), max_size=4)
DTYPES = ["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "XX", ""]


@st.composite
def crafted_safetensors(draw) -> bytes:
    """A header written by hand: any dtypes, shapes and offsets, over a small data block."""
    data = draw(st.binary(max_size=256))
    header = {}
    for name in draw(st.lists(st.sampled_from(["w", "x", "y", "__metadata__"]), max_size=3, unique=True)):
        if name == "__metadata__":
            header[name] = draw(st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers()),
                                                max_size=2))
            continue
        start = draw(st.integers(0, 2**40))
        header[name] = {"dtype": draw(st.sampled_from(DTYPES)), "shape": draw(dims),
                        "data_offsets": [start, start + draw(st.integers(-4, 2**40))]}
    text = json.dumps(header).encode()
    length = draw(st.one_of(st.just(len(text)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + text + data


@st.composite
def crafted_npz(draw) -> bytes:
    """An .npz whose member's .npy header claims any shape and dtype over a few bytes of data."""
    shape = tuple(draw(dims))
    descr = draw(st.sampled_from(["<f4", "<i8", "|u1", "|O", "<c16", "V8", "<U3"]))
    header = repr({"descr": descr, "fortran_order": draw(st.booleans()), "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + draw(st.binary(max_size=64))
    buffer = io.BytesIO()
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        archive.writestr("w.npy", npy)
    return buffer.getvalue()


def _read_or_refuse(path, data: bytes, suffix: str) -> None:
    path = path / f"fuzz{suffix}"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        state, _ = read_weights(path)
    except WeightsError as err:
        assert str(path) in str(err), f"the error does not name the file: {err}"
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MAX_ALLOCATION, f"reading {len(data)} bytes allocated {peak} bytes"
    for name, tensor in state.items():
        assert isinstance(tensor, torch.Tensor), name
        assert tensor.numel() * tensor.element_size() <= len(data), f"{name}: more data than the file holds"


READERS = [(damaged(SAFETENSORS), ".safetensors"), (crafted_safetensors(), ".safetensors"), (damaged(NPZ), ".npz"),
           (crafted_npz(), ".npz")]
READER_IDS = ["safetensors-damaged", "safetensors-crafted", "npz-damaged", "npz-crafted"]


def run_cases(profile: settings, strategy, check) -> int:
    """Run `check` on the examples `profile` asks for; the number of cases run."""
    count = [0]

    @profile
    @given(strategy)
    def run(value):
        count[0] += 1
        check(value)

    run()
    return count[0]


@pytest.mark.parametrize("strategy,suffix", READERS, ids=READER_IDS)
def test_weight_readers_load_or_refuse_clearly(tmp_path, strategy, suffix):
    cases = run_cases(DEFAULT, strategy, lambda data: _read_or_refuse(tmp_path, data, suffix))
    assert cases >= DEFAULT.max_examples  # a few hundred cases per reader, not a handful


@pytest.mark.slow
@pytest.mark.parametrize("strategy,suffix", READERS, ids=READER_IDS)
def test_weight_readers_load_or_refuse_clearly_many_cases(tmp_path, strategy, suffix):
    cases = run_cases(SLOW, strategy, lambda data: _read_or_refuse(tmp_path, data, suffix))
    assert cases >= SLOW.max_examples


def test_undamaged_files_read_back_exactly(tmp_path):
    for data, suffix in ((SAFETENSORS, ".safetensors"), (NPZ, ".npz")):
        path = tmp_path / f"ok{suffix}"
        path.write_bytes(data)
        state, _ = read_weights(path)
        assert all(torch.equal(state[k], TENSORS[k]) for k in TENSORS)


# --- run configs (config.yaml of a run directory, read back on --run.resume) -----------------------------------

yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
field_names = st.sampled_from(["model", "init", "data", "optim", "run", "width", "lr", "betas", "precision", "flip",
                               "epochs", "name", "pool", "weights", "seed", "x"])
config_trees = st.dictionaries(field_names, st.one_of(yaml_values, st.dictionaries(field_names, yaml_values,
                                                                                   max_size=4)), max_size=4)


def _resume_from(tmp_path, text: str) -> None:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text(text)
    try:
        cfg = resumed_config(run, TrainConfig())
    except TrainingError as err:
        assert "config.yaml" in str(err)
        return
    assert cfg.to_dict().keys() == TrainConfig().to_dict().keys()  # a complete, typed config


CONFIG_INPUTS = {"trees": config_trees.map(yaml.safe_dump), "any-text": st.text(max_size=200),
                 "long-text": st.text(max_size=2000)}


@pytest.mark.parametrize("inputs", ["trees", "any-text"])
def test_run_config_reader_accepts_valid_trees_and_refuses_the_rest(tmp_path_factory, inputs):
    cases = run_cases(DEFAULT, CONFIG_INPUTS[inputs], lambda text: _resume_from(tmp_path_factory.mktemp("cfg"), text))
    assert cases >= DEFAULT.max_examples


@pytest.mark.slow
@pytest.mark.parametrize("inputs", ["trees", "long-text"])
def test_run_config_reader_accepts_valid_trees_and_refuses_the_rest_many_cases(tmp_path_factory, inputs):
    cases = run_cases(SLOW, CONFIG_INPUTS[inputs], lambda text: _resume_from(tmp_path_factory.mktemp("cfg"), text))
    assert cases >= SLOW.max_examples


def _code_in_yaml(marker) -> str:
    """A YAML document whose python tag would create `marker` if the loader executed it."""
    return f'optim:\n  lr: !!python/object/apply:os.system ["touch {marker}"]\n'


def test_run_config_is_data_never_code(tmp_path):
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(_code_in_yaml(marker))
    with pytest.raises(TrainingError, match=r"config\.yaml is not a valid vitkit run config"):
        resumed_config(run, TrainConfig())
    assert not marker.exists()
    # Control: an unsafe YAML loader runs it, so the refusal above is what kept it from running.
    yaml.unsafe_load(_code_in_yaml(marker))
    assert marker.exists()


def test_cli_config_file_is_data_never_code(tmp_path, capsys):
    from vitkit.cli import main

    marker = tmp_path / "MARKER"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_code_in_yaml(marker))
    with pytest.raises(SystemExit) as caught:
        main(["train", "--config", str(recipe), "--run.out", str(tmp_path / "run")])
    assert caught.value.code == 2
    assert "could not determine a constructor for the tag" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "run").exists()
