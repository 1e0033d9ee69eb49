"""`vitkit train`: supervised training of a ViT from scratch, with exact resume."""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vitkit import crash_points
from vitkit.atomic import atomic_write_text
from vitkit.data import batch_mixer, collate_skip_none, eval_transform, load_dataset, train_transform
from vitkit.data.batch_augment import BatchAugment
from vitkit.model import create_model
from vitkit.train import distributed
from vitkit.train.checkpoint import Position, last_checkpoint, load_training_state, save_checkpoint, set_rng_state
from vitkit.train.config import TrainConfig
from vitkit.train.distributed import local_device
from vitkit.train.evaluate import EvalResult, autocast, evaluate
from vitkit.train.hardware import compile_for_training, resolve_compile, resolve_precision
from vitkit.train.metrics import MetricsLog, plot_confusion, plot_curves, read_metrics, topk_correct
from vitkit.train.optim import build_optimizer, build_scheduler, warmup_steps
from vitkit.train.sampling import EpochBatches, SeededAugment, Transformed, derive_seed
from vitkit.weights import load_weights, save_weights


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable run directory); the message says what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    val: EvalResult | None
    test: EvalResult | None
    seconds: float
    skipped_steps: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --run.device cpu")
    return device


def validate(cfg: TrainConfig) -> None:
    o = cfg.optim
    if o.batch_size < 1:
        raise ValueError(f"--optim.batch_size must be at least 1, got {o.batch_size}")
    if o.accumulate < 1 or o.batch_size % o.accumulate:
        raise ValueError(f"--optim.accumulate {o.accumulate} must be >= 1 and divide the batch size {o.batch_size}")
    if not o.epochs > 0:
        raise ValueError(f"--optim.epochs must be positive, got {o.epochs}")
    if not 0 <= o.label_smoothing < 1:
        raise ValueError(f"--optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
    if not 0 <= o.ema < 1:
        raise ValueError(f"--optim.ema must be in [0, 1) (0 turns it off), got {o.ema}")
    if o.clip_grad is not None and o.clip_grad <= 0:
        raise ValueError(f"--optim.clip_grad must be positive or null, got {o.clip_grad}")
    if cfg.run.checkpoint_every < 1:
        raise ValueError(f"--run.checkpoint_every must be at least 1, got {cfg.run.checkpoint_every}")
    if cfg.run.log_every < 1:
        raise ValueError(f"--run.log_every must be at least 1, got {cfg.run.log_every}")
    if cfg.run.max_steps is not None and cfg.run.max_steps < 1:
        raise ValueError(f"--run.max_steps must be at least 1, got {cfg.run.max_steps}")
    if cfg.data.num_workers < 0:
        raise ValueError(f"--data.num_workers must be >= 0, got {cfg.data.num_workers}")


def resumed_config(run_dir: Path, cfg: TrainConfig) -> TrainConfig:
    """The run's own config.yaml: a run continues as it was configured; only these may change on resume."""
    path = run_dir / "config.yaml"
    try:
        saved = TrainConfig.from_dict(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValueError, TypeError) as err:
        raise TrainingError(f"cannot resume: {path} is not a valid vitkit run config ({err})") from err
    saved.run.resume, saved.run.progress = True, cfg.run.progress
    saved.run.max_steps, saved.run.device = cfg.run.max_steps, cfg.run.device
    return saved


def check_run_dir(cfg: TrainConfig) -> TrainConfig:
    """Check that `cfg` can start or resume a run in its directory, writing nothing; on resume, the run's config."""
    run_dir = Path(cfg.run.out)
    config_path = run_dir / "config.yaml"
    if cfg.run.resume:
        if not config_path.exists():
            raise TrainingError(f"--run.resume: {run_dir} holds no run (no config.yaml); "
                                "check --run.out or start without --run.resume")
        return resumed_config(run_dir, cfg)
    if config_path.exists() and not cfg.run.overwrite:
        raise TrainingError(f"{run_dir} already holds a run; continue it with --run.resume, replace it with "
                            "--run.overwrite, or choose another --run.out")
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"--run.out {run_dir} is a file, not a directory: choose another --run.out")
    return cfg


def write_run_dir(cfg: TrainConfig) -> Path:
    """Create a new run's directory (clearing the results of a run it replaces) and write its config."""
    run_dir = Path(cfg.run.out)
    config_path = run_dir / "config.yaml"
    if config_path.exists() and cfg.run.overwrite:
        for name in ("checkpoints", "tensorboard", "plots"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "results.json", "model.safetensors", "best.safetensors",
                     "skipped_images.txt"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, "# vitkit train --config " + str(config_path) + "\n"
                      + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, TrainConfig]:
    """Create the run directory, or on resume read back the run's own config."""
    cfg = check_run_dir(cfg)
    if not cfg.run.resume:
        write_run_dir(cfg)
    return Path(cfg.run.out), cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def preprocess_metadata(data) -> dict[str, str]:
    """What `predict` and `eval` need to feed the model images the way training did."""
    info = {"dataset": data.name, "mean": list(data.mean), "std": list(data.std), "class_names": data.class_names}
    return {"vitkit_preprocess": json.dumps(info)}


def train(cfg: TrainConfig) -> TrainResult:
    """Train as `cfg` says; under torchrun, one process per device shares every batch."""
    validate(cfg)
    device = local_device(resolve_device(cfg.run.device))
    ctx = distributed.setup(device)
    try:
        return _train(cfg, device, ctx)
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


def build_model(cfg: TrainConfig, data, image_size: tuple[int, int]):
    """A new model for `data`: the pretrained weights adapted for fine-tuning, or a random initialisation."""
    if data.num_classes < 2:
        raise ValueError(f"dataset {data.name} has {data.num_classes} class; classification needs at least 2 "
                         "(an image folder needs one sub-folder per class)")
    if cfg.init.weights:
        from vitkit.finetune import model_for_finetune

        return model_for_finetune(cfg.init, cfg.model, data.num_classes, image_size, data.in_chans)
    if cfg.init.freeze:
        raise ValueError("--init.freeze needs pretrained weights (--init.weights): a random backbone is not "
                         "worth freezing")
    if cfg.model.name is None:
        raise ValueError("--model.name is needed to train from scratch (e.g. 'Ti/4'); it may be left unset only "
                         "when fine-tuning from --init.weights")
    return create_model(cfg.model.name, img_size=image_size, in_chans=data.in_chans,
                        num_classes=data.num_classes, **cfg.model.overrides())


def _train(cfg: TrainConfig, device: torch.device, ctx: distributed.Distributed) -> TrainResult:
    if cfg.optim.batch_size % (ctx.world_size * cfg.optim.accumulate):
        raise ValueError(f"--optim.batch_size {cfg.optim.batch_size} must divide evenly over {ctx.world_size} "
                         f"process(es) x {cfg.optim.accumulate} accumulation step(s)")
    # Nothing is written until the data and the model are known to be good: a bad option or file must not
    # leave a half-made run directory behind (or clear the run that --run.overwrite would replace).
    checked = _on_main_first(ctx, lambda: check_run_dir(cfg))
    if ctx.is_main:
        cfg = checked
    elif cfg.run.resume:
        cfg = resumed_config(Path(cfg.run.out), cfg)
    run_dir = Path(cfg.run.out)
    seed_everything(cfg.run.seed)
    d, o, r = cfg.data, cfg.optim, cfg.run
    main = ctx.is_main
    precision = resolve_precision(r.precision, device)

    data = load_dataset(d.dataset, data_dir=d.data_dir, download=d.download, seed=r.seed,
                        on_bad_image=d.on_bad_image, image_size=d.image_size,
                        **({"val_size": _count_or_fraction(d.val_size)} if d.val_size is not None else {}))
    image_size = (d.image_size, d.image_size) if d.image_size else tuple(data.image_size)
    model = build_model(cfg, data, image_size).to(device)
    metadata = preprocess_metadata(data)

    augment = train_transform(data.mean, data.std, image_size, crop=d.crop, pad=d.pad, flip=d.flip,
                              randaugment=d.randaugment, random_erasing=d.random_erasing)
    evaluation = eval_transform(data.mean, data.std, image_size)
    train_set = SeededAugment(data.train, augment)
    # In-memory datasets with the plain crop/flip augmentation take the batched path (same distribution).
    fast_augment = None
    if (hasattr(data.train, "images") and d.crop in ("pad", "none") and not d.randaugment
            and not d.random_erasing and tuple(data.train.images.shape[-2:]) == tuple(image_size)):
        fast_augment = BatchAugment(data.mean, data.std, pad=d.pad if d.crop == "pad" else 0, flip=d.flip)
    val_set, test_set = Transformed(data.val, evaluation), Transformed(data.test, evaluation)
    mixer = batch_mixer(data.num_classes, d.mixup, d.cutmix)

    steps_per_epoch = len(data.train) // o.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--optim.batch_size {o.batch_size} is larger than the training split "
                         f"({len(data.train)} images): lower it")
    total_steps = max(1, round(o.epochs * steps_per_epoch))
    optimizer = build_optimizer(model, o.optimizer, o.lr, o.weight_decay, o.betas, o.momentum)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps(o.warmup, total_steps), o.schedule)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(o.ema)) if o.ema > 0 else None
    if not r.resume:
        _on_main_first(ctx, lambda: write_run_dir(cfg))

    position, best_val, skipped_steps = Position(), -1.0, 0
    if r.resume:
        found = last_checkpoint(run_dir)
        if found is not None:
            weights_path, state_path = found
            load_weights(model, weights_path)
            state = load_training_state(state_path)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            position = Position(**state["position"])
            best_val, skipped_steps = state.get("best_val", -1.0), state.get("skipped_steps", 0)
            set_rng_state(state["rng"])
            if ctx.rank:  # the saved RNG state is rank 0's; the others need streams of their own
                torch.manual_seed(derive_seed(r.seed, ctx.rank, position.step))
            if main:
                print(f"resuming {run_dir} at step {position.step} (epoch {position.epoch + 1}, "
                      f"batch {position.batch})")
        elif main:
            print(f"resuming {run_dir}: no checkpoint yet, starting from the beginning")
    elif ctx.rank:
        torch.manual_seed(derive_seed(r.seed, ctx.rank))  # dropout masks differ between ranks

    # DDP broadcasts rank 0's parameters at construction and averages gradients in backward.
    network = torch.nn.parallel.DistributedDataParallel(model) if ctx.enabled else model
    compiled = resolve_compile(r.compile, device, total_steps)
    forward = compile_for_training(network) if compiled else network
    if main and (r.precision == "auto" or r.compile == "auto"):
        print(f"{precision} precision, {'compiled' if compiled else 'not compiled'} "
              f"(--run.precision {r.precision}, --run.compile {str(r.compile).lower()}; {total_steps} steps)")
    log = None
    if main:
        log = MetricsLog(run_dir, tensorboard=r.tensorboard, resume_step=position.step if r.resume else None)

    def write_checkpoint():
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "best_val": best_val, "skipped_steps": skipped_steps}
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_checkpoint(run_dir, position, lambda p: save_weights(model, p, metadata=metadata), state,
                        keep=r.keep_checkpoints)

    stop_at = min(total_steps, r.max_steps) if r.max_steps else total_steps
    progress = tqdm(total=stop_at, initial=position.step, disable=not (r.progress and main), unit="step",
                    dynamic_ncols=True, desc="train")
    micro = o.batch_size // ctx.world_size // o.accumulate
    window = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "steps": 0}
    window_start = start = time.perf_counter()
    val_result = None
    model.train()

    while position.step < stop_at:
        batches = _epoch_batches(train_set, fast_augment, o.batch_size, r.seed, position.epoch, position.batch,
                                 d.num_workers, ctx)
        for batch in batches:
            if batch is None:  # every image of the batch was unreadable and skipped
                position.batch += 1
                continue
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            targets = labels
            if mixer is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(r.seed, position.epoch, position.batch, ctx.rank, 0x313))
                    images, targets = mixer(images, labels)
            noise = _patch_noise(model.cfg, o.batch_size, r.seed, position.epoch, position.batch, ctx)
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct = 0.0, 0
            chunks = range(0, len(images), micro)
            for i, chunk in enumerate(chunks):
                x, t = images[chunk:chunk + micro], targets[chunk:chunk + micro]
                patch_kwargs = {} if noise is None else {"patch_noise": noise[chunk:chunk + len(x)].to(device)}
                # Gradients are averaged across processes once, on the last micro-batch.
                sync = contextlib.nullcontext() if (i == len(chunks) - 1 or not ctx.enabled) else network.no_sync()
                with sync:
                    with autocast(device, precision):
                        logits = forward(x, **patch_kwargs)
                    loss = F.cross_entropy(logits.float(), t, label_smoothing=o.label_smoothing)
                    (loss * len(x) / len(images)).backward()
                loss_sum += loss.item() * len(x)
                correct += topk_correct(logits.detach().float(), labels[chunk:chunk + micro], (1,))[1]
            loss_sum, correct, seen = ctx.sum([loss_sum, float(correct), float(len(images))])
            loss_value = loss_sum / seen
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
                         if o.clip_grad else _grad_norm(model))
            if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                if r.on_nonfinite == "skip":
                    skipped_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                else:
                    progress.close()
                    if log:
                        log.close()
                    found = last_checkpoint(run_dir)
                    kept = f"the last good checkpoint is {found[0]}" if found else "no checkpoint had been written yet"
                    raise TrainingError(
                        f"the {what} became non-finite at step {position.step + 1} (epoch {position.epoch + 1}); "
                        f"{kept}. Lower --optim.lr, keep --optim.clip_grad on, or use --run.on_nonfinite skip.")
            else:
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
            scheduler.step()
            position.step += 1
            position.batch += 1
            crash_points.reached("train.after_step")

            window["loss"] += loss_value
            window["correct"] += correct
            window["seen"] += seen
            window["steps"] += 1
            progress.update(1)
            if main and (position.step % r.log_every == 0 or position.step == stop_at):
                elapsed = time.perf_counter() - window_start
                record = {"train/loss": window["loss"] / window["steps"],
                          "train/top1": window["correct"] / window["seen"],
                          "train/lr": scheduler.get_last_lr()[0],
                          "train/images_per_s": window["seen"] / max(elapsed, 1e-9),
                          "epoch": position.epoch + position.batch / steps_per_epoch}
                log.log(record, position.step)
                progress.set_postfix(loss=f"{record['train/loss']:.3f}", acc=f"{100 * record['train/top1']:.1f}%",
                                     img_s=f"{record['train/images_per_s']:.0f}")
                window = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "steps": 0}
                window_start = time.perf_counter()
            epoch_done = position.batch >= steps_per_epoch
            if epoch_done or position.step == stop_at or position.step % r.checkpoint_every == 0:
                if main and (epoch_done or position.step == stop_at) and len(val_set):
                    val_result = evaluate(ema.module if ema else model, val_set, data.num_classes, device,
                                          precision)
                    log.log({"val/loss": val_result.loss, "val/top1": val_result.top1, "val/top5": val_result.top5,
                             "epoch": position.epoch + position.batch / steps_per_epoch}, position.step)
                    where = f"epoch {position.epoch + 1}" if epoch_done else f"step {position.step}"
                    progress.write(f"{where}: val top-1 {100 * val_result.top1:.2f}% (loss {val_result.loss:.3f})")
                    if val_result.top1 > best_val:
                        best_val = val_result.top1
                        save_weights(ema.module if ema else model, run_dir / "best.safetensors", metadata=metadata)
                if epoch_done:
                    position.epoch += 1
                    position.batch = 0
                if main:
                    write_checkpoint()
                ctx.barrier()
            if position.step >= stop_at:
                break
        if position.batch >= steps_per_epoch:  # the epoch ended on batches that were all skipped
            position.epoch += 1
            position.batch = 0
    progress.close()
    seconds = time.perf_counter() - start
    if not main:
        return TrainResult(run_dir, position.step, None, None, seconds, skipped_steps)

    final_model = ema.module if ema else model
    save_weights(final_model, run_dir / "model.safetensors", metadata=metadata)
    test_result = None
    if position.step >= total_steps:
        test_result = evaluate(final_model, test_set, data.num_classes, device, precision)
        log.log({"test/loss": test_result.loss, "test/top1": test_result.top1, "test/top5": test_result.top5},
                position.step)
    elif r.max_steps:
        print(f"stopped at step {position.step} of {total_steps} (--run.max_steps); continue with --run.resume")
    log.close()
    _write_report(run_dir, data, val_result, test_result, seconds, position.step, skipped_steps)
    return TrainResult(run_dir, position.step, val_result, test_result, seconds, skipped_steps)


def _epoch_batches(train_set: SeededAugment, fast_augment: BatchAugment | None, batch_size: int, seed: int,
                   epoch: int, start: int, num_workers: int, ctx: distributed.Distributed):
    """This process's share of the batches of one epoch from batch `start` on, as (images, labels).

    All randomness is seeded by (seed, epoch, position), and each process takes every world_size-th
    sample of the global batch with the augmentation the single-process run would give it.
    """
    sampler = EpochBatches(len(train_set), batch_size, seed, epoch, start=start)
    share = slice(ctx.rank, None, ctx.world_size)
    if fast_augment is not None:
        images, labels = train_set.base.images, train_set.base.labels
        for b in range(start, start + len(sampler)):
            index = sampler.order[b * batch_size:(b + 1) * batch_size]
            generator = torch.Generator().manual_seed(derive_seed(seed, epoch, b, 0xA06))
            yield fast_augment(images[index], generator)[share], labels[index][share]
        return
    # Its own generator: creating a loader draws a seed, and that must not move the global RNG
    # (which dropout uses), or a resumed run would drift from the uninterrupted one.
    loader = DataLoader(train_set, batch_sampler=[batch[share] for batch in sampler], num_workers=num_workers,
                        collate_fn=collate_skip_none, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
    yield from loader


def _patch_noise(model_cfg, batch_size: int, seed: int, epoch: int, batch: int,
                 ctx: distributed.Distributed) -> torch.Tensor | None:
    """PatchDropout's scores (this process's rows, (B / world_size, N)) for one step, or None without it.

    Drawn for the whole global batch from (seed, epoch, batch) and shared out like the images, so a sample
    keeps the same patches however the batch is split over processes and micro-batches, and on resume.
    """
    if not model_cfg.patch_dropout > 0:
        return None
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, batch, 0x9A7C))
    return torch.rand(batch_size, math.prod(model_cfg.grid_size), generator=generator)[ctx.rank::ctx.world_size]


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros(())


def _count_or_fraction(value: float) -> int | float:
    return int(value) if value >= 1 else float(value)


def _write_report(run_dir: Path, data, val: EvalResult | None, test: EvalResult | None, seconds: float,
                  steps: int, skipped_steps: int) -> None:
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_curves(read_metrics(run_dir / "metrics.jsonl"), plots / "curves.png")
    results = {"steps": steps, "train_seconds_this_session": round(seconds, 1), "skipped_steps": skipped_steps}
    if val is not None:
        results["val"] = val.summary()
    if test is not None:
        results["test"] = test.summary()
        results["test_confusion"] = test.confusion.tolist()
        results["class_names"] = data.class_names
        plot_confusion(test.confusion, data.class_names, plots / "confusion_test.png",
                       f"{data.name} test: top-1 {100 * test.top1:.2f}%")
    skipped = getattr(data.train, "skipped", None) or {}
    for split in (data.val, data.test):
        skipped = {**skipped, **(getattr(split, "skipped", None) or {})}
    if skipped:
        atomic_write_text(run_dir / "skipped_images.txt",
                          "".join(f"{path}\t{reason}\n" for path, reason in sorted(skipped.items())))
        results["skipped_images"] = len(skipped)
        print(f"skipped {len(skipped)} unreadable image(s); see {run_dir / 'skipped_images.txt'}")
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    if test is not None:
        print(f"test top-1 {100 * test.top1:.2f}%  top-5 {100 * test.top5:.2f}%  ({test.count} images); "
              f"run directory {run_dir}")
