"""Fine-tuning as in the paper: pretrained weights, a new zero-initialised head, another resolution or
channel count, an optional frozen backbone, and the paper's small learning-rate sweep.

`vitkit finetune` is `vitkit train` starting from pretrained weights with the paper's fine-tuning recipe
(`finetune_defaults`); the training loop builds its model with `model_for_finetune`. Everything here
goes through the model's public surface (config, state dict, parameters), never its internals.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from vitkit.atomic import atomic_write_text
from vitkit.model import ViT, ViTConfig, resample_pos_embed
from vitkit.train.config import InitOptions, ModelOptions, TrainConfig
from vitkit.weights import CONFIG_KEY, WeightsError, infer_config, load_model, load_weights, read_weights

# The paper's fine-tuning learning rates (SGD, momentum 0.9).
PAPER_LR_SWEEP = (0.001, 0.003, 0.01, 0.03)


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Patch-embedding kernel (D, C, P, P) for `in_chans` input channels.

    The rule keeps the function on grey content: going from 1 to C channels, the kernel is repeated
    and divided by C, so a grey image copied into C channels gives exactly the old embedding; going
    from C to 1, the kernels are summed, so a grey image gives what its C-channel copy gave before.
    Other changes (e.g. 3 -> 4) are refused.
    """
    old = weight.shape[1]
    if in_chans == old:
        return weight
    if old == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    raise ValueError(f"cannot adapt a {old}-channel patch embedding to {in_chans} channels: "
                     "only 1 -> C and C -> 1 have a rule that keeps grey images unchanged")


def adapt_for_finetune(
    model: ViT,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    keep_pre_logits: bool = False,
    **overrides,
) -> ViT:
    """A new ViT for fine-tuning from `model`'s weights (the source is left unchanged).

    - the head is replaced by a zero-initialised linear layer for `num_classes`;
    - the tanh pre-logits layer is dropped (as in the paper) unless `keep_pre_logits`;
    - at another `img_size` the patch size is kept (a longer sequence) and the learned position
      embedding is resampled in 2D once, so the new model stores it at the new grid;
    - at another `in_chans` the patch embedding follows `adapt_input_channels`;
    - `overrides` set fields that weights do not hold (dropout, attn_dropout, drop_path, patch_dropout).
    """
    allowed = {"dropout", "attn_dropout", "drop_path", "patch_dropout"}
    if set(overrides) - allowed:
        raise ValueError(f"only {sorted(allowed)} can be changed when fine-tuning, not {sorted(set(overrides) - allowed)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"fine-tuning needs at least 2 classes, got {num_classes!r}")
    old = model.cfg
    fields = old.to_dict()
    if img_size is not None:
        fields["img_size"] = img_size  # ViTConfig checks divisibility by the patch size and names both
    if in_chans is not None:
        fields["in_chans"] = in_chans
    fields["num_classes"] = num_classes
    fields.update(overrides)
    if not keep_pre_logits:
        fields["representation_size"] = None
    cfg = ViTConfig.from_dict(fields)
    new = ViT(cfg).to(device=model.pos_embed.device, dtype=model.pos_embed.dtype)

    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    if not keep_pre_logits:
        state = {k: v for k, v in state.items() if not k.startswith("pre_logits.")}
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], cfg.grid_size, old.grid_size,
                                            old.num_prefix_tokens, old.pos_embed_interp)
    state["patch_embed.proj.weight"] = adapt_input_channels(state["patch_embed.proj.weight"], cfg.in_chans)
    missing, unexpected = new.load_state_dict(state, strict=False)
    head_keys = {"head.weight", "head.bias"}
    if set(missing) - head_keys or unexpected:
        raise ValueError(f"weights do not fit the fine-tuning model: missing {sorted(set(missing) - head_keys)}, "
                         f"unexpected {sorted(unexpected)}")
    return new




def load_pretrained(path: str | Path, heads: int | None = None) -> tuple[ViT, dict]:
    """The model in a weights file of any format vitkit reads, and the preprocessing stored with it.

    vitkit files carry their config; timm, HF and official weights get one inferred from their shapes
    (`heads` is needed when it is not the paper's for that size and the layout does not keep heads apart).
    The preprocessing dict is empty for weights that were not written by `vitkit train`.
    """
    state, metadata = read_weights(path)
    if CONFIG_KEY in metadata:
        model = load_model(path)
    else:
        try:
            cfg = infer_config(state, heads=heads)
        except WeightsError as err:
            raise WeightsError(f"{path}: {err} (on the command line: --model.heads N)") from err
        model = ViT(cfg)
        load_weights(model, state)
    preprocess = json.loads(metadata.get("vitkit_preprocess", "{}"))
    return model, preprocess


def check_architecture(pretrained: ViTConfig, options: ModelOptions, source: str) -> None:
    """Refuse model options that contradict the pretrained weights (fine-tuning keeps their architecture)."""
    given = options.architecture()
    clashes = [f"{key} {value} (the weights have {getattr(pretrained, key)})"
               for key, value in given.items() if getattr(pretrained, key) != value]
    if clashes:
        raise ValueError(
            f"{source} holds a {pretrained.name or 'ViT'} with patch size {pretrained.patch_size}, width "
            f"{pretrained.width}, depth {pretrained.depth}, but the model options ask for {'; '.join(clashes)}. "
            "Fine-tuning keeps the pretrained architecture: drop those --model options or choose matching weights.")


def model_for_finetune(init: InitOptions, options: ModelOptions, num_classes: int, img_size: tuple[int, int],
                       in_chans: int) -> ViT:
    """The model `vitkit finetune` trains: `init.weights` adapted to the dataset (see adapt_for_finetune)."""
    pretrained, _ = load_pretrained(init.weights, heads=options.heads)
    cfg = pretrained.cfg
    check_architecture(cfg, options, init.weights)
    if options.representation_size is not None and not init.keep_pre_logits:
        raise ValueError("--model.representation_size cannot add a pre-logits layer when fine-tuning; "
                         "--init.keep_pre_logits keeps the pretrained one")
    bad = [s for s in img_size if s % cfg.patch_size]
    if bad:
        multiples = sorted({cfg.patch_size * max(1, round(s / cfg.patch_size)) for s in img_size})
        raise ValueError(
            f"resolution {img_size[0]}x{img_size[1]} is not divisible by the pretrained patch size "
            f"{cfg.patch_size} ({init.weights}); fine-tuning keeps the patch size, so use a multiple of "
            f"{cfg.patch_size} with --resolution (e.g. {', '.join(map(str, multiples))})")
    model = adapt_for_finetune(pretrained, num_classes, img_size=img_size, in_chans=in_chans,
                               keep_pre_logits=init.keep_pre_logits, dropout=options.dropout,
                               attn_dropout=options.attn_dropout, drop_path=options.drop_path,
                               patch_dropout=options.patch_dropout)
    if init.freeze:
        freeze_backbone(model)
    return model


def freeze_backbone(model: ViT) -> None:
    """Only the head stays trainable: fine-tuning becomes a linear probe of the frozen representation."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))


@dataclass
class SweepRun:
    lr: float
    run_dir: Path
    val_top1: float
    test_top1: float | None


def finetune_sweep(cfg: TrainConfig, lrs: list[float], train=None) -> tuple[SweepRun, list[SweepRun]]:
    """Fine-tune once per learning rate (in <out>/lr-<lr>) and keep the one with the best validation top-1.

    The chosen run's weights are copied to <out>/model.safetensors and every run's figures go to
    <out>/sweep.json. Returns (chosen run, all runs).
    """
    if train is None:
        from vitkit.train.loop import train
    if not lrs:
        raise ValueError("--sweep needs at least one learning rate")
    bad = [lr for lr in lrs if not lr > 0]
    if bad:
        raise ValueError(f"--sweep learning rates must be positive, got {bad}")
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for lr in lrs:
        sub = copy.deepcopy(cfg)
        sub.optim.lr = lr
        sub.run.out = str(out / f"lr-{lr:g}")
        print(f"sweep: learning rate {lr:g} -> {sub.run.out}")
        result = train(sub)
        if result.val is None:
            raise ValueError("a learning-rate sweep needs a validation split to choose by: set --data.val_size")
        runs.append(SweepRun(lr, result.run_dir, result.val.top1, result.test.top1 if result.test else None))
    best = max(runs, key=lambda r: r.val_top1)  # the first of equals: the smallest tried learning rate
    if (best.run_dir / "model.safetensors").exists():
        shutil.copyfile(best.run_dir / "model.safetensors", out / "model.safetensors")
    summary = {"chosen_lr": best.lr, "chosen_by": "validation top-1",
               "runs": [{"lr": r.lr, "run_dir": str(r.run_dir), "val_top1": r.val_top1, "test_top1": r.test_top1}
                        for r in runs]}
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    for r in runs:
        test = f"{100 * r.test_top1:.2f}%" if r.test_top1 is not None else "-"
        print(f"  lr {r.lr:<8g} val top-1 {100 * r.val_top1:6.2f}%  test top-1 {test}"
              + ("   <- chosen" if r is best else ""))
    return best, runs
