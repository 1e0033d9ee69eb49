"""vitkit.weights: files, round trips, loading rules and refusal of bad input.

Parity against timm, HF transformers and the official .npz layout is in test_weights_parity.py.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from randomised import randomise_
from vitkit.model import ViT, create_model
from vitkit.weights import (
    CONFIG_KEY,
    WeightsError,
    detect_format,
    export_npz,
    infer_config,
    load_model,
    load_weights,
    read_weights,
    save_weights,
)

timm_pos_embed = pytest.importorskip("timm.layers.pos_embed")

TINY = dict(img_size=32, num_classes=5, width=32, depth=2, heads=4, mlp_dim=64)


def tiny(seed: int = 0, **overrides) -> ViT:
    torch.manual_seed(seed)
    return randomise_(create_model("Ti/8", **{**TINY, **overrides}), seed).eval()


def images(n: int = 2, size: tuple[int, int] = (32, 32), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ---- save_weights / load_model ----

@pytest.mark.parametrize("overrides", [{}, {"pool": "gap"}, {"representation_size": 24}, {"num_classes": 0}])
def test_save_then_load_model_is_bit_exact_with_metadata(tmp_path, overrides):
    model = tiny(**overrides)
    preprocess = json.dumps({"mean": [0.5] * 3, "std": [0.5] * 3})
    path = save_weights(model, tmp_path / "m.safetensors", metadata={"vitkit_preprocess": preprocess})

    rebuilt = load_model(path)
    assert rebuilt.cfg == model.cfg
    assert_state_equal(rebuilt.state_dict(), model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(images()), model(images()), rtol=0, atol=0)

    state, metadata = read_weights(path)
    assert metadata["vitkit_preprocess"] == preprocess
    assert json.loads(metadata[CONFIG_KEY]) == model.cfg.to_dict()
    assert_state_equal(state, model.state_dict())


def test_save_weights_handles_views_and_shared_storage(tmp_path):
    model = tiny()
    fc1 = model.blocks[0].mlp.fc1
    fc1.weight.data = fc1.weight.data.t().contiguous().t()  # same values, non-contiguous
    model.register_buffer("alias", model.pos_embed.data[0, :2])  # shares storage with pos_embed
    assert not fc1.weight.is_contiguous()
    path = save_weights(model, tmp_path / "m.safetensors")
    state, _ = read_weights(path)
    assert_state_equal(state, model.state_dict())


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_weights(tiny(seed=0), path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("vitkit.weights.safetensors_io.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_weights(tiny(seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_weights_refuses_non_string_metadata_and_the_reserved_key(tmp_path):
    with pytest.raises(TypeError, match="str to str"):
        save_weights(tiny(), tmp_path / "m.safetensors", metadata={"epochs": 3})
    with pytest.raises(ValueError, match="reserved"):
        save_weights(tiny(), tmp_path / "m.safetensors", metadata={CONFIG_KEY: "{}"})
    assert not (tmp_path / "m.safetensors").exists()


def test_load_model_without_config_says_what_to_do(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny().state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match=r"plain\.safetensors.*create_model.*load_weights"):
        load_model(path)


def test_load_model_overrides_resample_and_reset(tmp_path):
    model = tiny()
    path = save_weights(model, tmp_path / "m.safetensors")
    bigger = load_model(path, img_size=48)
    assert bigger.cfg.grid_size == (6, 6) and bigger.pos_embed.shape == (1, 37, 32)
    with pytest.raises(WeightsError, match="reset_head=True"):
        load_model(path, num_classes=3)
    fresh = load_model(path, num_classes=3, reset_head=True)
    assert fresh.head.weight.shape == (3, 32) and not fresh.head.weight.any()


# ---- position embedding from another grid ----

@pytest.mark.parametrize("pool,new_size", [("cls", (48, 48)), ("cls", (40, 64)), ("gap", (24, 48))])
@pytest.mark.parametrize("with_config", [True, False])
def test_pos_embed_from_another_grid_matches_timm_resample(tmp_path, pool, new_size, with_config):
    source = tiny(pool=pool)
    prefix = source.cfg.num_prefix_tokens
    if with_config:
        weights = save_weights(source, tmp_path / "m.safetensors")
    else:
        weights = source.state_dict()  # no config: the old grid is taken as square
    target = create_model("Ti/8", **{**TINY, "pool": pool, "img_size": new_size})
    report = load_weights(target, weights)

    new_grid = (new_size[0] // 8, new_size[1] // 8)
    assert report.pos_embed_resampled == ((4, 4), new_grid)
    expected = timm_pos_embed.resample_abs_pos_embed(
        source.pos_embed.detach(), new_size=list(new_grid), num_prefix_tokens=prefix)
    assert target.pos_embed.shape == (1, prefix + new_grid[0] * new_grid[1], 32)
    torch.testing.assert_close(target.pos_embed.detach(), expected, rtol=0, atol=1e-5)
    assert not torch.equal(target.pos_embed[:, prefix:prefix + 4], source.pos_embed[:, prefix:prefix + 4])


def test_non_square_grid_is_read_from_the_stored_config(tmp_path):
    source = tiny(img_size=(32, 64))  # 4x8 grid: 32 positions, not a square
    path = save_weights(source, tmp_path / "m.safetensors")
    target = create_model("Ti/8", **{**TINY, "img_size": (64, 64)})
    assert load_weights(target, path).pos_embed_resampled == ((4, 8), (8, 8))
    expected = timm_pos_embed.resample_abs_pos_embed(source.pos_embed.detach(), new_size=[8, 8], old_size=[4, 8])
    torch.testing.assert_close(target.pos_embed.detach(), expected, rtol=0, atol=1e-5)
    with pytest.raises(WeightsError, match="cannot tell the patch grid"):
        load_weights(create_model("Ti/8", **{**TINY, "img_size": (64, 64)}), source.state_dict())


def test_pos_embed_without_class_token_row_gets_a_zero_row():
    # timm's no_embed_class / DeiT III: the class token is added after the position embedding.
    source = tiny()
    state = source.state_dict()
    state["pos_embed"] = state["pos_embed"][:, 1:].clone()
    target = create_model("Ti/8", **TINY)
    load_weights(target, state)
    assert not target.pos_embed[:, 0].any()
    assert torch.equal(target.pos_embed[:, 1:], source.pos_embed[:, 1:])


# ---- heads, pools and mismatches ----

def test_head_of_another_size_needs_reset_head():
    source = tiny()
    target = create_model("Ti/8", **{**TINY, "num_classes": 7})
    with pytest.raises(WeightsError, match=r"5-class head.*7-class head.*reset_head=True"):
        load_weights(target, source.state_dict())

    report = load_weights(target, source.state_dict(), reset_head=True)
    assert report.head_reset and report.dropped == ["head.weight", "head.bias"]
    assert target.head.weight.shape == (7, 32) and not target.head.weight.any() and not target.head.bias.any()
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(target.state_dict()[key], value), key


def test_a_refused_load_leaves_the_model_untouched():
    state = tiny().state_dict()
    state["blocks.0.mlp.fc2.bias"] = torch.zeros(7)
    target = create_model("Ti/8", **{**TINY, "num_classes": 7})
    with torch.no_grad():
        target.head.weight.fill_(0.5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match="blocks.0.mlp.fc2.bias"):
        load_weights(target, state, reset_head=True)
    assert_state_equal(target.state_dict(), before)


def test_reset_head_drops_pre_logits_the_model_lacks():
    source = tiny(representation_size=24)
    with pytest.raises(WeightsError, match="representation_size=24"):
        load_weights(create_model("Ti/8", **{**TINY, "num_classes": 0}), source.state_dict())
    target = create_model("Ti/8", **{**TINY, "num_classes": 10})
    report = load_weights(target, source.state_dict(), reset_head=True)
    assert sorted(report.dropped) == ["head.bias", "head.weight", "pre_logits.fc.bias", "pre_logits.fc.weight"]
    assert torch.equal(target.norm.weight, source.norm.weight)


def test_heads_recorded_in_the_file_must_match(tmp_path):
    path = save_weights(tiny(heads=4), tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match="4 attention heads.*heads=4"):
        load_weights(create_model("Ti/8", **{**TINY, "heads": 2}), path)


def test_pool_mismatch_is_named():
    with pytest.raises(WeightsError, match="pool='gap'"):
        load_weights(create_model("Ti/8", **{**TINY, "pool": "gap"}), tiny().state_dict())
    with pytest.raises(WeightsError, match="pool='gap'"):
        load_weights(create_model("Ti/8", **TINY), tiny(pool="gap").state_dict())


def test_mismatches_list_every_key_with_both_shapes():
    state = tiny().state_dict()
    del state["norm.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(16, 32)
    target = create_model("Ti/8", **TINY)
    with pytest.raises(WeightsError) as info:
        load_weights(target, state)
    message = str(info.value)
    assert "blocks.1.mlp.fc1.weight: weights (16, 32), model (64, 32)" in message
    assert "missing from the weights: norm.bias (model (32,))" in message
    assert "not in the model: extra.weight (weights (3,))" in message
    assert "3 problem(s)" in message

    # strict=False tolerates missing/unexpected keys but never a wrong shape.
    with pytest.raises(WeightsError, match="blocks.1.mlp.fc1.weight") as info:
        load_weights(target, state, strict=False)
    assert "norm.bias" not in str(info.value)
    state["blocks.1.mlp.fc1.weight"] = tiny().state_dict()["blocks.1.mlp.fc1.weight"]
    report = load_weights(target, state, strict=False)
    assert report.missing == ["norm.bias"] and report.unexpected == ["extra.weight"]
    assert torch.equal(target.blocks[1].mlp.fc1.weight, state["blocks.1.mlp.fc1.weight"])


def resnet_like_state_dict() -> dict[str, torch.Tensor]:
    return {"conv1.weight": torch.zeros(8, 3, 7, 7), "bn1.weight": torch.ones(8), "bn1.bias": torch.zeros(8),
            "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3), "fc.weight": torch.zeros(10, 8),
            "fc.bias": torch.zeros(10)}


def test_another_architecture_is_refused_with_the_keys_seen(tmp_path):
    with pytest.raises(WeightsError, match=r"not a Vision Transformer.*conv1\.weight, bn1\.weight"):
        load_weights(create_model("Ti/8", **TINY), resnet_like_state_dict())
    path = tmp_path / "resnet.pt"
    torch.save({"state_dict": resnet_like_state_dict(), "epoch": 3}, path)
    with pytest.raises(WeightsError, match="layer1.0.conv1.weight"):
        load_weights(create_model("Ti/8", **TINY), path)


@pytest.mark.parametrize("key,what", [("fc_norm.weight", "fc_norm"), ("blocks.0.ls1.gamma", "layer scale"),
                                      ("reg_token", "register tokens")])
def test_timm_features_vitkit_lacks_are_refused(key, what):
    state = tiny().state_dict()
    state[key] = torch.ones(32)
    with pytest.raises(WeightsError, match=what):
        load_weights(create_model("Ti/8", **TINY), state)


# ---- formats and config inference ----

def test_detect_format_from_keys(tmp_path):
    model = tiny()
    state = model.state_dict()
    assert detect_format(state) == "vitkit"
    state_timm = {**state, "fc_norm.weight": torch.ones(32)}
    assert detect_format(state_timm) == "timm"
    npz = export_npz(model, tmp_path / "m.npz")
    official, _ = read_weights(npz)
    assert detect_format(official) == "official"
    assert detect_format({"params/" + k: v for k, v in official.items()}) == "official"
    assert detect_format({"opt/target/" + k: v for k, v in official.items()}) == "official"
    hf = {"vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"]}
    assert detect_format(hf) == "hf"
    assert detect_format({"embeddings.patch_embeddings.projection.weight": hf[next(iter(hf))]}) == "hf"
    with pytest.raises(WeightsError, match="fc.weight"):
        detect_format(resnet_like_state_dict())


def test_wrappers_and_prefixes_are_unwrapped(tmp_path):
    model = tiny()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "model": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    state, metadata = read_weights(path)
    assert metadata == {}
    assert_state_equal(state, model.state_dict())
    target = create_model("Ti/8", **TINY)
    load_weights(target, {"state_dict": {"_orig_mod." + k: v for k, v in model.state_dict().items()}})
    assert_state_equal(target.state_dict(), model.state_dict())


@pytest.mark.parametrize("overrides", [{}, {"pool": "gap", "img_size": 48}, {"representation_size": 24}])
def test_infer_config_rebuilds_the_architecture(tmp_path, overrides):
    model = tiny(**overrides)
    assert infer_config(model.state_dict(), heads=4) == model.cfg
    with pytest.raises(WeightsError, match="pass heads="):  # width 32: no paper size, not a multiple of 64
        infer_config(model.state_dict())
    official, _ = read_weights(export_npz(model, tmp_path / "m.npz"))
    assert infer_config(official, "official") == model.cfg  # heads come from the (D, h, hd) kernels
    with pytest.raises(WeightsError, match="2 attention heads|4 attention heads"):
        infer_config(official, heads=2)


def test_infer_config_knows_the_paper_sizes():
    with torch.device("meta"):
        state = create_model("H/14", num_classes=0).state_dict()
    assert infer_config(state).heads == 16  # not 1280 // 64


# ---- bad files ----

def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        read_weights(tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        load_weights(create_model("Ti/8", **TINY), tmp_path / "nowhere.npz")


def test_unsupported_suffix_is_named(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x89HDF\r\n")
    with pytest.raises(WeightsError, match=r"weights\.h5.*'\.h5'.*\.safetensors"):
        read_weights(path)


def test_truncated_safetensors_is_refused(tmp_path):
    path = save_weights(tiny(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"m\.safetensors.*truncated or corrupt"):
        read_weights(path)
    with pytest.raises(WeightsError):
        load_model(path)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"not a weights file at all" * 40,
                                     (2**40).to_bytes(8, "little") + b"{}"])
def test_garbage_safetensors_is_refused(tmp_path, garbage):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(garbage)
    with pytest.raises(WeightsError, match="junk.safetensors"):
        read_weights(path)


def crafted_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


# (header entry of tensor "w", what the safetensors reader says) over 16 bytes of data.
CLAIMS = {
    "terabytes": ({"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}, "file not fully covered"),
    "shape-over-offsets": ({"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]},
                           "invalid shape, data type, or offset"),
    "shape-disagrees": ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]},
                        "invalid shape, data type, or offset"),
    "past-the-end": ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, "file not fully covered"),
    "size-overflows": ({"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}, "overflow"),
}


@pytest.mark.parametrize("claim", list(CLAIMS))
def test_safetensors_header_claiming_what_the_file_does_not_hold_is_refused(tmp_path, claim):
    import tracemalloc

    entry, reason = CLAIMS[claim]
    path = crafted_safetensors(tmp_path / "crafted.safetensors", {"w": entry}, bytes(16))
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError) as caught:
            read_weights(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Refused by the header check, before any tensor is read: not by a failed allocation.
    assert str(caught.value).startswith(f"{path} is not a readable .safetensors file (Error while deserializing "
                                        "header: ") and reason in str(caught.value)
    assert peak < 2**20


def test_safetensors_header_that_fits_is_read(tmp_path):
    # The same crafting with an honest header gives a readable file: the checks are not refusing everything.
    data = np.array([1, 2, 3, 4], dtype="<f4").tobytes()
    path = crafted_safetensors(tmp_path / "ok.safetensors",
                               {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, data)
    state, metadata = read_weights(path)
    assert torch.equal(state["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]])) and metadata == {}


def test_truncated_npz_is_refused(tmp_path):
    path = export_npz(tiny(), tmp_path / "m.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"m\.npz.*truncated or corrupt"):
        read_weights(path)


def test_npz_with_object_array_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, w=np.zeros(3, np.float32), o=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(WeightsError, match=r"objects\.npz.*'o\.npy'.*Python objects"):
        read_weights(path)


def test_npz_object_array_with_a_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    np.savez(path, w=np.zeros(3, np.float32), o=payload)
    with pytest.raises(WeightsError, match=r"evil\.npz.*'o\.npy'.*Python objects"):
        read_weights(path)
    with pytest.raises(WeightsError):
        load_weights(create_model("Ti/8", **TINY), path)
    assert not marker.exists()

    # Control: numpy with pickles allowed runs the payload, so the refusal above is what kept it from running.
    with np.load(path, allow_pickle=True) as archive:
        archive["o"]
    assert marker.read_text() == "code ran"


def lying_npz(path: Path, shape: tuple[int, ...]) -> Path:
    """An .npz whose one member holds a 4x4 float32 array but whose .npy header declares `shape`."""
    buf = io.BytesIO()
    np.save(buf, np.arange(16, dtype=np.float32).reshape(4, 4))
    raw = buf.getvalue()
    header_len = int.from_bytes(raw[8:10], "little")
    header = raw[10:10 + header_len].replace(b"'shape': (4, 4)", f"'shape': {shape}".encode())
    header = header.rstrip(b"\n ").ljust(header_len - 1) + b"\n"  # same length: the data offset stays put
    assert len(header) == header_len
    with zipfile.ZipFile(path, "w") as archive:  # a valid zip: correct CRC and sizes
        archive.writestr("w.npy", raw[:10] + header + raw[10 + header_len:])
    return path


def test_npz_header_claiming_a_huge_array_is_refused_without_allocating(tmp_path):
    path = lying_npz(tmp_path / "huge.npz", (1_000_000, 1_000_000))  # 4 TB of float32
    # numpy itself trusts the header and tries to allocate it: this file is a real hazard.
    with pytest.raises((MemoryError, ValueError)):
        np.load(path, allow_pickle=False)["w"]
    with pytest.raises(WeightsError, match=r"huge\.npz.*'w\.npy'.*\(1000000, 1000000\)"):
        read_weights(path)


def test_npz_header_that_fits_is_read(tmp_path):
    # The same crafting with an honest shape gives a readable file: the check is not refusing everything.
    state, _ = read_weights(lying_npz(tmp_path / "ok.npz", (4, 4)))
    assert torch.equal(state["w"], torch.arange(16, dtype=torch.float32).reshape(4, 4))
    with pytest.raises(WeightsError, match="inconsistent"):
        read_weights(lying_npz(tmp_path / "short.npz", (2, 4)))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickle_with_a_payload_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "marker.txt"
    path = tmp_path / f"evil{suffix}"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, path)

    with pytest.raises(WeightsError, match=rf"evil\{suffix}.*refused"):
        read_weights(path)
    with pytest.raises(WeightsError):
        load_weights(create_model("Ti/8", **TINY), path)
    assert not marker.exists()

    # Control: an unsafe load does run the payload, so the refusal above is what kept it from running.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_truncated_pickle_is_refused(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(tiny().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut\.pt.*truncated or corrupt"):
        read_weights(path)


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="list.*not a dict of tensors"):
        read_weights(path)


def test_top_level_api_is_exported():
    for name in ("save_weights", "load_weights", "load_model", "read_weights", "export_npz", "WeightsError"):
        assert getattr(vitkit, name) is getattr(vitkit.weights, name)
    assert issubclass(WeightsError, ValueError)
