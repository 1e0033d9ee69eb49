"""A run's directory: checked before anything is written, created with its config, read back on resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from vitkit.atomic import atomic_write_text
from vitkit.train.config import TrainConfig
from vitkit.train.errors import TrainingError


def resumed_config(run_dir: Path, cfg: TrainConfig) -> TrainConfig:
    """The run's own config.yaml: a run continues as it was configured; only these may change on resume."""
    path = run_dir / "config.yaml"
    try:
        saved = type(cfg).from_dict(yaml.safe_load(path.read_text()))
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
                     "model.int8_calibration.json", "best.int8_calibration.json", "skipped_images.txt"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg)
    return run_dir


def write_config(cfg: TrainConfig) -> None:
    """Write (or replace) the run's config.yaml: what `--config` takes to run it again, and what a resume reads."""
    config_path = Path(cfg.run.out) / "config.yaml"
    atomic_write_text(config_path, f"# vitkit {cfg.command()} --config " + str(config_path) + "\n"
                      + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
