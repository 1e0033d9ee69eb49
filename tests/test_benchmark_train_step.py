"""benchmarks/train_step.py: its contenders are the same training step, differing only in what each names."""

from __future__ import annotations

import json

import torch
from benchmark_scripts import benchmark_module

from vitkit.model import vit

train_step = benchmark_module("train_step")


def test_every_contender_takes_the_same_step_to_float_rounding():
    # fused against foreach AdamW, kept against recomputed attention: the same arithmetic, so after three steps
    # from the same weights on the same batches every contender's weights agree with "before"'s to rounding.
    models = {}
    for name in (*train_step.CONTENDERS, train_step.NOW_FP32):
        model, step = train_step.contender(name, "Ti/7", 0.0, "fp32")
        for _ in range(3):
            step()
        models[name] = model
    before = dict(models["before"].named_parameters())
    for name, model in models.items():
        for key, value in model.named_parameters():
            torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")


def test_the_before_contender_recomputes_the_attention(monkeypatch):
    limit = vit.KEPT_PROBABILITIES_MAX
    recomputed = []
    apply = vit._RecomputedAttention.apply
    monkeypatch.setattr(vit._RecomputedAttention, "apply", lambda *a: recomputed.append(1) or apply(*a))
    for name, depth in (("now", 0), ("kept attention", 0), ("before", 4), ("fused AdamW", 4)):
        recomputed.clear()
        train_step.contender(name, "Ti/7", 0.0, "bf16-mixed")[1]()
        assert len(recomputed) == depth, name  # one call per layer of the depth-4 model
    assert vit.KEPT_PROBABILITIES_MAX == limit  # the context put the limit back


def test_the_report_names_each_contender_with_its_ratio_to_before(tmp_path, monkeypatch):
    monkeypatch.setattr(train_step, "SHAPES", {"quick": ("Ti/7", 0.0)})
    monkeypatch.setattr("sys.argv", ["train_step.py", "--reps", "8", "--out", str(tmp_path)])
    assert train_step.main() == 0
    record = json.loads(next(tmp_path.glob("train_step_*.json")).read_text())
    rows = record["shapes"]["quick"]
    fp32_row = [train_step.NOW_FP32] if record["precision"] != "fp32" else []
    assert list(rows) == [*train_step.CONTENDERS, *fp32_row]
    assert record["auto"]["quick"]["precision"] in ("fp32", "bf16-mixed")
    assert rows["before"]["speedup_vs_before"] == 1.0
    for row in rows.values():
        assert abs(row["images_per_s"] * row["ms_per_step"] / 1000 - train_step.BATCH) < 0.5
    assert "| before |" in next(tmp_path.glob("train_step_*.md")).read_text()
