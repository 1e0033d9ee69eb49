"""--optim.time_budget: the arithmetic of the steps that fit, and a budgeted run that is the ordinary run of the
epochs it chose, bit for bit, resumed without timing again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_train import _assert_same_weights, _losses, _stopped_and_resumed, tiny_config
from vitkit.cli import main
from vitkit.train import time_budget, trainer
from vitkit.train.config import TrainConfig
from vitkit.train.optim import lr_factor, warmup_steps
from vitkit.train.time_budget import TimedRun, steps_within
from vitkit.train.trainer import train


def test_steps_within_weighs_each_phase_and_the_evaluations():
    # 60 s, 10 s spent, 1,000 images evaluated at the end at 1 ms: 49 s for the steps. Half the steps at 0.1 s, half
    # at 0.3 s: 0.2 s a step, plus 500 images evaluated per epoch of 100 steps: 0.005 s a step.
    timed = TimedRun(elapsed=10.0, step_seconds=[(0.5, 0.1), (1.0, 0.3)], eval_seconds_per_image=0.001)
    assert steps_within(1.0, timed, steps_per_epoch=100, evaluated_per_epoch=500, evaluated_once=1000,
                        margin=0.0) == 239  # floor(49 / 0.205)
    assert steps_within(1.0, timed, 100, 500, 1000, margin=0.03) == 230  # floor((60 * 0.97 - 11) / 0.205)
    # Phases of unequal length: a quarter of the steps at 1 s, the rest at 0.5 s: 0.625 s a step.
    uneven = TimedRun(elapsed=0.0, step_seconds=[(0.25, 1.0), (1.0, 0.5)], eval_seconds_per_image=0.0)
    assert steps_within(1.0, uneven, 100, 0, 0, margin=0.0) == 96


def test_a_budget_that_leaves_no_time_for_a_step_is_refused_with_the_figures():
    timed = TimedRun(elapsed=70.0, step_seconds=[(1.0, 0.2)], eval_seconds_per_image=0.0)
    with pytest.raises(ValueError, match=r"--optim.time_budget 1 minutes leaves no time for a step: set-up took 70 s"):
        steps_within(1.0, timed, 100, 0, 0)


def test_steps_within_counts_from_the_steps_already_taken():
    # 30.5 of 60 s spent, with the first 50 steps: 29.5 s left. For N steps, steps 50 to N / 2 take 0.1 s, the
    # second half 0.3 s: N = 172 takes 3.6 + 25.8 = 29.4 s, N = 173 takes 29.6 s.
    timed = TimedRun(elapsed=30.5, step_seconds=[(0.5, 0.1), (1.0, 0.3)], eval_seconds_per_image=0.0)
    assert steps_within(1.0, timed, 100, 0, 0, margin=0.0, done=50) == 172
    # With no time left the run stops where it is, and nothing is refused: its steps have been taken.
    late = TimedRun(elapsed=70.0, step_seconds=[(1.0, 0.2)], eval_seconds_per_image=0.0)
    assert steps_within(1.0, late, 100, 0, 0, done=50) == 50


def test_corrected_scales_every_phase_by_how_the_latest_steps_ran():
    timed = TimedRun(elapsed=5.0, step_seconds=[(0.5, 0.1), (1.0, 0.3)], eval_seconds_per_image=0.002)
    # The first 50 of 200 steps, all in the first phase, planned at 5 s, took 10 s: every step is taken to run twice
    # as long.
    now = time_budget.corrected(timed, total=200, first=0, last=50, seconds_in_steps=10.0, elapsed=20.0)
    assert now == TimedRun(elapsed=20.0, step_seconds=[(0.5, 0.2), (1.0, 0.6)], eval_seconds_per_image=0.002)
    # Steps of both phases: 50 at 0.1 s and 10 at 0.3 s were planned at 8 s; they took 4 s.
    now = time_budget.corrected(timed, total=100, first=0, last=60, seconds_in_steps=4.0, elapsed=9.0)
    assert now.step_seconds == [(0.5, 0.05), (1.0, 0.15)]
    # Only the steps since the last correction count: steps 50-59, of the second phase, planned at 3 s, took 6 s.
    now = time_budget.corrected(timed, total=100, first=50, last=60, seconds_in_steps=6.0, elapsed=30.0)
    assert now.step_seconds == [(0.5, 0.2), (1.0, 0.6)]


def _refuse_timing(monkeypatch) -> None:
    """From now on, a run that times its steps fails the test (a resumed run keeps its config.yaml's schedule)."""
    monkeypatch.setattr(trainer, "_fit_time_budget", lambda *args: pytest.fail("a resumed run timed again"))


def _spy_on_the_choice(monkeypatch, steps: int, corrected: dict[int, int] | None = None) -> list[tuple[int, TimedRun]]:
    """Make the budget's choice `steps` (a test cannot wait for what a real budget fits), and when a checkpoint
    plans again after `done` steps, `corrected[done]` (the latest choice where it has no entry), and keep (done,
    what was timed) of each choice."""
    seen = []

    def choose(budget, timed, steps_per_epoch, per_epoch, once, margin=time_budget.BUDGET_MARGIN, done=0):
        seen.append((done, timed))
        if done == 0 or corrected is None:
            return steps
        return corrected.get(done, corrected[max(key for key in corrected if key <= done)])

    monkeypatch.setattr(trainer, "steps_within", choose)
    return seen


def test_a_budgeted_run_is_the_run_of_the_epochs_it_chose_and_resumes_without_timing_again(tmp_path, monkeypatch,
                                                                                            capsys):
    """Timing steps at each PatchDropout rate and putting everything back leaves no trace: the budgeted run (with
    a weight average, so that is put back too) equals, bit for bit, the run given the chosen epochs, and a budgeted
    run stopped and resumed equals both, its schedule read from config.yaml."""
    timed = _spy_on_the_choice(monkeypatch, steps=35)  # 1.25 epochs of 28 steps
    monkeypatch.setattr(trainer, "CORRECTION_WINDOW", 0.0)  # the steps here take milliseconds

    def config(out: Path, **optim) -> TrainConfig:
        cfg = tiny_config(out, patch_dropout_phases=[(0.5, 0.75), (1.0, 0.0)], ema=0.9, **optim)
        cfg.run.log_every = 1
        return cfg

    budgeted = config(tmp_path / "budgeted", time_budget=5.0)
    train(budgeted)
    assert budgeted.optim.epochs == 3  # the caller's config is left as it was
    assert [done for done, _ in timed] == [0, 14, 28]  # the timing, then the checkpoints after 8 steps or more
    first = timed[0][1]
    assert [end for end, _ in first.step_seconds] == [0.5, 1.0]
    assert all(seconds > 0 for _, seconds in first.step_seconds) and first.eval_seconds_per_image > 0
    assert "35 steps (1.25 epochs) fit, in place of --optim.epochs 3" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "budgeted" / "config.yaml").read_text())
    assert saved["optim"]["epochs"] == 1.25 and saved["optim"]["time_budget"] == 5.0

    train(config(tmp_path / "plain", epochs=1.25))

    _stopped_and_resumed(config(tmp_path / "part", time_budget=5.0), 20, lambda: _refuse_timing(monkeypatch))
    _assert_same_weights(tmp_path / "budgeted", tmp_path / "plain", tmp_path / "part")
    losses = _losses(tmp_path / "budgeted")
    assert len(losses) == 35 and losses == _losses(tmp_path / "plain") == _losses(tmp_path / "part")


def test_a_budgeted_run_fits_what_its_timing_allows(tmp_path, monkeypatch):
    """Unpatched, the run's steps are what steps_within gives for what was timed: the chosen epochs in config.yaml
    are that many steps, and the steps timed are this machine's (a step of the tiny model takes well under 1 s)."""
    seen = []
    real = trainer.steps_within

    def spy(*args, **kwargs):
        seen.append((args, kwargs, real(*args, **kwargs)))
        return seen[-1][2]

    monkeypatch.setattr(trainer, "steps_within", spy)
    cfg = tiny_config(tmp_path / "run", time_budget=0.1)  # 6 s
    train(cfg)
    (args, kwargs, _), *corrections = seen
    assert args[0] == 0.1 and args[2] == 28 and kwargs["done"] == 0
    assert 0 < args[1].step_seconds[0][1] < 1
    assert all(later[1]["done"] > earlier[1].get("done", 0) for earlier, later in zip(seen, seen[1:]))
    steps = seen[-1][2]  # the last plan's
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert round(saved["optim"]["epochs"] * 28) == steps
    assert len(_losses(tmp_path / "run")) == steps // 50 + (steps % 50 > 0)  # a record every 50 steps and the last


@pytest.mark.parametrize("budget", ["0", "-5"])
def test_a_budget_that_is_not_positive_is_refused_before_anything_is_written(tmp_path, capsys, budget):
    out = tmp_path / "run"
    args = ["train", "--data.dataset", "synthetic", "--model.width", "32", "--model.depth", "1", "--model.heads", "2",
            "--model.mlp_dim", "64", "--run.progress", "false", "--run.out", str(out), "--optim.time_budget", budget]
    assert main(args) == 2
    assert f"--optim.time_budget must be a positive number of minutes or null, got {float(budget)}" in \
        capsys.readouterr().err
    assert not out.exists()


def test_each_checkpoint_plans_again_and_a_resumed_run_keeps_its_checkpoints_plan(tmp_path, monkeypatch, capsys):
    """The checkpoints (every 10 steps here) correct the plan: the learning rate follows the first plan's schedule
    until step 10, the second's until step 20 and the third's after, the run takes the last plan's steps and
    config.yaml records them, and a run stopped at step 20 and resumed equals the run that was not stopped, bit for
    bit."""
    timed = _spy_on_the_choice(monkeypatch, steps=35, corrected={10: 40, 20: 42})
    monkeypatch.setattr(trainer, "CORRECTION_WINDOW", 0.0)  # the steps here take milliseconds

    def config(out: Path) -> TrainConfig:
        cfg = tiny_config(out, time_budget=5.0)
        cfg.run.log_every, cfg.run.checkpoint_every = 1, 10
        return cfg

    train(config(tmp_path / "whole"))
    # Every checkpoint but the last, and not the epoch's end at step 28: 8 steps since the last are no more than a
    # timing, so they wait for the next.
    assert [done for done, _ in timed] == [0, 10, 20, 30, 40]
    assert all(later.elapsed > earlier.elapsed for (_, earlier), (_, later) in zip(timed, timed[1:]))
    out = capsys.readouterr().out
    assert "steps 1-10 took" in out and "steps 11-20 took" in out and "steps 21-28" not in out  # unchanged plans
    saved = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())
    assert saved["optim"]["epochs"] == 42 / 28
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
    assert sorted(rates) == list(range(1, 43))
    # Logged after step s: the rate of the step after it, 3e-3 at its peak, warm-up a tenth of the run.
    for step, rate in rates.items():
        total = 35 if step <= 10 else 40 if step <= 20 else 42
        assert rate == pytest.approx(3e-3 * lr_factor(step, total, warmup_steps(0.1, total), "cosine"), rel=1e-12)

    _stopped_and_resumed(config(tmp_path / "part"), 20, lambda: _refuse_timing(monkeypatch))
    _assert_same_weights(tmp_path / "whole", tmp_path / "part")
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "part")
