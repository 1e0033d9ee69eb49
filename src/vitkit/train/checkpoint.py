"""Resumable training checkpoints in a run directory.

Layout under `<run>/checkpoints/`:
    step-000500.safetensors   model weights (vitkit format, loadable by `vitkit.load_model`)
    step-000500.state.pt      optimiser, scheduler, EMA, RNG states and the position in the data
    last                      the name of the newest complete checkpoint ("step-000500")

Both files are written atomically, and `last` moves only after both are complete, so a crash at
any moment leaves the previous checkpoint usable. The state file is a torch zip read back with
`weights_only=True`: it holds tensors and plain Python values only, never pickled objects.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitkit import crash_points
from vitkit.atomic import atomic_path, atomic_write_text
from vitkit.train.errors import TrainingError
from vitkit.weights.safetensors_io import read_safetensors

LAST = "last"


@dataclass
class Position:
    """Where training stands: `step` optimiser steps done, `epoch` current epoch, `batch` batches done in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def rng_state() -> dict:
    """Every random state that affects training, as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4]), "table": torch.from_numpy(np_state[1].astype(np.int64))},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["table"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    position: Position,
    write_weights,
    training_state: dict,
    keep: int = 2,
) -> Path:
    """Write weights (via `write_weights(path)`) and `training_state` for `position`; move `last`.

    Returns the weights path. Older checkpoints beyond the newest `keep` are removed.
    """
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{position.step:06d}"
    weights_path = directory / f"{name}.safetensors"
    write_weights(weights_path)
    crash_points.reached("checkpoint.after_weights")
    state = {**training_state, "position": vars(position).copy(), "rng": rng_state()}
    with atomic_path(directory / f"{name}.state.pt") as tmp:
        torch.save(state, tmp)
    crash_points.reached("checkpoint.before_pointer")
    atomic_write_text(directory / LAST, name + "\n")
    _prune(directory, keep, current=name)
    return weights_path


def _prune(directory: Path, keep: int, current: str) -> None:
    # Temporary files of writes a crash cut short: nothing else writes here now, so none is in flight.
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    names = sorted({p.name.split(".")[0] for p in directory.glob("step-*.state.pt")})
    for old in names[:-keep] if keep > 0 else []:
        if old == current:
            continue
        for suffix in (".safetensors", ".state.pt"):
            (directory / f"{old}{suffix}").unlink(missing_ok=True)


def last_checkpoint(run_dir: str | Path) -> tuple[Path, Path] | None:
    """(weights, state) of the newest complete checkpoint, or None when the run has none."""
    directory = checkpoint_dir(run_dir)
    pointer = directory / LAST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    weights, state = directory / f"{name}.safetensors", directory / f"{name}.state.pt"
    if not (weights.exists() and state.exists()):
        raise FileNotFoundError(
            f"{pointer} names checkpoint {name!r} but {weights.name} or {state.name} is missing from {directory}"
        )
    return weights, state


def load_checkpoint_weights(model: torch.nn.Module, path: Path) -> None:
    """Put a checkpoint's weights back into the run's model. They are the model's own state dict as the run saved
    it, so they load as they are, with no conversion: the same for a ViT and for the ResNet baseline."""
    tensors, _ = read_safetensors(path)
    try:
        with torch.no_grad():
            model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"cannot resume from {path}: its weights do not fit the run's model ({detail}). Was the "
                            "run's config.yaml changed? Restore it, or start a new run.") from err


def load_training_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message suggests weights_only=False, i.e. running the file's code: not advice to pass on.
        raise ValueError(f"cannot read training state {path}: refused, it asks for Python objects beyond tensors "
                         "and plain data (loading it could run code), which vitkit never writes there. Delete this "
                         "checkpoint to resume from an earlier one, or start a new run.") from err
    except Exception as err:  # a torch zip that is truncated or not ours
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read training state {path}: {detail}. Delete this checkpoint to resume "
                         "from an earlier one, or start a new run.") from err
