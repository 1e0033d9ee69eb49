"""The installed `vitkit` command: help for every subcommand, clean errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

VITKIT = Path(sys.executable).with_name("vitkit")


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["finetune", "--help"], ["fewshot", "--help"],
                                  ["eval", "--help"], ["predict", "--help"], ["inspect", "--help"],
                                  ["export", "--help"]])
def test_help_works_from_the_installed_script(args):
    assert VITKIT.exists(), f"console script missing at {VITKIT}: run `make setup`"
    done = subprocess.run([str(VITKIT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: vitkit" in done.stdout


def test_python_dash_m_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "vitkit", "eval", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: vitkit [options] eval ") and "--weights WEIGHTS" in done.stdout


def test_train_help_shows_field_docs():
    done = subprocess.run([str(VITKIT), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert "Peak learning rate" in done.stdout and "--optim.lr" in done.stdout
    assert "quick" in done.stdout  # presets are listed


def test_missing_dataset_is_a_clear_error(tmp_path):
    done = subprocess.run([str(VITKIT), "train", "--data.dataset", "cifar10", "--data.data_dir", str(tmp_path),
                           "--run.out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert str(tmp_path) in done.stderr


def test_unknown_dataset_is_a_clear_error(tmp_path):
    done = subprocess.run([str(VITKIT), "train", "--data.dataset", "fashion-mnst", "--run.out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "did you mean 'fashion-mnist'" in done.stderr
