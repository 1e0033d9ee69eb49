"""Typed options of `vitkit train`. The defaults are the default Fashion-MNIST recipe.

Each field's docstring becomes its `--help` text; configs/*.yaml files are dumps of these.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass
class ModelOptions:
    """Which ViT to build. The dataset sets image size, channels and classes."""

    name: str | None = "Ti/4"
    """Variant '<size>/<patch>' (Ti, S, M, B, L, H), e.g. 'B/16'; the fields below override its dimensions.
    When fine-tuning (--init.weights) the architecture is the weights': leave these unset (null)."""
    width: int | None = 128
    """Token width D (None: the variant's)."""
    depth: int | None = 4
    """Number of encoder blocks (None: the variant's)."""
    heads: int | None = 4
    """Attention heads (None: the variant's)."""
    mlp_dim: int | None = 256
    """Hidden width of each block's MLP (None: the variant's)."""
    pool: Literal["cls", "gap"] | None = "cls"
    """Classify the class token ('cls') or the mean patch token ('gap')."""
    representation_size: int | None = None
    """Width of a tanh pre-logits layer (None: none)."""
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    """Stochastic depth rate of the last block."""
    patch_dropout: float = 0.5
    """Fraction of patch tokens left out at random per training image (PatchDropout; timm's patch_drop_rate).
    A step then costs less; evaluation sees every token. 0.5 for the Fashion-MNIST recipe: with 25 of 50 tokens
    the training steps ran about 1.8x faster (median 1,916 against 1,071 images/s), and the epochs that buys
    beat the lost tokens. Test accuracy in about half an hour: 91.79% at 0.0 (32 epochs), 92.37% at 0.25
    (41 epochs), 92.31% at 0.5 (46 epochs, 23.3 min), 92.71/92.74% at 0.5 (56 epochs, 27.2/27.0 min, seeds
    0/1) (docs/results/fashion_mnist_default_*). Set 0 when fine-tuning unless you mean it."""

    def overrides(self) -> dict:
        d = asdict(self)
        d.pop("name")
        return {k: v for k, v in d.items() if v is not None or k == "representation_size"}

    def architecture(self) -> dict:
        """The architecture fields that were given (not None), for checking them against pretrained weights."""
        given = {}
        if self.name is not None:
            from vitkit.model.variants import decode_variant

            dims = decode_variant(self.name)
            given = {k: dims[k] for k in ("patch_size", "width", "depth", "heads", "mlp_dim")}
        for key in ("width", "depth", "heads", "mlp_dim", "pool"):
            if getattr(self, key) is not None:
                given[key] = getattr(self, key)
        return given


@dataclass
class InitOptions:
    """Where the weights start: a random initialisation, or pretrained weights to fine-tune."""

    weights: str | None = None
    """Pretrained weights to fine-tune: a vitkit, timm or HF .safetensors/.bin/.pth file or an official .npz
    (null: a random initialisation). The model keeps the weights' architecture and patch size and gets a new,
    zero-initialised head for the dataset's classes."""
    freeze: bool = False
    """Train only the new head on the frozen pretrained backbone (a linear probe)."""
    keep_pre_logits: bool = False
    """Keep the pretrained tanh pre-logits layer (the paper drops it when fine-tuning)."""


@dataclass
class DataOptions:
    """Dataset, split and augmentation."""

    dataset: str = "fashion-mnist"
    """fashion-mnist, mnist-subset, digits, cifar10, cifar100, image-folder or synthetic."""
    data_dir: str | None = None
    """Where the dataset's files are (default: the dataset's usual places; env VITKIT_DATA_DIR)."""
    download: bool = False
    """Allow downloading the dataset with torchvision when it is not found locally."""
    val_size: float | None = None
    """Validation split taken from train: a count or a fraction (None: the dataset's default)."""
    image_size: int | None = None
    """Train at this size (None: the dataset's native size). When fine-tuning, the resolution: the patch
    size is kept and the position embedding is resampled once, at load (`vitkit finetune --resolution`)."""
    crop: Literal["pad", "inception", "none"] = "pad"
    """Random crop: 'pad' (pad then crop back), 'inception' (random resized crop), or none."""
    pad: int = 1
    """Padding of the 'pad' crop, in pixels: shifts of up to this many. 1 for the Fashion-MNIST recipe, where at
    32 epochs 2 left the model underfitting (test 91.06/90.79% over two seeds) and 0 let it overfit (train 98.4%,
    test 90.09%); 1 gave 91.47/91.03% over two seeds (docs/results/fashion_mnist_default_2026-11-24_*)."""
    flip: bool = True
    """Random horizontal flip."""
    randaugment: int = 0
    """RandAugment magnitude (0: off)."""
    random_erasing: float = 0.0
    """Probability of random erasing (0: off)."""
    mixup: float = 0.0
    """Mixup alpha (0: off)."""
    cutmix: float = 0.0
    """CutMix alpha (0: off)."""
    on_bad_image: Literal["error", "skip"] = "error"
    """On an unreadable image: stop naming the file, or skip it and list it in the run directory."""
    num_workers: int = 0
    """Data-loading worker processes (0: load in the training process)."""


@dataclass
class OptimOptions:
    """Optimiser, schedule and regularisation."""

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 7.5e-4
    """Peak learning rate (for the effective batch size). 7.5e-4 for the Fashion-MNIST recipe: over 32 epochs
    1.5e-3 gave 91.47/91.03% test (val 91.6/91.7), 7.5e-4 91.79% (val 91.78), 5e-4 91.31% (val 91.92):
    differences of the size of the seed-to-seed spread (docs/results/fashion_mnist_default_*)."""
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to biases, norms, position embedding or class token."""
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    """SGD momentum."""
    batch_size: int = 128
    """Images per optimiser step (the effective batch)."""
    accumulate: int = 1
    """Split each step into this many micro-batches (for batches that do not fit in memory)."""
    epochs: float = 56.0
    """Training length in epochs (fractions allowed). 56 for the Fashion-MNIST recipe: what fits in 30 minutes on
    2 CPU cores with patch_dropout 0.5."""
    warmup: float = 0.03
    """Linear warm-up: a fraction of all steps if < 1, else a number of steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, to zero at the end."""
    clip_grad: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    label_smoothing: float = 0.1
    ema: float = 0.0
    """Decay of an exponential moving average of the weights (e.g. 0.999; 0: off). Evaluated and saved when on."""


@dataclass
class RunOptions:
    """Where results go, precision, and reproducibility."""

    out: str = "runs/fashion-mnist"
    """Run directory: config, metrics, TensorBoard logs, plots and checkpoints."""
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16: autocast matmuls to bfloat16 (1.5-1.9x faster steps on CPUs with AVX-512 BF16 or AMX, and on
    GPUs); 'auto': bf16 where the CPU or GPU computes bf16 natively, else fp32."""
    compile: Literal["auto"] | bool = "auto"
    """torch.compile the model (about 45 s to compile on a CPU, then about 1.2x faster steps); 'auto':
    compile runs of at least 3000 steps, where that pays back."""
    device: str = "auto"
    """'auto' (CUDA if present, else CPU), 'cpu' or 'cuda[:N]'."""
    resume: bool = False
    """Continue the run in `out` from its last checkpoint."""
    overwrite: bool = False
    """Allow starting a new run in a directory that already holds one."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every this many steps (and at each epoch end)."""
    keep_checkpoints: int = 2
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: stop (keeping the last good checkpoint) or skip the step and count it."""
    log_every: int = 50
    """Write the training loss, accuracy, learning rate and speed every this many steps (averaged over them)."""
    tensorboard: bool = True
    progress: bool = True
    """Show a progress bar."""
    max_steps: int | None = None
    """Stop after this many steps (for smoke tests; the schedule still spans all epochs)."""


@dataclass
class TrainConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    init: InitOptions = field(default_factory=InitOptions)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The inverse of to_dict (as read back from a run's config.yaml); unknown keys are errors."""
        groups = {"model": ModelOptions, "init": InitOptions, "data": DataOptions, "optim": OptimOptions,
                  "run": RunOptions}
        if not isinstance(d, dict):
            raise ValueError(f"a config is a mapping of sections {sorted(groups)}, got {repr(d)[:80]}")
        unknown = sorted(map(str, set(d) - set(groups)))
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; expected {sorted(groups)}")
        built = {}
        for key, kind in groups.items():
            values = d.get(key) or {}
            if not isinstance(values, dict):
                raise ValueError(f"config section {key!r} must be a mapping of options, got {values!r}")
            values = dict(values)
            bad = sorted(set(map(str, values)) - set(kind.__dataclass_fields__))
            if bad:
                raise ValueError(f"unknown {key} option(s) {bad}")
            if isinstance(values.get("betas"), list):
                values["betas"] = tuple(values["betas"])
            hints = typing.get_type_hints(kind)
            for name, value in values.items():
                if not _fits(value, hints[name]):
                    raise ValueError(f"{key}.{name} = {value!r} does not fit its type {_describe(hints[name])}")
            built[key] = kind(**values)
        return cls(**built)


def _fits(value, hint) -> bool:
    """Whether a value read from YAML fits a field's type (ints are accepted where floats are)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_fits, value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"no check for type {hint}")


def _describe(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def finetune_defaults() -> TrainConfig:
    """The defaults of `vitkit finetune`: the paper's fine-tuning recipe.

    SGD with momentum 0.9, no weight decay, the gradient norm clipped at 1, a short linear warm-up and
    cosine decay. No flip: fine-tuning sets (digits, text, ...) are not always mirror-symmetric.
    The architecture comes from the pretrained weights, so the model fields are unset; PatchDropout is off.
    """
    return TrainConfig(
        model=ModelOptions(name=None, width=None, depth=None, heads=None, mlp_dim=None, pool=None,
                           patch_dropout=0.0),
        data=DataOptions(dataset="mnist-subset", crop="none", flip=False),
        optim=OptimOptions(optimizer="sgd", lr=0.01, weight_decay=0.0, momentum=0.9, batch_size=64, epochs=10.0,
                           label_smoothing=0.0,
                           warmup=0.05, schedule="cosine", clip_grad=1.0),
        run=RunOptions(out="runs/finetune"),
    )
