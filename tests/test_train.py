"""Training: it learns, resumes bit-exactly, writes its run directory, and fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from image_corpus import BOMB_LIMIT, Corpus, assert_reason, write_corpus
from vitkit.cli import available_presets, build_parser, main, presets_dir
from vitkit.train.config import DataOptions, ModelOptions, OptimOptions, RunOptions, TrainConfig
from vitkit.train.errors import TrainingError
from vitkit.train.objective import Objective
from vitkit.train.trainer import train


def tiny_config(out: Path, **optim) -> TrainConfig:
    """A run on the synthetic set that takes seconds."""
    return TrainConfig(
        model=ModelOptions(name="Ti/4", width=32, depth=2, heads=2, mlp_dim=64),
        data=DataOptions(dataset="synthetic", crop="pad", pad=1, flip=False),
        optim=OptimOptions(**{"batch_size": 32, "epochs": 3, "lr": 3e-3, "warmup": 0.1, **optim}),
        run=RunOptions(out=str(out), precision="fp32", progress=False, tensorboard=False, checkpoint_every=7),
    )


def test_tiny_run_learns_far_above_chance(tmp_path):
    result = train(tiny_config(tmp_path / "run"))
    chance = 1 / 10
    assert result.test is not None and result.test.top1 > chance + 0.5, result.test
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "results.json", "model.safetensors", "best.safetensors",
                 "plots/curves.png", "plots/confusion_test.png", "checkpoints/last"):
        assert (run / name).exists(), name
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["top1"] == pytest.approx(result.test.top1)
    confusion = torch.tensor(results["test_confusion"])
    assert confusion.sum() == result.test.count
    assert confusion.diagonal().sum() / confusion.sum() == pytest.approx(result.test.top1)


def test_in_memory_splits_are_resized_once_where_they_fit_and_take_the_batched_path(monkeypatch):
    """--data.image_size on an in-memory dataset: the splits are resized at loading, so training gathers whole
    batches (the batched augmentation) and evaluation normalises once; a split too large to hold resized is left to
    the per-image pipeline."""
    from vitkit.data import Normalised, Transformed, load_dataset
    from vitkit.train import trainer

    data = load_dataset("synthetic", image_size=16)
    cfg = TrainConfig(data=DataOptions(dataset="synthetic", image_size=20, crop="pad", pad=2, flip=True))
    resized = trainer._resized_in_memory(data, (20, 20))
    assert [tuple(split.images.shape[-2:]) for split in (resized.train, resized.val, resized.test)] == [(20, 20)] * 3
    _, fast_augment, val_set, test_set = trainer._datasets(cfg, resized, (20, 20))
    assert fast_augment is not None and isinstance(val_set, Normalised) and isinstance(test_set, Normalised)
    # Only the validation split (the smallest) fits under the limit: the others keep their size and the per-image
    # path.
    assert len(data.val) < min(len(data.train), len(data.test))
    monkeypatch.setattr(trainer, "RESIZED_IN_MEMORY_BYTES", len(data.val) * data.in_chans * 20 * 20)
    partly = trainer._resized_in_memory(data, (20, 20))
    assert partly.train is data.train and partly.test is data.test and partly.val.images.shape[-2:] == (20, 20)
    _, fast_augment, val_set, test_set = trainer._datasets(cfg, partly, (20, 20))
    assert fast_augment is None and isinstance(val_set, Normalised) and isinstance(test_set, Transformed)


def _losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def _stopped_and_resumed(cfg: TrainConfig, stop_at: int, before_resume=lambda: None,
                         objectives: tuple[Objective | None, Objective | None] = (None, None)) -> None:
    """Train `cfg` for `stop_at` steps (--run.max_steps), call `before_resume`, then resume it to its end;
    `objectives` are what the two trainings optimise (None: the one `cfg` describes)."""
    cfg.run.max_steps = stop_at
    train(cfg, objectives[0])
    before_resume()
    cfg.run.max_steps, cfg.run.resume = None, True
    train(cfg, objectives[1])


def _assert_same_weights(*runs: Path) -> None:
    """The final weights of every run in `runs` equal the first's, bit for bit, under the same names."""
    first, *others = (load_file(run / "model.safetensors") for run in runs)
    for other in others:
        assert first.keys() == other.keys()
        for key in first:
            assert torch.equal(first[key], other[key]), key


# The batched in-memory augmentation, and the per-sample torchvision pipeline with mixup.
AUGMENTATIONS = {
    "batched": {},
    "per-sample": {"randaugment": 5, "random_erasing": 0.25, "mixup": 0.2, "cutmix": 1.0},
}


# (augmentation, checkpoint resumed from): 17 is where the first session stopped; 14 is the checkpoint
# before it, as a crash just after step 17 (before its checkpoint's pointer moved) would leave the run.
RESUME_CASES = [("batched", 17), ("batched", 14), ("per-sample", 17)]


@pytest.mark.parametrize("augmentation,resume_step", RESUME_CASES, ids=[f"{a}-from-{s}" for a, s in RESUME_CASES])
def test_resume_mid_epoch_is_bit_exact(tmp_path, capsys, augmentation, resume_step):
    def config(out: Path) -> TrainConfig:
        cfg = tiny_config(out)
        # dropout and drop path use the global RNG: the resumed run must restore it exactly.
        cfg.model.dropout, cfg.model.drop_path = 0.1, 0.1
        cfg.optim.ema = 0.9
        cfg.run.log_every = 1
        for key, value in AUGMENTATIONS[augmentation].items():
            setattr(cfg.data, key, value)
        return cfg

    train(config(tmp_path / "whole"))
    part = config(tmp_path / "part")
    part.run.max_steps = 17  # mid-epoch (28 steps per epoch), between the checkpoints every 7 steps
    train(part)
    checkpoints = tmp_path / "part" / "checkpoints"
    assert (checkpoints / "last").read_text() == "step-000017\n"
    if resume_step != 17:
        (checkpoints / "last").write_text(f"step-{resume_step:06d}\n")
    capsys.readouterr()
    part.run.max_steps = None
    part.run.resume = True
    train(part)
    resumed = f"resuming {tmp_path / 'part'} at step {resume_step} (epoch 1, batch {resume_step})"
    assert resumed in capsys.readouterr().out

    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The loss of every step, in order and each once, to the last bit: the records of the steps the resumed
    # run redoes (15-17 when it resumes from 14) were replaced by the redone ones, with the same values.
    whole = _losses(tmp_path / "whole")
    assert [step for step, _ in whole] == list(range(1, 85))  # 3 epochs of 28 steps, each logged once
    assert _losses(tmp_path / "part") == whole


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, patch_dropout):
    # SGD, not Adam: the key bias gets an exactly-zero gradient (softmax ignores a shift), and Adam
    # would blow the rounding noise of that zero up to full-size steps.
    # With PatchDropout each image must keep the same patches in a micro-batch as in the whole batch. (Torch's CPU
    # generator fills 4 x 8 rows as it fills 32, so a draw inside the model passes here too; two processes
    # under torchrun, tests/test_distributed.py, are what need the trainer's draw.)
    one, four = (tiny_config(tmp_path / name, epochs=0.2, optimizer="sgd", lr=0.05, accumulate=accumulate)
                 for name, accumulate in (("one", 1), ("four", 4)))
    for cfg in (one, four):
        cfg.model.patch_dropout = patch_dropout
    one, four = train(one), train(four)
    a = load_file(one.run_dir / "model.safetensors")
    b = load_file(four.run_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


class _InfiniteGradient(torch.autograd.Function):
    """The identity on the way forward; an infinite gradient on the way back (the loss stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


# Without clipping (clip None) the gradient's norm is still taken, to find the infinite one.
@pytest.mark.parametrize(("what", "clip"), [("loss", 1.0), ("gradient norm", 1.0), ("gradient norm", None)])
def test_non_finite_loss_or_gradient_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, what, clip):
    from safetensors.torch import load_file as read

    from vitkit.model.vit import ViT
    from vitkit.train.checkpoint import load_training_state

    real_forward = ViT.forward
    calls = {"n": 0}

    def poisoned(self, x, **kwargs):
        out = real_forward(self, x, **kwargs)
        if not self.training:
            return out
        calls["n"] += 1
        if calls["n"] != 10:
            return out
        return out * float("nan") if what == "loss" else _InfiniteGradient.apply(out)

    monkeypatch.setattr(ViT, "forward", poisoned)
    run = tmp_path / "run"
    cfg = tiny_config(run)
    cfg.optim.clip_grad = clip
    with pytest.raises(TrainingError) as caught:
        train(cfg)
    checkpoints = run / "checkpoints"
    assert (f"the {what} became non-finite at step 10 (epoch 1); the last good checkpoint is "
            f"{checkpoints / 'step-000007.safetensors'}.") in str(caught.value)
    # The checkpoint before the bad step is kept, complete and finite; nothing of the bad step was saved.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "step-000007.safetensors",
                                                             "step-000007.state.pt"]
    assert (checkpoints / "last").read_text() == "step-000007\n"
    assert all(torch.isfinite(t).all() for t in read(checkpoints / "step-000007.safetensors").values())
    assert load_training_state(checkpoints / "step-000007.state.pt")["position"] == {"step": 7, "epoch": 0,
                                                                                     "batch": 7}

    # --run.on_nonfinite skip: the step is skipped and counted, and training goes on to the end.
    calls["n"] = 0
    cfg.run.overwrite = True
    cfg.run.on_nonfinite = "skip"
    result = train(cfg)
    assert result.skipped_steps == 1 and result.steps == 84
    assert json.loads((run / "results.json").read_text())["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in read(run / "model.safetensors").values())


def test_existing_run_is_not_overwritten_by_accident(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=0.1)
    train(cfg)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(cfg)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("recipe", sorted(presets_dir().glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# vitkit "), f"{recipe.name} must start with the command that runs it"
    command = first.split()[2]
    assert recipe.stem in available_presets(command)
    ns = build_parser().parse_args([command, "--config", str(recipe)])
    init = build_parser().instantiate(ns)
    assert isinstance(init[command].optim, OptimOptions)


def test_default_recipe_file_equals_the_defaults():
    ns = build_parser().parse_args(["train", "--config", str(presets_dir() / "fashion_mnist.yaml")])
    init = build_parser().instantiate(ns).train
    rebuilt = TrainConfig(model=init.model, init=init.init, data=init.data, optim=init.optim, run=init.run)
    assert rebuilt == TrainConfig()


def test_presets_include_quick():
    assert "quick" in available_presets()


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST is not installed (make data)")
def test_the_quick_preset_trains_its_hybrid_on_images_resized_once(tmp_path, monkeypatch):
    """--preset quick: the root block's 8x8 map of the 32x32 images in 2x2 patches (16 tokens and the class token),
    trained through the batched augmentation on the splits resized at loading."""
    from vitkit.train import trainer
    from vitkit.weights import load_model

    seen = []
    datasets = trainer._datasets
    monkeypatch.setattr(trainer, "_datasets", lambda *args: seen.append(datasets(*args)) or seen[-1])
    out = tmp_path / "run"
    assert main(["train", "--preset", "quick", "--optim.time_budget", "null", "--run.max_steps", "2",
                 "--run.out", str(out), "--run.progress", "false", "--run.tensorboard", "false"]) == 0
    (train_set, fast_augment, val_set, _), = seen
    assert fast_augment is not None and train_set[0, 0][0].shape == (1, 32, 32) and val_set[0][0].shape == (1, 32, 32)
    model = load_model(out / "model.safetensors")
    assert model.cfg.stem_layers == () and model.cfg.img_size == (32, 32) and model.cfg.patch_size == 2
    assert model.pos_embed.shape == (1, 17, 128)


def test_the_fast_preset_is_the_default_recipe_on_the_quick_presets_hybrid_with_its_measured_changes():
    ns = build_parser().parse_args(["train", "--preset", "fast"])
    fast = build_parser().instantiate(ns).train
    default = TrainConfig()
    changed = {(section, key): value for section in ("model", "init", "data", "optim", "run")
               for key, value in vars(getattr(fast, section)).items()
               if value != getattr(getattr(default, section), key)}
    assert changed == {
        ("model", "name"): "R+Ti/8", ("model", "patch_dropout"): 0.0, ("data", "image_size"): 32,
        ("init", "zero_residual"): True, ("optim", "optimizer"): "muon", ("optim", "lr"): 0.002,
        ("optim", "betas"): (0.9, 0.95),
        ("optim", "batch_size"): 256, ("optim", "epochs"): 40.0, ("optim", "time_budget"): 15.0,
        ("run", "out"): "runs/fashion-mnist-fast", ("run", "eval_every"): 0}


def test_cli_option_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "--optim.no_such_option", "1"])
    assert err.value.code != 0
    assert "no_such_option" in capsys.readouterr().err
    code = main(["train", "--optim.batch_size", "0", "--run.out", str(tmp_path / "r")])
    assert code == 2
    assert "--optim.batch_size must be at least 1, got 0" in capsys.readouterr().err
    assert main(["train", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_cli_train_eval_predict_end_to_end(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    cli = [sys.executable, "-m", "vitkit.cli"]
    train_cmd = cli + ["train", "--data.dataset", "synthetic", "--model.width", "32", "--model.depth", "1",
                       "--model.heads", "2", "--model.mlp_dim", "32", "--optim.epochs", "1", "--optim.batch_size",
                       "64", "--run.out", str(run), "--run.progress", "false", "--run.precision", "fp32"]
    done = subprocess.run(train_cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["width"] == 32 and saved["data"]["dataset"] == "synthetic"
    assert (run / "tensorboard").is_dir() and any((run / "tensorboard").iterdir())
    # int8's activation ranges, measured on the final weights, wait beside them for eval, predict and serve.
    from vitkit.data import load_dataset
    from vitkit.int8_calibration import Int8Calibration
    from vitkit.weights import load_pretrained

    calibration = Int8Calibration.load(run / "model.int8_calibration.json")
    calibration.check(load_pretrained(str(run / "model.safetensors"))[0])
    assert calibration.images == min(1000, len(load_dataset("synthetic").train))

    done = subprocess.run(cli + ["eval", "--weights", str(run / "model.safetensors"), "--data", "synthetic",
                                 "--precision", "fp32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((run / "results.json").read_text())
    assert f"top-1 {100 * results['test']['top1']:.2f}%" in done.stdout

    image = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(image)
    done = subprocess.run(cli + ["predict", "--weights", str(run / "model.safetensors"), "--topk", "3", str(image)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 4
    probs = [float(line.split("%")[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01

    done = subprocess.run(cli + ["predict", "--weights", str(tmp_path / "missing.safetensors"), str(image)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "missing.safetensors does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def _image_folder(root: Path) -> Corpus:
    """Two classes of 12 solid-colour 8x8 PNGs each, plus the corpus of every awkward and broken kind."""
    from PIL import Image

    for name, colour in (("a", (250, 20, 20)), ("b", (20, 20, 250))):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), tuple(max(0, c - 3 * i) for c in colour)).save(folder / f"{i}.png")
    return write_corpus(root)


def _folder_config(root: Path, out: Path, on_bad_image: str) -> TrainConfig:
    cfg = tiny_config(out, batch_size=4, epochs=1)
    cfg.data = DataOptions(dataset="image-folder", data_dir=str(root), image_size=8, crop="none", flip=False,
                           on_bad_image=on_bad_image, val_size=0.25)
    cfg.model.name = "Ti/4"
    return cfg


def test_corrupt_image_stops_with_its_name_or_is_skipped_and_listed(tmp_path, capsys, monkeypatch):
    from vitkit.data import BadImageError, load_image

    root = tmp_path / "images"
    corpus = _image_folder(root)
    monkeypatch.setenv("VITKIT_MAX_IMAGE_PIXELS", str(BOMB_LIMIT))  # the run's pixel limit: the bomb is over it

    # Default: the first unreadable file (in path order) stops the run, named with the reason; nothing is written.
    code = main(["train", "--config", str(presets_dir() / "fashion_mnist.yaml"), "--data.dataset", "image-folder",
                 "--data.data_dir", str(root), "--data.image_size", "8", "--run.out", str(tmp_path / "stop"),
                 "--run.progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"cannot read image {root / 'a' / 'empty.png'}: the file is empty (0 bytes)" in err
    assert not (tmp_path / "stop").exists()

    # Skip: training completes on the rest, and the run directory lists exactly the bad files with their reasons.
    expected = {}
    for path in corpus.bad:
        with pytest.raises(BadImageError) as caught:
            load_image(path)
        expected[path] = caught.value.reason
    result = train(_folder_config(root, tmp_path / "skip", "skip"))
    assert result.test is not None and result.steps > 0
    run = tmp_path / "skip"
    listed = (run / "skipped_images.txt").read_text().splitlines()
    assert listed == [f"{path}\t{expected[path]}" for path in sorted(expected)]
    for path in corpus.bad:
        assert_reason(expected[path], corpus.bad[path], path)
    assert json.loads((run / "results.json").read_text())["skipped_images"] == len(corpus.bad) == 7
    out = capsys.readouterr().out
    assert f"skipped 7 unreadable image(s); see {run / 'skipped_images.txt'}" in out


def test_training_on_every_image_without_a_validation_split(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=1)
    cfg.data.val_size = 0
    result = train(cfg)
    assert result.val is None and result.test is not None
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "val" not in results and results["test"]["count"] == 200
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_training_from_scratch_needs_a_model_name(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.model.name = None
    with pytest.raises(ValueError, match="--model.name is needed to train from scratch"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_resumed_metrics_log_drops_the_records_after_the_checkpoint(tmp_path):
    from vitkit.train.metrics import MetricsLog, read_metrics

    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in range(1, 6)] + ['{"step": 6, "train/lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))  # the last line was cut short by a kill
    log = MetricsLog(tmp_path, tensorboard=False, resume_step=3)
    log.log({"train/loss": 0.25}, 4)
    log.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 0.25)]


@pytest.mark.parametrize("eval_every, evaluated_epochs", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [5])])
def test_validation_runs_every_eval_every_epochs_and_after_the_last_step(tmp_path, eval_every, evaluated_epochs):
    cfg = tiny_config(tmp_path / "run", epochs=5)
    cfg.run.eval_every = eval_every
    result = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["epoch"]) for r in records if "val/top1" in r] == evaluated_epochs
    assert result.val is not None and (tmp_path / "run" / "best.safetensors").exists()


def test_the_logged_speed_counts_the_steps_not_evaluation(tmp_path, monkeypatch):
    """Each evaluation here takes 1000 s of a fake clock; the one logging window spans two of them."""
    import vitkit.train.trainer as trainer
    from vitkit.train.objective import Classification

    skipped = [0.0]
    real_clock, real_evaluate = trainer.time.perf_counter, Classification.evaluate
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: real_clock() + skipped[0])

    def slow_evaluate(self, *args):
        skipped[0] += 1000.0
        return real_evaluate(self, *args)
    monkeypatch.setattr(Classification, "evaluate", slow_evaluate)
    cfg = tiny_config(tmp_path / "run", epochs=3)
    cfg.run.log_every = 10_000  # one window: from the start to the last step, over two epochs' ends
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (window,) = [r for r in records if "train/images_per_s" in r]
    steps_seconds = window["step"] * cfg.optim.batch_size / window["train/images_per_s"]
    assert skipped[0] == 4000.0 and steps_seconds < 1000.0  # validation after each of 3 epochs, then the test


def test_a_negative_eval_every_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.run.eval_every = -1
    with pytest.raises(ValueError, match="--run.eval_every must be 0 .* got -1"):
        train(cfg)


def test_patch_dropout_phases_pick_the_rate_of_each_step():
    from vitkit.train.optim import patch_dropout_at

    phases = [(0.5, 0.75), (0.9, 0.5), (1.0, 0.0)]
    rates = [patch_dropout_at(phases, step, 20) for step in range(20)]
    assert rates == [0.75] * 10 + [0.5] * 8 + [0.0] * 2


@pytest.mark.parametrize("phases,message", [
    ([], "is empty"),
    ([(0.5, 0.5)], "the last must be 1"),
    ([(0.6, 0.5), (0.4, 0.2), (1.0, 0.0)], "the ends must rise"),
    ([(0.0, 0.5), (1.0, 0.0)], r"in \(0, 1\]"),
    ([(1.0, 1.0)], r"every rate must be in \[0, 1\)"),
])
def test_bad_patch_dropout_phases_are_refused_naming_them(tmp_path, phases, message):
    cfg = tiny_config(tmp_path / "run", patch_dropout_phases=phases)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_patch_dropout_phases_need_the_models_patch_dropout_on(tmp_path):
    cfg = tiny_config(tmp_path / "run", patch_dropout_phases=[(1.0, 0.5)])
    cfg.model.patch_dropout = 0.0
    with pytest.raises(ValueError, match="--model.patch_dropout 0.0 turns off"):
        train(cfg)


def test_patch_dropout_phases_set_each_steps_token_count_and_resume_bit_exactly(tmp_path, monkeypatch):
    """The tiny model sees 16 patches: 4 of them in the first half (rate 0.75), all 16 in the second (rate 0); the
    logged rate follows, and a run stopped in the first phase and resumed in the second ends bit-identical."""
    from vitkit.model import vit

    tokens = []
    original = vit.ViT._run_blocks

    def spy(self, x, *args, **kwargs):
        if self.training:
            tokens.append(x.shape[1])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(vit.ViT, "_run_blocks", spy)

    def config(out: Path) -> TrainConfig:
        cfg = tiny_config(out, epochs=1, patch_dropout_phases=[(0.5, 0.75), (1.0, 0.0)])
        cfg.run.log_every = 1
        return cfg

    train(config(tmp_path / "whole"))
    assert tokens == [1 + 4] * 14 + [1 + 16] * 14  # 28 steps of one epoch, split at the half
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/patch_dropout"] for r in records if "train/loss" in r] == [0.75] * 14 + [0.0] * 14

    _stopped_and_resumed(config(tmp_path / "part"), 10)
    _assert_same_weights(tmp_path / "whole", tmp_path / "part")
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")


def test_patch_dropout_phases_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--data.dataset", "synthetic", "--model.width", "32", "--model.depth", "1", "--model.heads",
              "2", "--model.mlp_dim", "64", "--optim.epochs", "1", "--optim.batch_size", "100", "--run.progress",
              "false", "--run.tensorboard", "false", "--run.out", str(out)]
    assert main([*common, "--optim.patch_dropout_phases", "[[0.5,0.75],[0.8,0.5]]"]) == 2
    assert "--optim.patch_dropout_phases [[0.5, 0.75], [0.8, 0.5]]: the ends must rise" in capsys.readouterr().err
    assert not out.exists()
    assert main([*common, "--optim.patch_dropout_phases", "[[0.5,0.75],[1.0,0.5]]"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["patch_dropout_phases"] == [[0.5, 0.75], [1.0, 0.5]]


def test_auto_precision_trains_in_the_timed_choice_and_a_resumed_run_keeps_it(tmp_path, monkeypatch, capsys):
    """"auto" runs what vitkit.fastest_mode timed faster; a checkpoint records it, so a run resumed where a new
    timing would choose otherwise continues in the precision it started in, bit-exactly."""
    from vitkit.fastest_mode import ModeChoice
    from vitkit.train import trainer

    asked = []

    def timed(answer):
        def choose(model, device, batch_size, cache=None):
            asked.append(batch_size)
            return ModeChoice(answer, f"timed now: {answer} faster")
        return choose

    monkeypatch.setattr(trainer, "training_candidates", lambda device: ("bf16-mixed", "fp32"))
    monkeypatch.setattr(trainer, "fastest_training_precision", timed("fp32"))

    def config(out: Path) -> TrainConfig:
        cfg = tiny_config(out, epochs=1, accumulate=2)
        cfg.run.precision = "auto"
        return cfg

    train(config(tmp_path / "whole"))
    assert asked == [16]  # the micro-batch: 32 images in 2 parts
    assert "precision auto: timed now: fp32 faster" in capsys.readouterr().out
    _stopped_and_resumed(config(tmp_path / "part"), 10, lambda: monkeypatch.setattr(
        trainer, "fastest_training_precision", timed("bf16-mixed")))
    assert "precision auto: fp32, as the run's checkpoint records" in capsys.readouterr().out
    assert asked == [16, 16]  # the resumed run took the recorded precision without timing again
    _assert_same_weights(tmp_path / "whole", tmp_path / "part")
    fresh = config(tmp_path / "bf16")
    fresh.run.max_steps = 2
    train(fresh)
    assert "bf16-mixed precision" in capsys.readouterr().out
