"""A bounded load on a real `vitkit serve` over loopback (benchmarks/serve_load.py): every request answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import vitkit

ROOT = Path(__file__).resolve().parents[1]


def test_2000_requests_at_concurrency_16_all_succeed_in_batches(tmp_path):
    torch.manual_seed(0)
    model = vitkit.create_model("Ti/4", img_size=28, in_chans=1, num_classes=10, width=32, depth=2, heads=2,
                                mlp_dim=64)
    weights = tmp_path / "tiny.safetensors"
    vitkit.save_weights(model, weights)
    command = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--weights", str(weights),
               "--requests", "2000", "--concurrency", "16", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = (tmp_path / "out").glob("serve_load_*.json")
    record = json.loads(report.read_text())
    assert record["outcomes"] == {"200": 2000} and record["failed"] == 0
    sizes = {int(k): v for k, v in record["batch_sizes"].items()}
    assert sum(k * n for k, n in sizes.items()) == 2000  # every request went through the queue once
    assert max(sizes) > 1 and max(sizes) <= 16  # concurrent requests shared batches, never over --max_batch
    latency = record["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
