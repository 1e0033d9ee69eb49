"""`--precision auto` at inference: the candidates by the CPU's features, the timed choice among them, its cache,
and the mode InferenceModel then runs."""

from __future__ import annotations

import json
import time

import pytest
import torch

import vitkit.fastest_mode as fastest_mode
from vitkit.fastest_mode import CACHE_FILE, candidates, choose, training_candidates
from vitkit.inference_modes import InferenceModel, fastest_inference_mode
from vitkit.model import ViT, ViTConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize("bf16, int8, expected", [(False, False, ("fp32",)), (True, False, ("bf16", "fp32")),
                                                  (False, True, ("int8", "fp32")),
                                                  (True, True, ("bf16", "int8", "fp32"))])
def test_the_candidates_follow_the_cpus_features(monkeypatch, bf16, int8, expected):
    monkeypatch.setattr(fastest_mode, "cpu_has_native_bf16", lambda: bf16)
    monkeypatch.setattr(fastest_mode, "cpu_has_int8_kernels", lambda: int8)
    assert candidates(CPU) == expected


@pytest.mark.parametrize("flags, expected", [({"avx2"}, True), ({"avx512_vnni"}, True), ({"avx_vnni"}, True),
                                             ({"amx_int8"}, True), ({"avx", "fma", "sse4_2"}, False)])
def test_int8_kernels_need_vnni_amx_or_avx2(monkeypatch, flags, expected):
    from vitkit import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    assert runtime.cpu_has_int8_kernels() is expected


@pytest.mark.parametrize("bf16, expected", [(False, ("fp32",)), (True, ("bf16-mixed", "fp32"))])
def test_the_training_candidates_follow_the_cpus_features(monkeypatch, bf16, expected):
    monkeypatch.setattr(fastest_mode, "cpu_has_native_bf16", lambda: bf16)
    assert training_candidates(CPU) == expected


def test_the_training_precision_is_timed_on_a_copy_and_remembered(monkeypatch, tmp_path):
    monkeypatch.setattr(fastest_mode, "cpu_has_native_bf16", lambda: True)  # two candidates on any CPU
    torch.manual_seed(0)
    # PatchDropout and dropout draw from torch's RNG in training: the timing must leave it where it was.
    model = ViT(ViTConfig(img_size=16, patch_size=4, in_chans=1, num_classes=5, width=32, depth=2, heads=2,
                          mlp_dim=64, dropout=0.1, patch_dropout=0.5)).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    choice = fastest_mode.fastest_training_precision(model, CPU, 200, tmp_path)
    assert choice.precision in ("bf16-mixed", "fp32") and set(choice.median_ms) == {"bf16-mixed", "fp32"}
    assert choice.median_ms[choice.precision] == min(choice.median_ms.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training and all(p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    cached = json.loads((tmp_path / CACHE_FILE).read_text())
    (entry,) = cached.values()
    assert entry["key"]["training"] is True and entry["key"]["batch"] == fastest_mode.MAX_TIMED_BATCH
    again = fastest_mode.fastest_training_precision(model, CPU, 200, tmp_path)
    assert again.precision == choice.precision and "timed before" in again.reason
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        fastest_mode.fastest_training_precision(model, CPU, 0, tmp_path)


def sleeper(delays: dict[str, float], built: list[str]):
    def build(mode):
        built.append(mode)
        return lambda: time.sleep(delays[mode])
    return build


KEY = {"batch": 4, "model": {"width": 8}}


def test_one_candidate_is_chosen_without_timing(tmp_path):
    def build(mode):
        raise AssertionError("nothing to time")
    choice = choose(("fp32",), build, KEY, tmp_path)
    assert choice.precision == "fp32" and choice.median_ms is None and not (tmp_path / CACHE_FILE).exists()


def test_the_faster_mode_is_chosen_remembered_and_reused(tmp_path):
    built: list[str] = []
    first = choose(("bf16", "int8"), sleeper({"bf16": 0.02, "int8": 0.0}, built), KEY, tmp_path)
    assert first.precision == "int8" and sorted(built) == ["bf16", "int8"] and "timed now at batch 4" in first.reason
    (entry,) = json.loads((tmp_path / CACHE_FILE).read_text()).values()
    assert entry["precision"] == "int8" and entry["key"] == KEY
    assert entry["median_ms"]["bf16"] >= 20 > entry["median_ms"]["int8"] and first.median_ms == entry["median_ms"]

    def build(mode):
        raise AssertionError("a remembered choice is not timed again")
    again = choose(("bf16", "int8"), build, KEY, tmp_path)
    assert again.precision == "int8" and "timed before" in again.reason and again.median_ms == entry["median_ms"]
    # another key (here another batch) is timed on its own, and kept beside the first
    other = choose(("bf16", "int8"), sleeper({"bf16": 0.0, "int8": 0.02}, built), {**KEY, "batch": 1}, tmp_path)
    assert other.precision == "bf16" and len(json.loads((tmp_path / CACHE_FILE).read_text())) == 2


def test_a_remembered_mode_that_is_no_longer_a_candidate_is_timed_again(tmp_path):
    choose(("fp32", "int8"), sleeper({"fp32": 0.0, "int8": 0.02}, []), KEY, tmp_path)
    assert choose(("bf16", "int8"), sleeper({"bf16": 0.0, "int8": 0.02}, []), KEY, tmp_path).precision == "bf16"


def test_an_unreadable_cache_is_timed_over_and_rewritten(tmp_path):
    (tmp_path / CACHE_FILE).write_text("[1, 2")
    with pytest.warns(UserWarning, match=rf"ignoring the unreadable mode cache .*{CACHE_FILE}") as caught:
        choice = choose(("bf16", "int8"), sleeper({"bf16": 0.0, "int8": 0.02}, []), KEY, tmp_path)
    assert len(caught) == 1
    assert choice.precision == "bf16"
    assert json.loads((tmp_path / CACHE_FILE).read_text())[json.dumps(KEY, sort_keys=True)]["precision"] == "bf16"


def test_choices_recorded_while_timing_are_kept(tmp_path):
    # A mode's build may time a choice of its own (fp32's linears) and record it in the same file meanwhile.
    nested_key = {**KEY, "fp32_linears": True}

    def build(mode):
        if mode == "fp32":
            choose(("packed", "aten"), sleeper({"packed": 0.0, "aten": 0.02}, []), nested_key, tmp_path)
        return lambda: time.sleep({"fp32": 0.0, "int8": 0.02}[mode])

    assert choose(("fp32", "int8"), build, KEY, tmp_path).precision == "fp32"
    entries = json.loads((tmp_path / CACHE_FILE).read_text())
    assert {key: entry["precision"] for key, entry in entries.items()} == {
        json.dumps(KEY, sort_keys=True): "fp32", json.dumps(nested_key, sort_keys=True): "packed"}


def test_an_unwritable_cache_still_chooses(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    choice = choose(("bf16", "int8"), sleeper({"bf16": 0.02, "int8": 0.0}, []), KEY, blocked)
    assert choice.precision == "int8" and "not remembered" in choice.reason and blocked.read_text() == "not a directory"


def test_the_cache_lives_where_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.setenv("VITKIT_CACHE_DIR", str(tmp_path / "here"))
    assert fastest_mode.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("VITKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fastest_mode.cache_dir() == tmp_path / "xdg" / "vitkit"


def test_inference_model_auto_runs_the_chosen_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("VITKIT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=16, patch_size=4, in_chans=1, num_classes=5, width=32, depth=2, heads=2,
                          mlp_dim=64)).eval()
    runner = InferenceModel(model, batch_size=3)  # "auto" is the default
    assert runner.choice is not None and runner.precision == runner.choice.precision in candidates(CPU)
    images = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(runner(images), InferenceModel(model, runner.precision)(images), rtol=0, atol=0)
    assert InferenceModel(model, "fp32").choice is None
    if len(candidates(CPU)) > 1:  # the second choice for the same model and batch is the remembered one
        assert "timed before" in fastest_inference_mode(model, CPU, 3).reason
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        fastest_inference_mode(model, CPU, 0)


def test_a_choice_timed_by_other_vitkit_code_is_timed_again(monkeypatch, tmp_path):
    # The digest covers every source file of the package, by path and content.
    package = tmp_path / "package"
    (package / "model").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "model" / "b.py").write_text("y = 2\n")
    monkeypatch.setattr(fastest_mode, "__file__", str(package / "fastest_mode.py"))

    def digest() -> str:
        fastest_mode.code_digest.cache_clear()
        return fastest_mode.code_digest()

    first = digest()
    assert len(first) == 16 and digest() == first
    (package / "model" / "b.py").write_text("y = 3\n")
    assert digest() != first
    (package / "model" / "b.py").write_text("y = 2\n")
    assert digest() == first
    (package / "model" / "b.py").rename(package / "b.py")  # the same content elsewhere is other code
    assert digest() != first
    fastest_mode.code_digest.cache_clear()
    monkeypatch.undo()

    # The key holds the digest, so a choice cached under other code is not reused.
    model = ViT(ViTConfig(img_size=16, patch_size=4, in_chans=1, num_classes=5, width=32, depth=1, heads=2,
                          mlp_dim=64)).eval()
    key = fastest_mode.timing_key(model.cfg.to_dict(), CPU, 4, False)
    assert key["vitkit"] == fastest_mode.code_digest()
    choose(("bf16", "int8"), sleeper({"bf16": 0.02, "int8": 0.0}, []), key, tmp_path)
    built: list[str] = []
    newer = {**key, "vitkit": "0" * 16}
    assert choose(("bf16", "int8"), sleeper({"bf16": 0.0, "int8": 0.02}, built), newer, tmp_path).precision == "bf16"
    assert sorted(built) == ["bf16", "int8"]
