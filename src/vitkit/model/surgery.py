"""Model surgery: a ViT changed for another task or input, its weights carried over where they still apply.

Head replacement, another resolution (the position embedding resampled once) and another channel count,
used by fine-tuning, few-shot probing and `vitkit.load_weights` alike.
"""

from __future__ import annotations

import torch

from vitkit.model.pos_embed import resample_position_state
from vitkit.model.resnet_stem import root_conv_key
from vitkit.model.vit import ViT, ViTConfig


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Patch-embedding kernel (D, C, P, P) (or a hybrid's root convolution, (64, C, 7, 7)) for `in_chans` channels.

    The rule keeps the function on grey content: going from 1 to C channels, the kernel is repeated
    and divided by C, so a grey image copied into C channels gives exactly the old embedding; going
    from C to 1, the kernels are summed, so a grey image gives what its C-channel copy gave before.
    Other changes (e.g. 3 -> 4) are refused.

    A hybrid's root convolution is weight-standardised, which undoes any scale of its kernel: 1 -> C gives C times
    the old output, which the GroupNorm after it removes (exact up to its epsilon); C -> 1 changes each output
    channel's scale by the ratio of the standard deviations of the old and the summed kernel, which GroupNorm,
    normalising two channels together, does not undo: an approximation, as it is in timm.
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
    - at another `img_size` the patch size is kept (a longer sequence) and the learned position tables are
      resampled once (see `resample_position_state`), so the new model stores them at the new grid;
    - at another `in_chans` the patch embedding (a hybrid's root convolution) follows `adapt_input_channels`;
    - a hybrid keeps its ResNet; at another `img_size` only the feature map's grid, and so the position
      tables, change;
    - `overrides` set fields that weights do not hold (dropout, attn_dropout, drop_path, patch_dropout).
    """
    allowed = {"dropout", "attn_dropout", "drop_path", "patch_dropout"}
    if set(overrides) - allowed:
        refused = sorted(set(overrides) - allowed)
        raise ValueError(f"only {sorted(allowed)} can be changed when fine-tuning, not {refused}")
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
    weight = model.patch_embed.proj.weight
    new = ViT(cfg).to(device=weight.device, dtype=weight.dtype)

    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    if not keep_pre_logits:
        state = {k: v for k, v in state.items() if not k.startswith("pre_logits.")}
    state = resample_position_state(state, old.pos_embed, cfg.grid_size, old.grid_size, old.num_prefix_tokens,
                                    old.pos_embed_interp)
    first = ("patch_embed.proj.weight" if cfg.stem_layers is None
             else "patch_embed.backbone." + root_conv_key(cfg.stem_layers))  # the convolution that takes the image
    state[first] = adapt_input_channels(state[first], cfg.in_chans)
    missing, unexpected = new.load_state_dict(state, strict=False)
    head_keys = {"head.weight", "head.bias"}
    if set(missing) - head_keys or unexpected:
        raise ValueError(f"weights do not fit the fine-tuning model: missing {sorted(set(missing) - head_keys)}, "
                         f"unexpected {sorted(unexpected)}")
    return new


def freeze_backbone(model: ViT) -> None:
    """Only the head stays trainable: fine-tuning becomes a linear probe of the frozen representation."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))
