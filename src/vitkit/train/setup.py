"""The model a training run starts from: a random initialisation, or pretrained weights adapted to the data."""

from __future__ import annotations

from torch import nn

from vitkit.model import ViT, ViTConfig, adapt_for_finetune, check_image_size, create_model, freeze_backbone
from vitkit.model.resnet import ARCHITECTURE as RESNET
from vitkit.model.resnet import ResNetBaseline, ResNetConfig
from vitkit.train.config import InitOptions, ModelOptions, TrainConfig
from vitkit.weights import load_pretrained

VIT_DIMENSIONS = ("width", "depth", "heads", "mlp_dim", "pool", "pos_embed")
VIT_RATES = ("dropout", "attn_dropout", "drop_path", "patch_dropout")


def build_model(cfg: TrainConfig, num_classes: int, image_size: tuple[int, int], in_chans: int) -> nn.Module:
    """A new model for the run: the pretrained weights adapted for fine-tuning, or a random initialisation (of a
    ViT, or of the ResNet-18 baseline for --model.name resnet18)."""
    if cfg.init.freeze and not cfg.init.weights:
        raise ValueError("--init.freeze needs pretrained weights (--init.weights): a random backbone is not "
                         "worth freezing")
    if cfg.init.zero_residual and (cfg.init.weights or cfg.model.name == RESNET):
        why = (f"--init.weights {cfg.init.weights} starts from trained branches" if cfg.init.weights
               else f"--model.name {RESNET} is the ResNet-18 baseline, not a ViT")
        raise ValueError(f"--init.zero_residual zeroes a new ViT's residual branches for training from scratch, but "
                         f"{why}: set --init.zero_residual false")
    if cfg.model.name == RESNET:
        return resnet_baseline(cfg, num_classes, image_size, in_chans)
    if cfg.init.weights:
        return model_for_finetune(cfg.init, cfg.model, num_classes, image_size, in_chans)
    if cfg.model.name is None:
        raise ValueError("--model.name is needed to train from scratch (e.g. 'Ti/4'); it may be left unset only "
                         "when fine-tuning from --init.weights")
    model = create_model(cfg.model.name, img_size=image_size, in_chans=in_chans, num_classes=num_classes,
                         **cfg.model.overrides())
    if cfg.init.zero_residual:
        model.zero_residual_branches()
    return model


def resnet_baseline(cfg: TrainConfig, num_classes: int, image_size: tuple[int, int], in_chans: int) -> nn.Module:
    """The ResNet-18 baseline, randomly initialised; the ViT's options it cannot honour are refused.

    The ViT's dimensions at their defaults (or null) are not a choice about this model and are left aside; a value
    that differs from the default, a pre-logits layer or any non-zero rate (dropout, stochastic depth, PatchDropout:
    the ResNet has none of them) is refused: an option someone chose for the run is never silently dropped.
    """
    if cfg.init.weights:
        raise ValueError(f"--init.weights {cfg.init.weights}: fine-tuning starts from pretrained ViT weights, but "
                         f"--model.name {RESNET} is the ResNet-18 baseline, which trains from a random initialisation "
                         "only; drop --init.weights, or fine-tune a ViT (leave --model.name unset)")
    defaults, options = ModelOptions(), cfg.model
    refused = [f"--model.{key} {getattr(options, key)}" for key in VIT_DIMENSIONS
               if getattr(options, key) not in (None, getattr(defaults, key))]
    if options.representation_size is not None:
        refused.append(f"--model.representation_size {options.representation_size}")
    refused += [f"--model.{key} {getattr(options, key)}" for key in VIT_RATES if getattr(options, key) > 0]
    if refused:
        raise ValueError(f"--model.name {RESNET} is the ResNet-18 baseline, a fixed architecture without tokens, "
                         f"dropout or stochastic depth, but the run asks for {', '.join(refused)}: leave the ViT's "
                         f"dimensions at their defaults (or null), and set those rates to 0 (the default recipe's "
                         f"PatchDropout too: --model.patch_dropout 0)")
    return ResNetBaseline(ResNetConfig(img_size=image_size, in_chans=in_chans, num_classes=num_classes))


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
    # Fine-tuning keeps the pretrained patch size, so the resolution must be a multiple of it.
    check_image_size(img_size, cfg.patch_size, what="--resolution", stem_stride=cfg.stem_stride)
    model = adapt_for_finetune(pretrained, num_classes, img_size=img_size, in_chans=in_chans,
                               keep_pre_logits=init.keep_pre_logits, dropout=options.dropout,
                               attn_dropout=options.attn_dropout, drop_path=options.drop_path,
                               patch_dropout=options.patch_dropout)
    if init.freeze:
        freeze_backbone(model)
    return model
