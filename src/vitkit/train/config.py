"""Typed options of `vitkit train`. The defaults are the default Fashion-MNIST recipe.

Each field's docstring becomes its `--help` text; configs/*.yaml files are dumps of these.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass
class ModelOptions:
    """Which ViT to build. The dataset sets image size, channels and classes."""

    name: str | None = "Ti/4"
    """Variant '<size>/<patch>' (Ti, S, M, B, L, H), e.g. 'B/16', or a hybrid '<stem>+<size>/<total stride>' (stems
    R, R26, R50: a ResNet feature map as the patches), e.g. 'R50+B/16'; the fields below override its dimensions.
    When fine-tuning (--init.weights) the architecture is the weights': leave these unset (null).
    'resnet18': the convolutional baseline, not a ViT (torchvision's ResNet-18 with a 3x3 stride-2 stem and no
    max-pool, for small images), trained from scratch only. The fields below are the ViT's: leave the dimensions at
    their defaults or null and the rates at 0; PatchDropout has no tokens to drop, so give --model.patch_dropout 0."""
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
    pos_embed: Literal["learned", "none", "learned_2d", "sincos_2d", "relative"] | None = "learned"
    """Position information: learned (one learned vector per token, the paper's), none, learned_2d (learned row and
    column tables of width D/2, concatenated per patch), sincos_2d (fixed sines and cosines, same layout) or
    relative (a learned bias per 2D patch offset and head, in every block's attention)."""
    dropout: float = 0.0
    """Dropout rate after the position embedding, in the MLPs and after the attention projection."""
    attn_dropout: float = 0.0
    """Dropout rate on the attention probabilities."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block."""
    patch_dropout: float = 0.5
    """Fraction of patch tokens left out at random per training image (PatchDropout; timm's patch_drop_rate).
    A step then costs less; evaluation sees every token. `vitkit finetune` sets 0."""

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
            given = {k: dims[k] for k in ("patch_size", "stem_layers", "width", "depth", "heads", "mlp_dim")}
        for key in ("width", "depth", "heads", "mlp_dim", "pool", "pos_embed"):
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
    zero_residual: bool = False
    """Start a random initialisation with every block's residual branches at zero weights (the attention's output
    projection and the MLP's second layer), so each block starts as the identity. Part of `--preset fast`, whose
    trials docs/results/README.md lists. For a ViT trained from scratch only."""


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
    train_size: float | None = None
    """Train on only this many of the training split's images: a count, or a fraction below 1 (None: all). They
    are drawn stratified by class with the run's seed; for one seed a smaller subset lies inside a larger one."""
    image_size: int | None = None
    """Train at this size (None: the dataset's native size). When fine-tuning, the resolution: the patch
    size is kept and the position embedding is resampled once, at load (`vitkit finetune --resolution`)."""
    crop: Literal["pad", "inception", "none"] = "pad"
    """Random crop: 'pad' (pad then crop back), 'inception' (random resized crop), or none."""
    pad: int = 1
    """Padding of the 'pad' crop, in pixels: random shifts of up to this many."""
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

    optimizer: Literal["adamw", "adam", "adam-l2", "sgd", "muon"] = "adamw"
    """adamw; adam, the paper's (Flax's Adam: the weight decay is decoupled from the gradient and scaled by the
    learning rate, the same update as adamw); adam-l2 (the weight decay added to the gradient, torch's Adam); sgd
    (with momentum); muon (Muon's orthogonalised momentum on the encoder blocks' weight matrices, scaled so that
    AdamW's learning rate and weight decay carry over, and AdamW on the other parameters; the fast and quick
    presets' optimiser)."""
    lr: float = 7.5e-4
    """Peak learning rate (for the effective batch size), reached after the warm-up."""
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to biases, norms, position embedding or class token."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's decay rates of the gradient's first and second moments."""
    momentum: float = 0.9
    """SGD momentum."""
    batch_size: int = 128
    """Images per optimiser step (the effective batch)."""
    accumulate: int = 1
    """Split each step into this many micro-batches (for batches that do not fit in memory)."""
    epochs: float = 56.0
    """Training length in epochs (fractions allowed); the schedule spans them all. --optim.time_budget replaces it."""
    time_budget: float | None = None
    """Minutes of wall time the run may take on this machine, set-up and final evaluation included (e.g. 15): the
    run's steps are timed at the start, at each PatchDropout rate and compiled if the run compiles, and the epochs
    that fit replace --optim.epochs; every epoch's end and checkpoint fits the rest again from the time the latest
    steps took. config.yaml records the epochs, so a resumed run keeps that schedule. null: train for
    --optim.epochs."""
    warmup: float = 0.03
    """Linear warm-up: a fraction of all steps if < 1, else a number of steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, to zero at the end."""
    clip_grad: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    label_smoothing: float = 0.1
    """Weight of the uniform distribution mixed into the one-hot targets."""
    loss: Literal["softmax", "sigmoid"] = "softmax"
    """Classification loss: softmax cross-entropy, or sigmoid cross-entropy summed over the classes (the paper's
    loss for its multi-label pretraining sets, JFT-300M and ImageNet-21k)."""
    ema: float = 0.0
    """Decay of an exponential moving average of the weights (e.g. 0.999; 0: off). Evaluated and saved when on."""
    patch_dropout_phases: list[tuple[float, float]] | None = None
    """PatchDropout's rate by phase of the run, as [end, rate] pairs: each rate holds until `end`, a fraction of
    the steps, e.g. [[0.5,0.75],[1.0,0.5]] (the first half at 0.75, the rest at 0.5); the last end is 1. Fewer
    tokens early make those steps cheaper. Replaces --model.patch_dropout's rate while training (null: that rate
    throughout). A compiled step compiles once more for each new rate."""


@dataclass
class RunOptions:
    """Where results go, precision, and reproducibility."""

    out: str = "runs/fashion-mnist"
    """Run directory: config, metrics, TensorBoard logs, plots and checkpoints."""
    seed: int = 0
    """Seeds the initialisation, the data order and every augmentation and random draw."""
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"
    """bf16-mixed: fp32 weights, matmuls autocast to bfloat16; fp32; auto: on a CPU with bf16 dot products
    (AVX-512 BF16 or AMX) the faster of the two, timed once on the model and remembered (not every such CPU runs
    bf16 faster); on a GPU that computes bf16 natively bf16-mixed; else fp32."""
    compile: Literal["auto"] | bool = "auto"
    """torch.compile the training step (a compilation of tens of seconds first); auto: compile runs of at least
    3000 steps."""
    device: str = "auto"
    """'auto' (CUDA if present, else CPU), 'cpu' or 'cuda[:N]'."""
    resume: bool = False
    """Continue the run in `out` from its last checkpoint."""
    overwrite: bool = False
    """Allow starting a new run in a directory that already holds one."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every this many steps (and at each epoch end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    eval_every: int = 1
    """Evaluate on the validation split every this many epochs, and after the last step; 0: after the last step
    only (each evaluation of Fashion-MNIST's 5,000 validation images costs about 2 s on 2 CPU cores)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: stop (keeping the last good checkpoint) or skip the step and count it."""
    log_every: int = 50
    """Write the training loss, accuracy, learning rate and speed every this many steps (averaged over them)."""
    tensorboard: bool = True
    """Mirror the metrics to TensorBoard event files in <out>/tensorboard."""
    progress: bool = True
    """Show a progress bar."""
    max_steps: int | None = None
    """Stop after this many steps (for smoke tests; the schedule still spans all epochs)."""
    int8_calibration_images: int = 1000
    """At the end of a finished run of a ViT classifier, measure int8 inference's activation ranges on this many
    training images (as evaluation shows them) and write them beside the weights (model.int8_calibration.json), where
    eval, predict and serve find them: their int8 then runs faster (`vitkit calibrate`). 0: do not."""


@dataclass
class TrainConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    init: InitOptions = field(default_factory=InitOptions)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    run: RunOptions = field(default_factory=RunOptions)

    @staticmethod
    def command() -> str:
        """The command that runs this config (written at the top of a run's config.yaml)."""
        return "train"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The inverse of to_dict (as read back from a run's config.yaml), type-checked by the same jsonargparse
        machinery as the command line: unknown keys and values of the wrong type are errors."""
        from jsonargparse import ArgumentParser

        sections = list(cls.__dataclass_fields__)
        if not isinstance(d, dict):
            raise ValueError(f"a config is a mapping of sections {sections}, got {repr(d)[:80]}")
        unknown = sorted(map(str, set(d) - set(sections)))
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; expected {sections}")
        run = d.get("run")
        if isinstance(run, dict) and run.get("precision") == "bf16":
            # Runs written before the precision vocabulary was unified called bf16-mixed "bf16".
            d = {**d, "run": {**run, "precision": "bf16-mixed"}}
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, None)
        try:
            built = parser.instantiate(parser.parse_object(copy.deepcopy(d)))
        except Exception as err:  # jsonargparse's message names the key and the type it expected
            raise ValueError(" ".join(str(err).split())[:400] or repr(err)) from err
        return cls(**{name: built[name] for name in sections})


@dataclass
class MPPOptions:
    """Masked patch prediction, the paper's self-supervised objective (appendix B.1.2)."""

    target: Literal["colour", "downsized", "pixels"] = "colour"
    """What each corrupted patch predicts: its mean colour quantised to `bits` per channel (cross-entropy over
    2^(bits x channels) classes), its pixels downsized to `downsize` x `downsize`, or all its pixels (both L2)."""
    bits: int = 3
    """Bits per channel of the colour target (3: 512 classes for RGB, 8 for grey)."""
    rate: float = 0.5
    """Fraction of each image's patch embeddings that are corrupted."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """How the corrupted patches are corrupted: replaced by the learned [mask] embedding, by another patch's
    embedding of the same image, or left as they are."""
    downsize: int = 4
    """Side of the 'downsized' target."""


@dataclass
class PretrainConfig(TrainConfig):
    """`vitkit pretrain`'s options: a training run of masked patch prediction, without labels."""

    mpp: MPPOptions = field(default_factory=MPPOptions)

    @staticmethod
    def command() -> str:
        return "pretrain"


@dataclass
class FinetuneConfig(TrainConfig):
    """`vitkit finetune`'s options: a training run that starts from pretrained weights, or a sweep of them."""

    sweep: float | list[float] | None = None
    """Fine-tune once per learning rate, e.g. [0.001,0.003,0.01,0.03] (the paper's), each in <run.out>/lr-<lr>,
    and keep the run with the best validation top-1."""

    def training(self) -> TrainConfig:
        """The options of one training run (without the sweep)."""
        return TrainConfig(self.model, self.init, self.data, self.optim, self.run)


def finetune_defaults() -> TrainConfig:
    """The defaults of `vitkit finetune`: the paper's fine-tuning recipe.

    SGD with momentum 0.9, no weight decay, the gradient norm clipped at 1, a short linear warm-up and
    cosine decay. No flip: fine-tuning sets (digits, text, ...) are not always mirror-symmetric.
    The architecture comes from the pretrained weights, so the model fields are unset; PatchDropout is off.
    """
    return TrainConfig(
        model=ModelOptions(name=None, width=None, depth=None, heads=None, mlp_dim=None, pool=None, pos_embed=None,
                           patch_dropout=0.0),
        data=DataOptions(dataset="mnist-subset", crop="none", flip=False),
        optim=OptimOptions(optimizer="sgd", lr=0.01, weight_decay=0.0, momentum=0.9, batch_size=64, epochs=10.0,
                           label_smoothing=0.0,
                           warmup=0.05, schedule="cosine", clip_grad=1.0),
        run=RunOptions(out="runs/finetune"),
    )


def pretrain_defaults() -> PretrainConfig:
    """The defaults of `vitkit pretrain`: masked patch prediction as the paper pretrains, scaled to a CPU.

    The paper's: Adam (b1 0.9, b2 0.999) with decoupled weight decay, linear warm-up, cosine decay, gradient
    clipping at 1, batch 4096, 1M steps on JFT-300M at peak lr 2e-4 (appendix B.1.2). Here: the default
    recipe's model without PatchDropout (MPP must see every corrupted patch), batch 128, 20 epochs of
    Fashion-MNIST (about 8,400 steps) at peak lr 1e-3 with 5% warm-up, weight decay 0.05.
    """
    return PretrainConfig(
        model=ModelOptions(patch_dropout=0.0),
        optim=OptimOptions(optimizer="adam", lr=1e-3, weight_decay=0.05, epochs=20.0, warmup=0.05,
                           label_smoothing=0.0, clip_grad=1.0),
        run=RunOptions(out="runs/pretrain"),
    )
