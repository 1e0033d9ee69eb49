"""Fine-tuning as in the paper: a new zero-initialised head, another resolution, another channel count,
and the few-shot linear probe (closed-form regularised least squares on frozen representations).

Everything here goes through the model's public surface (config, state dict, `forward_features`,
`forward_head(pre_logits=True)`), never its internals.
"""

from __future__ import annotations

import torch

from vitkit.model import ViT, ViTConfig, resample_pos_embed


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
) -> ViT:
    """A new ViT for fine-tuning from `model`'s weights (the source is left unchanged).

    - the head is replaced by a zero-initialised linear layer for `num_classes`;
    - the tanh pre-logits layer is dropped (as in the paper) unless `keep_pre_logits`;
    - at another `img_size` the patch size is kept (a longer sequence) and the learned position
      embedding is resampled in 2D once, so the new model stores it at the new grid;
    - at another `in_chans` the patch embedding follows `adapt_input_channels`.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"fine-tuning needs at least 2 classes, got {num_classes!r}")
    old = model.cfg
    fields = old.to_dict()
    if img_size is not None:
        fields["img_size"] = img_size  # ViTConfig checks divisibility by the patch size and names both
    if in_chans is not None:
        fields["in_chans"] = in_chans
    fields["num_classes"] = num_classes
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


@torch.no_grad()
def extract_features(model: ViT, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, C, H, W) normalised images -> (N, num_features) frozen representations (the head's input)."""
    was_training = model.training
    model.eval()
    out = [model.forward_head(model.forward_features(images[i:i + batch_size]), pre_logits=True).float()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     l2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression from features to {-1, 1}^K targets (the paper's few-shot probe).

    Minimises ||[X 1] W - Y||^2 + l2 ||W_x||^2 (the bias is not regularised) and returns
    (weight (D, K), bias (K,)). Predict with argmax(X W + b).
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    x = features.double()
    n, d = x.shape
    targets = -torch.ones(n, num_classes, dtype=torch.float64)
    targets[torch.arange(n), labels.long()] = 1.0
    xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)  # (N, D + 1)
    reg = l2 * torch.eye(d + 1, dtype=torch.float64)
    reg[d, d] = 0.0
    w = torch.linalg.solve(xb.T @ xb + reg, xb.T @ targets)  # (D + 1, K)
    return w[:d], w[d]


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """`shots` random indices of each class, drawn with `seed`."""
    counts = torch.bincount(labels.long())
    if len(counts) < 2:
        raise ValueError("few-shot evaluation needs a dataset with at least 2 classes")
    smallest = int(counts[counts > 0].min())
    if shots < 1 or shots > smallest:
        raise ValueError(f"--shots {shots} must be between 1 and the size of the smallest class ({smallest})")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for k in range(len(counts)):
        members = torch.nonzero(labels == k).flatten()
        if len(members):
            picked.append(members[torch.randperm(len(members), generator=g)[:shots]])
    return torch.cat(picked)
