"""Kill -9 at any moment: a run that is killed and resumed, again and again, ends bit-for-bit where an
uninterrupted run ends. The kills come from outside at random times and, through the test hook in
`vitkit.crash_points`, at the worst places: inside checkpoint writes and between their parts."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
    _, err = process.communicate(timeout=300)
    return process.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of a run that was never interrupted."""
    out = tmp_path_factory.mktemp("whole") / "run"
    code, err = finish(launch(out))
    assert code == 0, err
    return load_file(out / "model.safetensors")


# Each kill is at the n-th arrival at the point, counted from the (re)start of that process.
HOOKED_KILLS = ["checkpoint.before_pointer:2",  # weights and state of a checkpoint written, `last` not moved
                "atomic.before_replace:4",  # a file complete in its temporary name, not renamed into place
                "checkpoint.after_weights:1",  # weights written, the training state not
                "train.after_step:8"]  # between checkpoints: the steps since the last one are lost


def test_sigkill_inside_checkpoint_writes_then_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    for crash_at in HOOKED_KILLS:
        code, err = finish(launch(out, crash_at))
        assert code == -signal.SIGKILL, f"{crash_at}: the hook did not fire (exit {code}): {err}"
    code, err = finish(launch(out))
    assert code == 0, err
    _assert_same(load_file(out / "model.safetensors"), uninterrupted)
    assert not list((out / "checkpoints").glob(".*.tmp")), "temporary files of cut writes were left behind"


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
