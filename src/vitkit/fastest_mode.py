"""What `--precision auto` runs: the fastest mode this machine offers, at inference within the accuracy bound, in
training between bf16-mixed and fp32.

At inference every mode is held to one accuracy bound on the trained Fashion-MNIST model (top-1 agreement with fp32
of at least 99.5%, test top-1 within 0.2 points; `benchmarks/inference_accuracy.py` measures it), so "auto"
chooses on speed among the modes the device runs:

- a GPU: bf16 where it computes bf16 natively, else fp32;
- a CPU with neither bf16 dot products (AVX-512 BF16, AMX) nor int8 kernels (VNNI, AMX, or AVX2 for fbgemm's int8
  linear): fp32, since bf16 would be emulated (about 7x slower than fp32 on an AMD EPYC without AVX-512);
- a CPU with either: the features do not decide, so fp32 and the modes it has are timed. On the AMD EPYC (AVX-512
  BF16 and VNNI) int8 led at batch 16 (S/16: 46.0 against bf16's 34.4 images/s) and bf16 at batch 1 (Ti/16: 64.4
  against 56.8); on an Intel Xeon with AMX bf16 led at both; on an Intel Xeon whose AMX was not available (AVX-512
  BF16 and VNNI only) bf16 ran at half of fp32's speed (S/16 at batch 16: 13.0 against 18.9 images/s, int8 36.6); on
  an AMD EPYC without AVX-512 (AVX2 only) int8, with 7-bit weights there, ran at 1.6x fp32 (S/16 at batch 1: 17.1
  against 10.7 images/s).

In training "auto" means bf16-mixed or fp32 (training keeps fp32 weights), and the same holds: on the AMD EPYC a
bf16-mixed step of the default Fashion-MNIST model ran about 2.5x faster than fp32, on that Intel Xeon 0.72x
(docs/results/speed_2026-12-02_1244). Where the CPU has bf16 dot products, both are timed on a copy of the run's
model (forward and backward, eager), else the features decide.

Each timing runs once on the model itself, at the batch it will run (at most `MAX_TIMED_BATCH`), and the faster
mode is remembered in a cache file keyed by everything the timing depends on: the CPU, torch's version and
threads, vitkit's code (a digest of its source files: a choice timed with other kernels is not reused), the model's
config, the batch, compilation, and inference or training.

The cache is `$VITKIT_CACHE_DIR/fastest_mode.json` (default `~/.cache/vitkit/`). A cache that cannot be read is
measured over; one that cannot be written only costs the timing again next time.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitkit.atomic import atomic_write_text
from vitkit.runtime import (
    autocast,
    cpu_flags,
    cpu_has_int8_kernels,
    cpu_has_native_bf16,
    cpu_model_name,
    resolve_precision,
)

MAX_TIMED_BATCH = 64
"""Larger batches are timed at this size: the order of the modes does not change above it, the timing's cost does."""
TIMED_ROUNDS = 3
"""Interleaved calls per mode after one warm-up call each; the median decides."""
CACHE_FILE = "fastest_mode.json"


@dataclass(frozen=True)
class ModeChoice:
    """The precision "auto" stands for, and why."""

    precision: str
    reason: str
    median_ms: dict[str, float] | None = None
    """Each timed mode's median time per batch (None when the features alone decided)."""


def cache_dir() -> Path:
    """Where vitkit keeps what it measured about this machine: $VITKIT_CACHE_DIR, else ~/.cache/vitkit."""
    configured = os.environ.get("VITKIT_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitkit"


def candidates(device: torch.device) -> tuple[str, ...]:
    """The inference precisions "auto" may choose on `device`, by its features alone."""
    if device.type != "cpu":
        return (resolve_precision("auto", device),)
    fast = tuple(mode for mode, present in (("bf16", cpu_has_native_bf16()), ("int8", cpu_has_int8_kernels()))
                 if present)
    # fp32 stays in the race: bf16 dot products without AMX ran at half of fp32's speed on an Intel Xeon.
    return (*fast, "fp32")


def training_candidates(device: torch.device) -> tuple[str, ...]:
    """The training precisions "auto" may choose on `device`, by its features alone."""
    if device.type == "cpu":
        return ("bf16-mixed", "fp32") if cpu_has_native_bf16() else ("fp32",)
    return (resolve_precision("auto", device, training=True),)


def fastest_training_precision(model: nn.Module, device: torch.device, batch_size: int,
                               cache: Path | None = None) -> ModeChoice:
    """The precision "auto" trains `model` in on `device` at `batch_size` images per forward pass, remembered in
    `cache` (a directory; default `cache_dir()`). A copy of the model is timed, under a forked RNG: the model, its
    gradients and torch's random state are as they were."""

    def build(precision: str, images: Callable[[], torch.Tensor]) -> Callable[[], object]:
        timed = copy.deepcopy(model).train()

        def step() -> None:
            with torch.random.fork_rng(devices=[]):  # PatchDropout's and dropout's draws come from torch's RNG
                with autocast(device, precision):
                    outputs = timed(images())  # (B, K) logits, or (B, D) features of a model without a head
                outputs.float().logsumexp(dim=-1).mean().backward()
            timed.zero_grad(set_to_none=True)

        return step

    return choose_on_model(model, device, batch_size, training_candidates(device), build, purpose={"training": True},
                           cache=cache)


def choose_on_model(model: nn.Module, device: torch.device, batch_size: int, options: tuple[str, ...],
                    build: Callable[[str, Callable[[], torch.Tensor]], Callable[[], object]], compile: bool = False,
                    purpose: dict | None = None, cache: Path | None = None) -> ModeChoice:
    """The fastest of `options` for `model` on `device` at `batch_size` (timed at most at `MAX_TIMED_BATCH`): `choose`
    keyed by the model, the device and the batch, and by `purpose` (what is timed, when it is not the inference
    mode). `build(option, images)` prepares the model for one option; `images()` makes the example batch, only when
    a timing needs it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    config = model.cfg.to_dict() if hasattr(model.cfg, "to_dict") else dataclasses.asdict(model.cfg)
    batch = min(batch_size, MAX_TIMED_BATCH)
    images = functools.cache(lambda: example_batch(config, batch, device))
    key = {**timing_key(config, device, batch, compile), **(purpose or {})}
    return choose(options, lambda option: build(option, images), key, cache)


def timing_key(model_config: dict, device: torch.device, batch: int, compile: bool) -> dict:
    """Everything a timing of the modes depends on; a cached choice is reused only under an equal key."""
    return {"cpu": cpu_model_name(), "features": sorted(cpu_flags() & MATRIX_FLAGS), "device": str(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "vitkit": code_digest(),
            "model": model_config, "batch": batch, "compile": compile}


@functools.cache
def code_digest() -> str:
    """A digest of vitkit's Python source (every .py file of the package, by path and content): the modes' kernels
    and forms change between versions without the version number changing, and a cached choice must follow them."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


MATRIX_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_vnni", "avx_vnni", "avx512f",
                          "avx2"})
"""The CPU features the speed of the modes depends on (part of the cache key)."""


def choose(options: tuple[str, ...], build: Callable[[str], Callable[[], object]], key: dict,
           cache: Path | None = None) -> ModeChoice:
    """The fastest of `options`: the only one, or the cached choice for `key`, or timed now and cached.

    `build(precision)` prepares the model in that mode and returns a call that runs one batch; it is called only when
    the choice is timed."""
    if len(options) == 1:
        return ModeChoice(options[0], "the only candidate this device runs at full width")
    path = (cache_dir() if cache is None else cache) / CACHE_FILE
    entries = _read_cache(path)
    entry_key = json.dumps(key, sort_keys=True)
    cached = entries.get(entry_key)
    if cached and cached.get("precision") in options:
        return ModeChoice(cached["precision"], f"timed before at batch {key['batch']}: {_timings(cached)} ({path})",
                          cached.get("median_ms"))
    runs = {mode: build(mode) for mode in options}
    seconds: dict[str, list[float]] = {mode: [] for mode in options}
    for round_ in range(TIMED_ROUNDS + 1):
        for mode, run in runs.items():  # interleaved, so a slow spell of the machine hits every mode
            start = time.perf_counter()
            run()
            if round_:  # the first call of each holds its one-time costs
                seconds[mode].append(time.perf_counter() - start)
    median_ms = {mode: 1000 * statistics.median(values) for mode, values in seconds.items()}
    fastest = min(median_ms, key=median_ms.get)
    entry = {"precision": fastest, "median_ms": {mode: round(ms, 3) for mode, ms in median_ms.items()},
             "key": key}
    # Read again: the modes' builds may have timed and recorded choices of their own meanwhile (fp32's linears).
    entries = {**_read_cache(path, quiet=True), entry_key: entry}
    try:
        atomic_write_text(path, json.dumps(entries, indent=1) + "\n")
        where = f"remembered in {path}"
    except OSError as err:
        where = f"not remembered: {path} could not be written ({err.strerror or err})"
    return ModeChoice(fastest, f"timed now at batch {key['batch']}: {_timings(entry)}; {where}", entry["median_ms"])


def _timings(entry: dict) -> str:
    return ", ".join(f"{mode} {ms:.2f} ms" for mode, ms in sorted(entry.get("median_ms", {}).items(),
                                                                   key=lambda item: item[1]))


def _read_cache(path: Path, quiet: bool = False) -> dict:
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            raise ValueError(f"a JSON {type(entries).__name__}, not an object")
    except (OSError, ValueError) as err:
        if quiet:  # said once already, by the read before the timing
            return {}
        warnings.warn(f"ignoring the unreadable mode cache {path} ({err}); the modes are timed again and the file "
                      "is rewritten", stacklevel=3)
        return {}
    return entries


def example_batch(model_config: dict, batch: int, device: torch.device) -> torch.Tensor:
    """A (B, C, H, W) batch of the model's input size to time the modes on (the values do not change the time)."""
    height, width = model_config["img_size"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, model_config["in_chans"], height, width, generator=generator)
    return images.to(device)
