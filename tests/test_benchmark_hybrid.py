"""The hybrid-versus-ViT benchmark runs end to end in its quick mode, follows its budget rule, and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST is not installed (make data)")
@pytest.mark.slow  # 19 s end to end; `make test-slow` runs it
def test_quick_mode_follows_the_budget_rule_and_resumes(tmp_path):
    work = tmp_path / "work"
    command = [sys.executable, str(ROOT / "benchmarks" / "hybrid_vs_vit.py"), "--quick",
               "--work", str(work), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted((tmp_path / "out").glob("hybrid_vs_vit_quick_*.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").exists()
    record = json.loads(reports[0].read_text())
    labels = ["ViT Ti/4", "hybrid R+Ti/4"]
    assert list(record["runs"]) == list(record["summary"]) == list(record["speed"]) == labels
    speed = {label: record["speed"][label]["images_per_s"] for label in labels}
    assert all(s > 0 for s in speed.values())
    # Equal budget: the ViT trains the plan's epochs, the hybrid the same time at the measured speeds (to 4
    # significant digits, rounded down).
    plan_epochs = record["plan"]["epochs"]
    assert record["epochs"]["ViT Ti/4"] == plan_epochs
    exact = plan_epochs * speed["hybrid R+Ti/4"] / speed["ViT Ti/4"]
    assert exact * (1 - 1e-3) <= record["epochs"]["hybrid R+Ti/4"] <= exact
    for label, runs in record["runs"].items():
        assert [r["seed"] for r in runs] == record["plan"]["seeds"]
        for r in runs:
            assert r["epochs"] == record["epochs"][label]
            assert 0 <= r["test_top1"] <= 100 and r["wall_minutes"] > 0 and r["sessions"] == 1, (label, r)
        # The hybrid's run directory holds a hybrid: its config names the ResNet stem.
        config = (Path(runs[0]["dir"]) / "config.yaml").read_text()
        assert ("R+Ti/4" in config) == (label == "hybrid R+Ti/4")
    best = max(s["test_best"] for s in record["summary"].values())
    assert record["goal_met"] == (best >= 93.5)
    text = reports[0].with_suffix(".md").read_text()
    assert "| ViT Ti/4 |" in text and "| hybrid R+Ti/4 |" in text and record["commit"] in text
    # A second call finds every step finished: it only writes the report again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "running:" in done.stdout and "running:" not in again.stdout


def test_round_down_keeps_four_significant_digits_and_never_rounds_up():
    round_down = benchmark_module("hybrid_vs_vit").round_down
    assert round_down(37.98765) == 37.98
    assert round_down(0.00123456) == pytest.approx(0.001234)
    assert round_down(56.0) == 56.0
    assert round_down(9.99999) == 9.999
