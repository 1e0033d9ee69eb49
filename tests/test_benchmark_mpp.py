"""The MPP label-efficiency benchmark runs end to end in its quick mode, and resumes without re-running steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


# 26-28 s, of a default suite that reached 591 s on a slower machine: `make test-slow` runs it.
@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST is not installed (make data)")
def test_quick_mode_writes_its_report_and_resumes(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "mpp_label_efficiency.py"), "--quick",
               "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted((tmp_path / "out").glob("mpp_quick_*.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").exists()
    record = json.loads(reports[0].read_text())
    for fraction, arms in record["fine_tuning"].items():
        for init in ("scratch", "mpp"):
            assert 5.0 <= arms[init]["mean"] <= 100.0, (fraction, init, arms[init])
            assert arms[init]["chosen_lr"] in record["plan"]["lrs"]
    assert set(record["few_shot"]) == {"mpp", "random init"}
    # A second call finds every step finished: it only writes the report again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "running:" in done.stdout and "running:" not in again.stdout
