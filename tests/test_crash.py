"""Kill -9 at any moment: a run that is killed and resumed, again and again, ends bit-for-bit where an
uninterrupted run ends. The kills come from outside at random times and, through the test hook in
`vitkit.crash_points`, at the worst places: inside checkpoint writes and between their parts."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitkit import crash_points
from vitkit.atomic import atomic_path, atomic_write_text
from vitkit.train.checkpoint import (Position, last_checkpoint, load_training_state, save_checkpoint,
                                     set_rng_state)
from vitkit.weights import read_weights, save_weights

TRAIN = [sys.executable, "-m", "vitkit.cli", "train", "--data", "synthetic", "--model.width", "32",
         "--model.depth", "2", "--model.heads", "2", "--model.mlp_dim", "64", "--model.dropout", "0.1",
         "--data.crop", "pad", "--data.pad", "1", "--optim.batch_size", "32", "--optim.epochs", "3",
         "--optim.ema", "0.9", "--run.checkpoint_every", "5", "--run.progress", "false",
         "--run.tensorboard", "false"]
# 28 steps per epoch, 84 in all; a checkpoint every 5 steps and at each epoch's end.


def launch(out: Path, crash_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VITKIT_CRASH_AT", None)
    if crash_at:
        env["VITKIT_CRASH_AT"] = crash_at
    resume = ["--run.resume", "true"] if (out / "config.yaml").exists() else []
    return subprocess.Popen(TRAIN + ["--run.out", str(out), *resume], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    code, out, err = finish_with_output(process)
    return code, err


def finish_with_output(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of a run that was never interrupted."""
    out = tmp_path_factory.mktemp("whole") / "run"
    code, err = finish(launch(out))
    assert code == 0, err
    return load_file(out / "model.safetensors")


# Each kill is at the n-th arrival at the point, counted from the (re)start of that process, with what the
# run directory must hold afterwards: the checkpoint `last` names, the checkpoint the process had started
# from (None: a new run), and the files of the cut checkpoint write that must or must not exist.
HOOKED_KILLS = [
    # step 10's weights and state both written, `last` not moved yet: it still names step 5.
    ("checkpoint.before_pointer:2", 5, None, {"step-000010.safetensors": True, "step-000010.state.pt": True}),
    # (from step 5: step 10's weights, state and pointer, then) step 15's weights complete in their temporary
    # file, not renamed into place.
    ("atomic.before_replace:4", 10, 5, {".step-000015.safetensors.*.tmp": True, "step-000015.safetensors": False}),
    # step 15's weights written, its training state not.
    ("checkpoint.after_weights:1", 10, 10, {"step-000015.safetensors": True, "step-000015.state.pt": False}),
    # between checkpoints (step 18, checkpoint 15 written): the steps since the last one are lost.
    ("train.after_step:8", 15, 10, {"step-000020.safetensors": False, ".*.tmp": False}),
]


def test_sigkill_inside_checkpoint_writes_then_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    for crash_at, last_step, resumed_from, files in HOOKED_KILLS:
        code, stdout, err = finish_with_output(launch(out, crash_at))
        assert code == -signal.SIGKILL, f"{crash_at}: the hook did not fire (exit {code}): {err}"
        _assert_resumed_from(stdout, out, resumed_from)
        _assert_last_is_complete(out, last_step)
        for pattern, present in files.items():
            assert bool(list((out / "checkpoints").glob(pattern))) == present, (crash_at, pattern)
    code, stdout, err = finish_with_output(launch(out))
    assert code == 0, err
    _assert_resumed_from(stdout, out, 15)
    _assert_same(load_file(out / "model.safetensors"), uninterrupted)
    assert not list((out / "checkpoints").glob(".*.tmp")), "temporary files of cut writes were left behind"


def _assert_resumed_from(stdout: str, run: Path, step: int | None) -> None:
    if step is None:
        assert "resuming" not in stdout
    else:  # 28 steps per epoch: every checkpoint here is in the first epoch
        assert f"resuming {run} at step {step} (epoch 1, batch {step})" in stdout, stdout


def _assert_last_is_complete(run: Path, step: int | None = None) -> None:
    """`last` names a checkpoint whose weights and training state both read back (at `step`, when given)."""
    found = last_checkpoint(run)
    assert found is not None, f"{run} has no usable checkpoint"
    weights, state = found
    assert read_weights(weights)[0], weights
    position = load_training_state(state)["position"]
    assert weights.name == f"step-{position['step']:06d}.safetensors"
    if step is not None:
        assert position == {"step": step, "epoch": 0, "batch": step}


def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    rng = random.Random(1234)
    killed_mid_training = 0
    for _ in range(3):
        before = _last_checkpoint(out)
        process = launch(out)
        # Once this process has written a checkpoint it is surely training: kill it a random moment later.
        while process.poll() is None and _last_checkpoint(out) == before:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        code, _ = finish(process)
        if code == -signal.SIGKILL and not (out / "results.json").exists():
            killed_mid_training += 1
        _assert_last_is_complete(out)  # wherever the kill landed, `last` names a whole checkpoint
    assert killed_mid_training, "no kill landed while the run was training: the test proved nothing"
    code, err = finish(launch(out))
    assert code == 0, err
    _assert_same(load_file(out / "model.safetensors"), uninterrupted)


def _last_checkpoint(run: Path) -> str | None:
    try:
        return (run / "checkpoints" / "last").read_text()
    except OSError:
        return None


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- the write protocol, step by step (in process) ------------------------------------------------------------

def test_atomic_write_fsyncs_the_temporary_file_renames_it_then_syncs_the_directory(tmp_path, monkeypatch):
    target = tmp_path / "file.txt"
    target.write_text("old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            events.append(("fsync directory", info.st_ino == tmp_path.stat().st_ino))
        else:
            events.append(("fsync file", info.st_size, target.read_text()))
        real_fsync(fd)

    def replace(source, destination):
        source = Path(source)
        events.append(("replace", source.name.startswith(".file.txt.") and source.suffix == ".tmp",
                       Path(destination) == target, source.read_text()))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(target, "new!")
    # The new content is flushed to disk under the temporary name while the file still holds the old content,
    # then renamed over it, then the directory entry is made durable.
    assert events == [("fsync file", 4, "old"), ("replace", True, True, "new!"), ("fsync directory", True)]
    assert target.read_text() == "new!" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_an_atomic_write_gets_the_mode_a_plain_write_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        atomic_write_text(tmp_path / "atomic.txt", "x")
        with atomic_path(tmp_path / "rewritten.bin") as tmp:  # a writer that creates its file anew
            tmp.unlink()
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("atomic.txt", "rewritten.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def _checkpoint(run: Path, step: int, model: torch.nn.Module) -> Path:
    return save_checkpoint(run, Position(step, 0, step), lambda path: save_weights(model, path),
                           {"note": f"state of step {step}"})


def test_checkpoint_pointer_moves_only_after_weights_and_state_are_complete(tmp_path, monkeypatch):
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    _checkpoint(run, 5, model)
    directory = run / "checkpoints"
    seen = []

    def reached(point):
        names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
        temporary = [p.name.split(".tmp")[0].rsplit(".", 1)[0] for p in directory.glob(".*.tmp")]
        seen.append((point, (directory / "last").read_text(), names, temporary))

    monkeypatch.setattr(crash_points, "reached", reached)
    _checkpoint(run, 10, model)
    old = ["last", "step-000005.safetensors", "step-000005.state.pt"]
    assert seen == [
        ("atomic.before_replace", "step-000005\n", old, [".step-000010.safetensors"]),
        ("checkpoint.after_weights", "step-000005\n", [*old, "step-000010.safetensors"], []),
        ("atomic.before_replace", "step-000005\n", [*old, "step-000010.safetensors"], [".step-000010.state.pt"]),
        ("checkpoint.before_pointer", "step-000005\n", [*old, "step-000010.safetensors", "step-000010.state.pt"],
         []),
        ("atomic.before_replace", "step-000005\n", [*old, "step-000010.safetensors", "step-000010.state.pt"],
         [".last"]),
    ]
    assert (directory / "last").read_text() == "step-000010\n"
    weights, state = last_checkpoint(run)
    assert weights == directory / "step-000010.safetensors"
    assert load_training_state(state)["note"] == "state of step 10"
    # keep=2: both are kept; a third checkpoint removes the oldest.
    _checkpoint(run, 15, model)
    assert sorted(p.name for p in directory.iterdir()) == ["last", "step-000010.safetensors", "step-000010.state.pt",
                                                           "step-000015.safetensors", "step-000015.state.pt"]


def test_training_state_restores_position_and_every_random_generator_exactly(tmp_path):
    def draws():
        return (random.random(), random.gauss(0, 1), np.random.random_sample(), float(np.random.standard_normal()),
                torch.rand(3).tolist(), torch.randn(1).tolist())

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # Python and numpy cache the second of each pair of normal draws: the cache is state too
    np.random.standard_normal()
    torch.randn(5)
    _checkpoint(tmp_path, 17, torch.nn.Linear(2, 2))
    expected = draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draws() != expected

    state = load_training_state(tmp_path / "checkpoints" / "step-000017.state.pt")
    assert state["position"] == {"step": 17, "epoch": 0, "batch": 17}
    set_rng_state(state["rng"])
    assert draws() == expected


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


def test_training_state_with_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "step-000005.state.pt"
    torch.save({"position": {"step": 5, "epoch": 0, "batch": 5}, "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError) as caught:
        load_training_state(path)
    assert str(caught.value) == (f"cannot read training state {path}: refused, it asks for Python objects beyond "
                                 "tensors and plain data (loading it could run code), which vitkit never writes "
                                 "there. Delete this checkpoint to resume from an earlier one, or start a new run.")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: an unsafe load runs it
    assert marker.read_text() == "code ran"


def test_truncated_training_state_is_refused_in_one_line(tmp_path):
    _checkpoint(tmp_path, 5, torch.nn.Linear(2, 2))
    path = tmp_path / "checkpoints" / "step-000005.state.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError) as caught:
        load_training_state(path)
    message = str(caught.value)
    assert message.startswith(f"cannot read training state {path}: ") and "\n" not in message
    assert message.endswith("Delete this checkpoint to resume from an earlier one, or start a new run.")
