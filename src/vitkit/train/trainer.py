"""`vitkit train`: one training loop for every objective, with exact resume and torchrun.

The loop in four parts: `set_up` (run directory, data, model, optimiser, and the state of an interrupted
run), `train_step` (one optimiser step over micro-batches and processes), `_end_of_period` (evaluation and
checkpoints) and `finish` (final weights, test evaluation, report). What is optimised is the objective's
(vitkit.train.objective): supervised classification unless another is given. Fine-tuning is set-up only:
the model starts from pretrained weights (vitkit.train.setup).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vitkit import crash_points
from vitkit.atomic import atomic_write_text
from vitkit.data import (Transformed, batch_mixer, collate_skip_none, eval_transform, evaluation_set, load_dataset,
                         train_transform)
from vitkit.data.batch_augment import BatchAugment
from vitkit.data.splits import training_subset
from vitkit.data.tensor_dataset import ImageTensorDataset
from vitkit.fastest_mode import fastest_training_precision, training_candidates
from vitkit.int8_calibration import calibrate_int8, first_images
from vitkit.model import ViT
from vitkit.plots import plot_curves
from vitkit.runtime import autocast, resolve_device, resolve_precision
from vitkit.train import distributed
from vitkit.train.checkpoint import (
    Position,
    last_checkpoint,
    load_checkpoint_weights,
    load_training_state,
    save_checkpoint,
    set_rng_state,
)
from vitkit.train.compile import compile_for_training, resolve_compile
from vitkit.train.config import PretrainConfig, TrainConfig
from vitkit.train.distributed import local_device
from vitkit.train.errors import TrainingError
from vitkit.train.metrics import MetricsLog, read_metrics
from vitkit.train.objective import Classification, Evaluation, Objective
from vitkit.train.optim import (
    build_optimizer,
    build_scheduler,
    check_patch_dropout_phases,
    patch_dropout_at,
    warmup_steps,
)
from vitkit.train.pretraining import MaskedPatchObjective
from vitkit.train.run_dir import check_run_dir, resumed_config, write_config, write_run_dir
from vitkit.train.sampling import EpochBatches, SeededAugment, derive_seed
from vitkit.train.setup import build_model
from vitkit.train.time_budget import TimedRun, corrected, steps_within
from vitkit.weights import PREPROCESS_KEY, save_weights


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    val: object | None
    """The objective's result on the validation split at the end (an EvalResult for classification)."""
    test: object | None
    seconds: float
    skipped_steps: int


@dataclass
class Run:
    """Everything a run holds while it trains."""

    cfg: TrainConfig
    ctx: distributed.Distributed
    device: torch.device
    precision: str
    objective: Objective
    data: object
    model: torch.nn.Module
    forward: object
    """The model as steps call it: data-parallel, compiled, in the run's precision."""
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: AveragedModel | None
    train_set: SeededAugment
    fast_augment: BatchAugment | None
    val_set: Dataset
    test_set: Dataset
    metadata: dict[str, str]
    total_steps: int
    steps_per_epoch: int
    position: Position = field(default_factory=Position)
    best_score: float = -math.inf
    skipped_steps: int = 0
    log: MetricsLog | None = None
    val: Evaluation | None = None
    progress: tqdm | None = None
    start: float = 0.0
    window: dict[str, float] = field(default_factory=dict)
    """Sums over the steps since the last log record ("loss": the sum of the steps' mean losses)."""
    window_steps: int = 0
    window_start: float = 0.0
    precision_reason: str = ""
    """Why "auto" became `precision` (empty when the run asked for a precision)."""
    compiled: bool = False
    """Whether the steps run compiled."""
    began: float = 0.0
    """When `train` was called (time.perf_counter()): what --optim.time_budget counts from."""
    budget_timing: TimedRun | None = None
    """--optim.time_budget's step times as last corrected by the steps' own (None without a budget, in a resumed run,
    and once the run has taken its steps)."""
    budget_window: tuple[int, float] = (0, 0.0)
    """(first step, seconds the steps took) since the plan was last corrected: checkpoints and evaluations excluded."""
    steps_resumed: float = 0.0
    """When the steps last started or went on after an epoch's end or checkpoint (time.perf_counter())."""

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.out)

    @property
    def stop_at(self) -> int:
        return min(self.total_steps, self.cfg.run.max_steps) if self.cfg.run.max_steps else self.total_steps

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model


def validate(cfg: TrainConfig) -> None:
    o = cfg.optim
    if o.batch_size < 1:
        raise ValueError(f"--optim.batch_size must be at least 1, got {o.batch_size}")
    if o.accumulate < 1 or o.batch_size % o.accumulate:
        raise ValueError(f"--optim.accumulate {o.accumulate} must be >= 1 and divide the batch size {o.batch_size}")
    if not o.epochs > 0:
        raise ValueError(f"--optim.epochs must be positive, got {o.epochs}")
    if o.time_budget is not None and not o.time_budget > 0:
        raise ValueError(f"--optim.time_budget must be a positive number of minutes or null, got {o.time_budget}")
    if not 0 <= o.label_smoothing < 1:
        raise ValueError(f"--optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
    if not 0 <= o.ema < 1:
        raise ValueError(f"--optim.ema must be in [0, 1) (0 turns it off), got {o.ema}")
    if o.clip_grad is not None and o.clip_grad <= 0:
        raise ValueError(f"--optim.clip_grad must be positive or null, got {o.clip_grad}")
    for name in ("checkpoint_every", "log_every"):
        if getattr(cfg.run, name) < 1:
            raise ValueError(f"--run.{name} must be at least 1, got {getattr(cfg.run, name)}")
    if cfg.run.eval_every < 0:
        raise ValueError(f"--run.eval_every must be 0 (after the last step only) or more, got {cfg.run.eval_every}")
    if cfg.run.max_steps is not None and cfg.run.max_steps < 1:
        raise ValueError(f"--run.max_steps must be at least 1, got {cfg.run.max_steps}")
    if cfg.data.num_workers < 0:
        raise ValueError(f"--data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if o.patch_dropout_phases is not None:
        check_patch_dropout_phases(o.patch_dropout_phases)
        if isinstance(cfg, PretrainConfig):
            raise ValueError("--optim.patch_dropout_phases schedules PatchDropout, which masked patch prediction "
                             "does not use (it must see every corrupted patch): leave it null for `vitkit pretrain`")
        if not cfg.model.patch_dropout > 0:
            raise ValueError(f"--optim.patch_dropout_phases schedules the model's PatchDropout, which "
                             f"--model.patch_dropout {cfg.model.patch_dropout} turns off: give the model a rate above "
                             "0 (the phases replace it while training)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def preprocess_metadata(data) -> dict[str, str]:
    """What `predict` and `eval` need to feed the model images the way training did."""
    info = {"dataset": data.name, "mean": list(data.mean), "std": list(data.std), "class_names": data.class_names}
    return {PREPROCESS_KEY: json.dumps(info)}


def objective_for(cfg: TrainConfig, data) -> Objective:
    """The objective `cfg` describes: masked patch prediction for `vitkit pretrain`'s config, else supervised
    classification (label smoothing, mixup/CutMix, softmax or sigmoid loss)."""
    if isinstance(cfg, PretrainConfig):
        return MaskedPatchObjective(cfg.mpp, eval_seed=cfg.run.seed)
    num_classes = Classification().head_size(data)  # refuses a one-class dataset with the reason
    return Classification(cfg.optim.label_smoothing, batch_mixer(num_classes, cfg.data.mixup, cfg.data.cutmix),
                          cfg.optim.loss)


def train(cfg: TrainConfig, objective: Objective | None = None) -> TrainResult:
    """Train as `cfg` says, for `objective` (default: the one `cfg` describes, see `objective_for`); under
    torchrun, one process per device shares every batch."""
    started = time.perf_counter()  # what --optim.time_budget counts from
    validate(cfg)
    device = local_device(resolve_device(cfg.run.device))
    ctx = distributed.setup(device)
    try:
        run = set_up(cfg, device, ctx, objective, started)
        run.progress = tqdm(total=run.stop_at, initial=run.position.step, unit="step", dynamic_ncols=True,
                            desc="train", disable=not (run.cfg.run.progress and ctx.is_main))
        run.start = run.window_start = run.steps_resumed = time.perf_counter()
        run.model.train()
        run.objective.train()
        while run.position.step < run.stop_at:
            _train_epoch(run)
        return finish(run)
    finally:
        distributed.teardown(ctx)


def _on_main_first(ctx: distributed.Distributed, action):
    """Run `action` on rank 0 only; if it fails there, every rank raises (rank 0 its own error)."""
    error, result = None, None
    if ctx.is_main:
        try:
            result = action()
        except (TrainingError, ValueError, OSError) as err:
            error = err
    if ctx.broadcast_flag(error is not None):
        if error is not None:
            raise error
        raise TrainingError("rank 0 could not prepare the run directory; see its message")
    return result


# ---- set-up and resume ----

def set_up(cfg: TrainConfig, device: torch.device, ctx: distributed.Distributed,
           objective: Objective | None, started: float) -> Run:
    """Everything a run needs, checked before anything is written: a bad option or file must not leave a
    half-made run directory behind (or clear the run that --run.overwrite would replace). `started`: when the run
    began (time.perf_counter()), for --optim.time_budget."""
    if cfg.optim.batch_size % (ctx.world_size * cfg.optim.accumulate):
        raise ValueError(f"--optim.batch_size {cfg.optim.batch_size} must divide evenly over {ctx.world_size} "
                         f"process(es) x {cfg.optim.accumulate} accumulation step(s)")
    checked = _on_main_first(ctx, lambda: check_run_dir(cfg))
    if ctx.is_main:
        cfg = checked
    elif cfg.run.resume:
        cfg = resumed_config(Path(cfg.run.out), cfg)
    seed_everything(cfg.run.seed)
    resolve_precision(cfg.run.precision, device, training=True)  # refuse a precision training cannot run, first
    data, image_size = _load_data(cfg)
    objective = objective if objective is not None else objective_for(cfg, data)
    model = build_model(cfg, objective.head_size(data), image_size, data.in_chans).to(device)
    # The checkpoint a resumed run continues from, read once: its precision and its state.
    resumed = _last_checkpoint_state(cfg) if cfg.run.resume else None
    precision, precision_reason = _training_precision(cfg, device, ctx, model, resumed)
    objective.prepare(model, data)
    objective.to(device)
    train_set, fast_augment, val_set, test_set = _datasets(cfg, data, image_size)
    run = _optimisation(cfg, ctx, device, precision, objective, data, model, train_set, fast_augment,
                        val_set, test_set)
    run.precision_reason = precision_reason
    if not cfg.run.resume:
        if ctx.rank:
            torch.manual_seed(derive_seed(cfg.run.seed, ctx.rank))  # dropout masks differ between ranks
    else:
        _restore(run, resumed)
    _prepare_forward(run)
    # A resumed run keeps the epochs its config.yaml records, whatever this machine's speed now.
    if cfg.optim.time_budget is not None and not cfg.run.resume:
        _fit_time_budget(run, started)
    if not cfg.run.resume:
        _on_main_first(ctx, lambda: write_run_dir(run.cfg))
    _announce(run)
    if ctx.is_main:
        run.log = MetricsLog(run.run_dir, tensorboard=cfg.run.tensorboard,
                             resume_step=run.position.step if cfg.run.resume else None)
    return run


def _training_precision(cfg: TrainConfig, device: torch.device, ctx: distributed.Distributed,
                        model: torch.nn.Module, resumed: tuple[Path, dict] | None) -> tuple[str, str]:
    """The run's precision and why: the one asked for, or for "auto" the one the resumed checkpoint records, else
    the faster of bf16-mixed and fp32 on this machine (vitkit.fastest_mode: timed once where the features do not
    decide). Every process runs rank 0's."""
    if cfg.run.precision != "auto":
        return resolve_precision(cfg.run.precision, device, training=True), ""
    saved = resumed[1].get("precision") if resumed is not None else None
    if saved in ("fp32", "bf16-mixed"):
        # The precision the run started in, not a new timing's: a resumed run continues the same arithmetic.
        return saved, f"{saved}, as the run's checkpoint records"
    options = training_candidates(device)
    if len(options) == 1:  # the features decide, alike on every process
        return options[0], ""
    reason, bf16 = "", False
    if ctx.is_main:
        micro_batch = cfg.optim.batch_size // ctx.world_size // cfg.optim.accumulate
        choice = fastest_training_precision(model, device, micro_batch)
        reason, bf16 = choice.reason, choice.precision == "bf16-mixed"
    return ("bf16-mixed" if ctx.broadcast_flag(bf16) else "fp32"), reason


def _load_data(cfg: TrainConfig):
    d = cfg.data
    data = load_dataset(d.dataset, data_dir=d.data_dir, download=d.download, seed=cfg.run.seed,
                        on_bad_image=d.on_bad_image, image_size=d.image_size,
                        **({"val_size": _count_or_fraction(d.val_size)} if d.val_size is not None else {}))
    image_size = (d.image_size, d.image_size) if d.image_size else tuple(data.image_size)
    data = _resized_in_memory(data, image_size)
    if d.train_size is not None:
        data.train = training_subset(data.train, _count_or_fraction(d.train_size), cfg.run.seed)
    return data, image_size


RESIZED_IN_MEMORY_BYTES = 2**30
"""The most bytes of pixels a split held in memory may take once resized to --data.image_size for the resize to be
done once at loading; larger ones (Fashion-MNIST at 224 px: 3 GB) are resized image by image as they are read."""


def _resized_in_memory(data, image_size: tuple[int, int]):
    """`data` with its in-memory splits resized to `image_size` once, where they fit RESIZED_IN_MEMORY_BYTES: the
    steps then gather whole batches (the batched augmentation) instead of reading and resizing image by image, which
    made a quick-preset step at 32 px 1.6x slower (the same pixels either way)."""
    splits = {}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if isinstance(split, ImageTensorDataset) and tuple(split.images.shape[-2:]) != image_size:
            if len(split) * split.images.shape[1] * image_size[0] * image_size[1] <= RESIZED_IN_MEMORY_BYTES:
                splits[name] = split.resized(image_size)
    return dataclasses.replace(data, **splits)


def _datasets(cfg: TrainConfig, data, image_size: tuple[int, int]):
    """(augmented training set, its batched fast path or None, validation set, test set)."""
    d = cfg.data
    augment = train_transform(data.mean, data.std, image_size, crop=d.crop, pad=d.pad, flip=d.flip,
                              randaugment=d.randaugment, random_erasing=d.random_erasing)
    # In-memory datasets with the plain crop/flip augmentation take the batched path (same distribution).
    fast_augment = None
    if (hasattr(data.train, "images") and d.crop in ("pad", "none") and not d.randaugment
            and not d.random_erasing and tuple(data.train.images.shape[-2:]) == tuple(image_size)):
        fast_augment = BatchAugment(data.mean, data.std, pad=d.pad if d.crop == "pad" else 0, flip=d.flip)
    return (SeededAugment(data.train, augment), fast_augment, evaluation_set(data.val, data.mean, data.std, image_size),
            evaluation_set(data.test, data.mean, data.std, image_size))


def _optimisation(cfg, ctx, device, precision, objective, data, model, train_set, fast_augment, val_set,
                  test_set) -> Run:
    """The run with its optimiser, schedule and weight average (EMA) over the model and the objective."""
    o = cfg.optim
    steps_per_epoch = len(data.train) // o.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--optim.batch_size {o.batch_size} is larger than the training split "
                         f"({len(data.train)} images): lower it")
    total_steps = max(1, round(o.epochs * steps_per_epoch))
    optimizer = build_optimizer([model, objective], o.optimizer, o.lr, o.weight_decay, o.betas, o.momentum)
    scheduler = _schedule(optimizer, o, total_steps)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(o.ema)) if o.ema > 0 else None
    return Run(cfg, ctx, device, precision, objective, data, model, None, model, optimizer, scheduler, ema,
               train_set, fast_augment, val_set, test_set, preprocess_metadata(data), total_steps, steps_per_epoch)


def _schedule(optimizer: torch.optim.Optimizer, o, total_steps: int,
              step: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of `o` (the run's OptimOptions) over `total_steps`, at `step`."""
    return build_scheduler(optimizer, total_steps, warmup_steps(o.warmup, total_steps), o.schedule, step)


def _last_checkpoint_state(cfg: TrainConfig) -> tuple[Path, dict] | None:
    """(weights file, training state) of the run's last checkpoint, or None when it has none yet."""
    found = last_checkpoint(Path(cfg.run.out))
    return None if found is None else (found[0], load_training_state(found[1]))


def _restore(run: Run, resumed: tuple[Path, dict] | None) -> None:
    """Continue from the run's last checkpoint (`resumed`, its weights file and training state): weights, optimiser,
    schedule, EMA, position and RNG state."""
    if resumed is None:
        if run.ctx.is_main:
            print(f"resuming {run.run_dir}: no checkpoint yet, starting from the beginning")
        return
    weights_path, state = resumed
    load_checkpoint_weights(run.model, weights_path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    if "objective" in state:
        run.objective.load_state_dict(state["objective"])
    run.position = Position(**state["position"])
    run.best_score, run.skipped_steps = state.get("best_val", -math.inf), state.get("skipped_steps", 0)
    set_rng_state(state["rng"])
    if run.ctx.rank:  # the saved RNG state is rank 0's; the others need streams of their own
        torch.manual_seed(derive_seed(run.cfg.run.seed, run.ctx.rank, run.position.step))
    if run.ctx.is_main:
        p = run.position
        print(f"resuming {run.run_dir} at step {p.step} (epoch {p.epoch + 1}, batch {p.batch})")


def _prepare_forward(run: Run) -> None:
    """Wrap the model as the steps call it: DDP (which broadcasts rank 0's parameters and averages gradients),
    then torch.compile, then the run's autocast."""
    r = run.cfg.run
    network = run.objective.network(run.model)
    run.network = torch.nn.parallel.DistributedDataParallel(network) if run.ctx.enabled else network
    run.ctx.broadcast_parameters(run.objective.parameters())  # the objective's own, outside DDP
    compiled = resolve_compile(r.compile, run.device, run.total_steps)
    inner = compile_for_training(run.network) if compiled else run.network
    device, precision = run.device, run.precision

    def forward(*args, **kwargs):
        with autocast(device, precision):
            return inner(*args, **kwargs)

    run.forward = forward
    run.compiled = compiled


def _announce(run: Run) -> None:
    """What "auto" chose for the run's precision and compilation, and why."""
    r = run.cfg.run
    if run.ctx.is_main and (r.precision == "auto" or r.compile == "auto"):
        print(f"{run.precision} precision, {'compiled' if run.compiled else 'not compiled'} "
              f"(--run.precision {r.precision}, --run.compile {str(r.compile).lower()}; {run.total_steps} steps)")
        if run.precision_reason:
            print(f"precision auto: {run.precision_reason}")


# ---- --optim.time_budget ----

TIMED_STEPS = 8
"""Steps timed at each PatchDropout rate for --optim.time_budget (the median counts), after `UNTIMED_STEPS`."""
UNTIMED_STEPS = 2
"""Steps run at each rate before the timed ones: the first compiles the rate's step when the run compiles, and the
steps just after it ran slower than the run's later ones (a compiled fp32 step of the fast preset's model on a 2-core
AMD EPYC without AVX-512: timed at 0.201 and 0.340 s after one such step, 0.171 and 0.260 s a step in the run)."""
TIMED_EVAL_IMAGES = 500
"""Validation images whose evaluation is timed for --optim.time_budget."""


def _fit_time_budget(run: Run, started: float) -> None:
    """--optim.time_budget: time the run's own steps at each PatchDropout rate it will use (the first at each
    compiles it, as the run would have), put the model, optimiser, weight average, position and random state back
    as they were, and give the run the number of steps that fits (vitkit.train.time_budget)."""
    ctx, o = run.ctx, run.cfg.optim
    phases = o.patch_dropout_phases or [(1.0, None)]
    before = _state_before_timing(run)
    # Every phase must hold steps while timing, whatever --optim.epochs gave: the rates are looked up in a long run.
    run.total_steps = 1_000_000
    batches = _batches_for_timing(run)
    seconds_at: dict[float | None, float] = {}
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        start = 0.0
        for end, rate in phases:
            if rate not in seconds_at:
                run.position.step = math.ceil(start * run.total_steps)  # the first step of this phase
                times = []
                for _ in range(UNTIMED_STEPS + TIMED_STEPS):
                    _synchronize(run.device)
                    began = time.perf_counter()
                    images, labels = next(batches)  # reading the batch is part of a step's time in the run
                    train_step(run, images, labels)
                    _synchronize(run.device)
                    times.append(time.perf_counter() - began)
                seconds_at[rate] = float(np.median(times[UNTIMED_STEPS:]))
            start = end
        eval_seconds = _eval_seconds_per_image(run)
    _restore_state_before_timing(run, before)
    timed = TimedRun(time.perf_counter() - started, [(end, seconds_at[rate]) for end, rate in phases], eval_seconds)
    steps = _fitted_steps(run, timed)
    _follow_plan(run, steps)
    run.began, run.budget_timing = started, timed
    if ctx.is_main:
        rates = ", ".join(f"{seconds:.3f} s" + ("" if rate is None else f" at PatchDropout {rate:g}")
                          for rate, seconds in seconds_at.items())
        print(f"time budget {o.time_budget:g} min: set-up took {timed.elapsed:.0f} s, a step {rates}; "
              f"{steps} steps ({steps / run.steps_per_epoch:.2f} epochs) fit, in place of --optim.epochs {o.epochs:g}")


def _fitted_steps(run: Run, timed: TimedRun) -> int:
    """The steps that fit the budget (vitkit.train.time_budget.steps_within) after `timed`, the run's steps so far
    counted: rank 0's answer on every process."""
    o, p = run.cfg.optim, run.position
    steps = _on_main_first(run.ctx, lambda: steps_within(o.time_budget, timed, run.steps_per_epoch,
                                                          *_images_evaluated(run), done=p.step))
    return round(run.ctx.sum([float(steps) if run.ctx.is_main else 0.0])[0])


def _follow_plan(run: Run, steps: int) -> None:
    """Make `steps` the run's length from its current step on: the schedule rebuilt at that step, and the epochs they
    make in the run's config."""
    o = run.cfg.optim
    run.total_steps = steps
    run.scheduler = _schedule(run.optimizer, o, steps, step=run.position.step)
    run.cfg = dataclasses.replace(run.cfg, optim=dataclasses.replace(o, epochs=steps / run.steps_per_epoch))


CORRECTION_WINDOW = 0.1
"""The share of the budget the steps since the last correction must have taken before the plan is corrected again
(and at least more steps than a timing): windows of 70-140 steps (8-16 s) of the quick preset swung its plan by up to
7% from one to the next on a 2-core AMD EPYC."""
PLAN_CHANGE_SHOWN = 0.01
"""A corrected plan is printed when it moves the run's end by at least this share of its steps (the first always)."""


def _correct_time_budget(run: Run, seconds_in_steps: float) -> None:
    """At an epoch's end or checkpoint, before anything is written: scale the step times by how long the steps since
    the last correction took (`seconds_in_steps` for the latest of them), plan the steps again, and record the
    epochs in config.yaml before the checkpoint, so a resumed run keeps the plan of its checkpoint (vitkit.train.
    time_budget.corrected). The learning rate and PatchDropout follow the new plan from this step on."""
    ctx, o, p = run.ctx, run.cfg.optim, run.position
    first, spent = run.budget_window[0], run.budget_window[1] + seconds_in_steps
    if p.step >= run.total_steps:  # the last step: nothing left to plan
        run.budget_timing = None
        return
    too_few = p.step - first <= TIMED_STEPS or spent < CORRECTION_WINDOW * o.time_budget * 60
    if ctx.broadcast_flag(too_few):  # rank 0's clock decides for every process
        run.budget_window = (first, spent)
        return
    timed = run.budget_timing
    now = corrected(timed, run.total_steps, first, p.step, spent, time.perf_counter() - run.began)
    steps = _fitted_steps(run, now)
    run.budget_timing, run.budget_window = now, (p.step, 0.0)
    planned = run.total_steps
    if steps == planned:
        return
    _follow_plan(run, steps)
    if ctx.is_main:
        write_config(run.cfg)
        run.progress.total = run.stop_at
        run.progress.refresh()
        if first == 0 or abs(steps - planned) >= PLAN_CHANGE_SHOWN * planned:
            scale = now.step_seconds[0][1] / timed.step_seconds[0][1]
            run.progress.write(f"time budget {o.time_budget:g} min: steps {first + 1}-{p.step} took "
                               f"{spent / (p.step - first):.3f} s each, {scale:.2f}x the plan's; {steps} steps "
                               f"({steps / run.steps_per_epoch:.2f} epochs) fit, in place of {planned}")


def _batches_for_timing(run: Run):
    """The first epoch's batches, over and over (a short training split has fewer than the timing takes)."""
    while True:
        run.position.batch = 0
        found = False
        for batch in _epoch_batches(run):
            if batch is not None:
                found = True
                yield batch
        if not found:
            raise TrainingError("--optim.time_budget: no batch of the training split could be read to time a step")


def _eval_seconds_per_image(run: Run) -> float:
    """Seconds per image of evaluation in the run's precision, timed on the first validation (or test) images."""
    split = run.val_set if len(run.val_set) else run.test_set
    count = min(TIMED_EVAL_IMAGES, len(split))
    if count == 0:
        return 0.0
    began = time.perf_counter()
    with autocast(run.device, run.precision):
        run.objective.evaluate(run.eval_model, Subset(split, range(count)), run.device)
    return (time.perf_counter() - began) / count


def _images_evaluated(run: Run) -> tuple[float, int]:
    """(images evaluated per epoch, images evaluated once at the end) by the run as configured."""
    every, calibrated = run.cfg.run.eval_every, run.cfg.run.int8_calibration_images
    per_epoch = len(run.val_set) / every if every > 0 else 0.0
    once = (len(run.val_set) if every == 0 else 0) + len(run.test_set)
    if calibrated > 0 and isinstance(run.eval_model, ViT) and run.eval_model.cfg.num_classes > 0:
        once += min(calibrated, len(run.data.train))
    return per_epoch, once


def _state_before_timing(run: Run) -> dict:
    """Copies of everything a step changes."""
    def copied(state: dict) -> dict:
        return {key: value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)
                for key, value in state.items()}

    return {"model": copied(run.model.state_dict()), "objective": copied(run.objective.state_dict()),
            "optimizer": copy.deepcopy(run.optimizer.state_dict()),
            "ema": copied(run.ema.state_dict()) if run.ema is not None else None,
            "position": dataclasses.replace(run.position), "skipped_steps": run.skipped_steps}


def _restore_state_before_timing(run: Run, before: dict) -> None:
    run.model.load_state_dict(before["model"])
    if before["objective"]:
        run.objective.load_state_dict(before["objective"])
    run.optimizer.load_state_dict(before["optimizer"])
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.load_state_dict(before["ema"])
    run.position, run.skipped_steps = before["position"], before["skipped_steps"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the steps ----

def _train_epoch(run: Run) -> None:
    """The rest of the current epoch's batches (or up to the run's last step)."""
    p = run.position
    for batch in _epoch_batches(run):
        if batch is None:  # every image of the batch was unreadable and skipped
            p.batch += 1
            continue
        sums = train_step(run, batch[0], batch[1])
        _log_step(run, sums)
        if p.batch >= run.steps_per_epoch or p.step == run.stop_at or p.step % run.cfg.run.checkpoint_every == 0:
            started = time.perf_counter()
            _end_of_period(run)
            # The logged images/s are the steps' own: evaluation and checkpoints do not count against the window.
            run.window_start += time.perf_counter() - started
        if p.step >= run.stop_at:
            return
    if p.batch >= run.steps_per_epoch:  # the epoch ended on batches that were all skipped
        p.epoch += 1
        p.batch = 0


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """One optimiser step on this process's share of a global batch; returns the step's sums over all processes."""
    cfg, ctx, device, p = run.cfg, run.ctx, run.device, run.position
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    images, targets = run.objective.mix(images, labels, derive_seed(cfg.run.seed, p.epoch, p.batch, ctx.rank, 0x313))
    noise = _noise(run)
    rate = _patch_dropout(run, p.step)
    forward = run.forward if rate is None else functools.partial(run.forward, patch_dropout=rate)
    run.optimizer.zero_grad(set_to_none=True)
    micro = cfg.optim.batch_size // ctx.world_size // cfg.optim.accumulate
    chunks = range(0, len(images), micro)
    sums: dict[str, float] = {}
    for i, start in enumerate(chunks):
        part = slice(start, start + micro)
        x = images[part]
        x_noise = None if noise is None else noise[start:start + len(x)].to(device)
        # Gradients are averaged across processes once, on the last micro-batch.
        last = i == len(chunks) - 1 or not ctx.enabled
        with contextlib.nullcontext() if last else run.network.no_sync():
            step = run.objective.loss(forward, x, targets[part], labels[part], x_noise)
            (step.loss * len(x) / len(images)).backward()
        for key, value in step.sums.items():
            sums[key] = sums.get(key, 0.0) + value
    sums = dict(zip(sums, ctx.sum(list(sums.values()))))
    # DDP averaged the model's gradients in backward; the objective's own parameters are outside it.
    ctx.average_gradients(run.objective.parameters())
    _apply_gradients(run, sums["loss"] / sums["seen"])
    run.scheduler.step()
    p.step += 1
    p.batch += 1
    crash_points.reached("train.after_step")
    return sums


def _apply_gradients(run: Run, loss: float) -> None:
    """Clip and apply the gradients, or, where the loss or gradient is not finite, skip the step or stop."""
    params = [*run.model.parameters(), *run.objective.parameters()]
    clip = run.cfg.optim.clip_grad
    # foreach: torch takes it on CUDA by itself; on a CPU it is asked for (0.7 against 1.2 ms at the quick
    # preset's model).
    if clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    if math.isfinite(loss) and math.isfinite(float(grad_norm)):
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        return
    if run.cfg.run.on_nonfinite == "skip":
        run.skipped_steps += 1
        run.optimizer.zero_grad(set_to_none=True)
        return
    if run.progress is not None:  # None while --optim.time_budget times the steps
        run.progress.close()
    if run.log:
        run.log.close()
    found = last_checkpoint(run.run_dir)
    kept = f"the last good checkpoint is {found[0]}" if found else "no checkpoint had been written yet"
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    p = run.position
    raise TrainingError(f"the {what} became non-finite at step {p.step + 1} (epoch {p.epoch + 1}); {kept}. "
                        "Lower --optim.lr, keep --optim.clip_grad on, or use --run.on_nonfinite skip.")


def _log_step(run: Run, sums: dict[str, float]) -> None:
    """Add the step to the logging window; every log_every steps, log the window's averages."""
    window, p = run.window, run.position
    window["loss"] = window.get("loss", 0.0) + sums["loss"] / sums["seen"]
    for key, value in sums.items():
        if key != "loss":
            window[key] = window.get(key, 0.0) + value
    run.window_steps += 1
    run.progress.update(1)
    if not run.ctx.is_main or not (p.step % run.cfg.run.log_every == 0 or p.step == run.stop_at):
        return
    elapsed = time.perf_counter() - run.window_start
    record = {**run.objective.train_metrics(window, run.window_steps),
              "train/lr": run.scheduler.get_last_lr()[0],
              **({} if run.cfg.optim.patch_dropout_phases is None else
                 {"train/patch_dropout": _patch_dropout(run, p.step - 1)}),  # the last step's
              "train/images_per_s": window["seen"] / max(elapsed, 1e-9),
              "epoch": p.epoch + p.batch / run.steps_per_epoch}
    run.log.log(record, p.step)
    shown = {"loss": f"{record['train/loss']:.3f}"}
    if "train/top1" in record:
        shown["acc"] = f"{100 * record['train/top1']:.1f}%"
    run.progress.set_postfix(**shown, img_s=f"{record['train/images_per_s']:.0f}")
    run.window, run.window_steps, run.window_start = {}, 0, time.perf_counter()


# ---- evaluation and checkpoints ----

def _end_of_period(run: Run) -> None:
    """At an epoch's end, the last step or a checkpoint step: evaluate (every `eval_every` epoch ends and the last
    step), then write a checkpoint. Under --optim.time_budget the plan is corrected first. Every process waits for
    rank 0 here."""
    if run.budget_timing is not None:
        _correct_time_budget(run, time.perf_counter() - run.steps_resumed)
    p, main = run.position, run.ctx.is_main
    epoch_done = p.batch >= run.steps_per_epoch
    every = run.cfg.run.eval_every
    evaluate_now = p.step == run.stop_at or (epoch_done and every > 0 and (p.epoch + 1) % every == 0)
    if main and evaluate_now and len(run.val_set):
        with autocast(run.device, run.precision):
            run.val = run.objective.evaluate(run.eval_model, run.val_set, run.device)
        run.log.log({**{f"val/{k}": v for k, v in run.val.metrics.items()},
                     "epoch": p.epoch + p.batch / run.steps_per_epoch}, p.step)
        where = f"epoch {p.epoch + 1}" if epoch_done else f"step {p.step}"
        run.progress.write(f"{where}: val {run.val.text}")
        if run.val.score > run.best_score:
            run.best_score = run.val.score
            save_weights(run.eval_model, run.run_dir / "best.safetensors", metadata=run.metadata)
    if epoch_done:
        p.epoch += 1
        p.batch = 0
    if main:
        write_checkpoint(run)
    run.ctx.barrier()
    run.steps_resumed = time.perf_counter()


def write_checkpoint(run: Run) -> None:
    state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "best_val": run.best_score, "skipped_steps": run.skipped_steps, "precision": run.precision}
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    objective_state = run.objective.state_dict()
    if objective_state:  # an objective's own parameters (a mask embedding, a prediction head)
        state["objective"] = objective_state
    save_checkpoint(run.run_dir, run.position, lambda path: save_weights(run.model, path, metadata=run.metadata),
                    state, keep=run.cfg.run.keep_checkpoints)


# ---- the end ----

def finish(run: Run) -> TrainResult:
    """Final weights, the test evaluation of a finished run, and the report (rank 0)."""
    run.progress.close()
    seconds = time.perf_counter() - run.start
    p = run.position
    if not run.ctx.is_main:
        return TrainResult(run.run_dir, p.step, None, None, seconds, run.skipped_steps)
    save_weights(run.eval_model, run.run_dir / "model.safetensors", metadata=run.metadata)
    test = None
    if p.step >= run.total_steps:
        with autocast(run.device, run.precision):
            test = run.objective.evaluate(run.eval_model, run.test_set, run.device)
        run.log.log({f"test/{k}": v for k, v in test.metrics.items()}, p.step)
    elif run.cfg.run.max_steps:
        print(f"stopped at step {p.step} of {run.total_steps} (--run.max_steps); continue with --run.resume")
    run.log.close()
    # For a finished ViT classifier: int8 inference is for classifying, and a run stopped early will change.
    if (run.cfg.run.int8_calibration_images > 0 and p.step >= run.total_steps and isinstance(run.eval_model, ViT)
            and run.eval_model.cfg.num_classes > 0):
        _write_int8_calibration(run)
    _write_report(run, test, seconds)
    return TrainResult(run.run_dir, p.step, run.val.result if run.val else None, test.result if test else None,
                       seconds, run.skipped_steps)


def _write_int8_calibration(run: Run) -> None:
    """model.int8_calibration.json: the final weights' int8 activation ranges over the first training images, seen
    as at evaluation (vitkit.int8_calibration). After the test evaluation, and drawing no random numbers."""
    model, data = run.eval_model, run.data
    # Transformed image by image: only the first ones are read, where evaluation_set would normalise the whole split.
    images = Transformed(data.train, eval_transform(data.mean, data.std, model.cfg.img_size))
    try:
        calibration = calibrate_int8(model, first_images(images, run.cfg.run.int8_calibration_images))
    except ValueError as err:  # no readable image among them: the run itself is done and kept
        print(f"no int8 calibration written ({err})")
        return
    calibration.save(run.run_dir / "model.int8_calibration.json")


def _write_report(run: Run, test: Evaluation | None, seconds: float) -> None:
    """results.json, the training curves and the objective's own plots; the list of skipped images."""
    run_dir, data = run.run_dir, run.data
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_curves(read_metrics(run_dir / "metrics.jsonl"), plots / "curves.png")
    results = {"steps": run.position.step, "train_seconds_this_session": round(seconds, 1),
               "skipped_steps": run.skipped_steps, **run.objective.report(run_dir, data, run.val, test)}
    skipped = {}
    for split in (data.train, data.val, data.test):
        skipped.update(getattr(split, "skipped", None) or {})
    if skipped:
        atomic_write_text(run_dir / "skipped_images.txt",
                          "".join(f"{path}\t{reason}\n" for path, reason in sorted(skipped.items())))
        results["skipped_images"] = len(skipped)
        print(f"skipped {len(skipped)} unreadable image(s); see {run_dir / 'skipped_images.txt'}")
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    if test is not None:
        print(f"test {test.text}; run directory {run_dir}")


# ---- data order and random draws ----

def _epoch_batches(run: Run):
    """This process's share of the batches of the current epoch from its current batch on, as (images, labels).

    All randomness is seeded by (seed, epoch, position), and each process takes every world_size-th
    sample of the global batch with the augmentation the single-process run would give it.
    """
    seed, epoch, start, batch_size = run.cfg.run.seed, run.position.epoch, run.position.batch, run.cfg.optim.batch_size
    sampler = EpochBatches(len(run.train_set), batch_size, seed, epoch, start=start)
    share = slice(run.ctx.rank, None, run.ctx.world_size)
    if run.fast_augment is not None:
        images, labels = run.train_set.base.images, run.train_set.base.labels
        for b in range(start, start + len(sampler)):
            index = sampler.order[b * batch_size:(b + 1) * batch_size]
            generator = torch.Generator().manual_seed(derive_seed(seed, epoch, b, 0xA06))
            yield run.fast_augment(images[index], generator)[share], labels[index][share]
        return
    # Its own generator: creating a loader draws a seed, and that must not move the global RNG
    # (which dropout uses), or a resumed run would drift from the uninterrupted one.
    loader = DataLoader(run.train_set, batch_sampler=[batch[share] for batch in sampler],
                        num_workers=run.cfg.data.num_workers, collate_fn=collate_skip_none,
                        generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
    yield from loader


def _noise(run: Run) -> torch.Tensor | None:
    """The objective's per-image noise for this step (this process's rows, (B / world_size, *shape)), or None.

    Drawn for the whole global batch from (seed, epoch, batch) and shared out like the images, so an image
    gets the same draw however the batch is split over processes and micro-batches, and on resume.
    """
    shape = run.objective.noise_shape(run.model)
    if shape is None:
        return None
    p, ctx = run.position, run.ctx
    generator = torch.Generator().manual_seed(derive_seed(run.cfg.run.seed, p.epoch, p.batch, 0x9A7C))
    return torch.rand(run.cfg.optim.batch_size, *shape, generator=generator)[ctx.rank::ctx.world_size]


def _patch_dropout(run: Run, step: int) -> float | None:
    """The PatchDropout rate of `step` (0-based) under --optim.patch_dropout_phases, or None (the model's own rate)."""
    phases = run.cfg.optim.patch_dropout_phases
    return None if phases is None else patch_dropout_at(phases, step, run.total_steps)


def _count_or_fraction(value: float) -> int | float:
    return int(value) if value >= 1 else float(value)
