"""The Vision Transformer of Dosovitskiy et al. (2020), "An Image is Worth 16x16 Words".

One file, read top to bottom: the config, then PatchEmbed -> Attention -> Mlp -> Block -> ViT.
Shapes: B batch, C channels, H x W image, P patch, (gh, gw) patch grid, N = gh * gw patches,
T = N + prefix tokens (1 with a class token), D width, h heads, hd = D / h head width.

The hybrid of section 3.1 (`stem_layers` set) differs only in its patch embedding, HybridEmbed: a ResNet
(model/resnet_stem.py) turns the image into a feature map of stride s, and the patches are cut from that map
(P = 1 in the paper), so a token spans s * P pixels a side. Everything after the patch embedding is the same.

Parameter names follow timm's VisionTransformer, so timm state dicts load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.model.pos_embed import (
    INTERPOLATION_MODES,
    POS_EMBEDS,
    concat_2d,
    relative_index,
    relative_table_size,
    resample_1d,
    resample_pos_embed,
    resample_relative_table,
    sincos_2d_table,
)
from vitkit.model.resnet_stem import (
    Bottleneck,
    ResNet,
    StdConv2d,
    build_stem,
    check_layers,
    stem_channels,
    stem_stride,
)

POOLS = ("cls", "gap")


def check_image_size(size: tuple[int, int], patch_size: int, what: str = "image size", stem_stride: int = 1) -> None:
    """Refuse an (H, W) that the patch size (times a hybrid's ResNet stride) does not divide, suggesting the nearest
    multiples."""
    h, w = size
    stride = patch_size * stem_stride
    if h % stride or w % stride:
        nearest = ", ".join(map(str, sorted({stride * max(1, round(side / stride)) for side in (h, w)})))
        if stem_stride == 1:
            raise ValueError(f"{what} {h}x{w} is not divisible by the patch size {patch_size}: use a multiple of "
                             f"{patch_size} (e.g. {nearest})")
        raise ValueError(f"{what} {h}x{w} is not divisible by the total stride {stride} of the hybrid (ResNet stride "
                         f"{stem_stride} x patch size {patch_size}): use a multiple of {stride} (e.g. {nearest})")


@dataclass
class ViTConfig:
    """Everything needed to rebuild a ViT; stored next to saved weights."""

    img_size: tuple[int, int] = (224, 224)
    """Training image size (H, W); sets the grid of the learned position embedding."""
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    """Classes of the head; 0 means no head (forward returns the pooled representation)."""
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pool: str = "cls"
    """"cls": classify the class token. "gap": average the patch tokens (no class token, as in the paper)."""
    representation_size: int | None = None
    """Width of the tanh "pre-logits" layer used in ImageNet-21k pretraining; None for none."""
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    """Stochastic depth rate of the last block; earlier blocks get linearly less."""
    patch_dropout: float = 0.0
    """Fraction of patch tokens left out, at random per image, while training (PatchDropout, Liu et al. 2022;
    timm's patch_drop_rate): the encoder sees fewer tokens, so a step costs less. Prefix tokens always stay."""
    pos_embed: str = "learned"
    """Position information (appendix D.4): learned (one learned vector per token, the paper's default), none,
    learned_2d (learned row and column tables of width D/2, concatenated per patch), sincos_2d (fixed sines and
    cosines in the same layout) or relative (a learned bias per 2D patch offset and head in every block's
    attention). Only `learned` gives the class token a position embedding (the token itself is learned)."""
    pos_embed_interp: str = "bicubic"
    """How learned position tables are resampled for inputs of another size: bicubic or bilinear."""
    stem_layers: tuple[int, ...] | None = None
    """The hybrid's ResNet (section 3.1), as units per stage: None for none (patches cut from the image), () for the
    root block alone (stride 4), (3, 4, 9) for the paper's R50 of three stages (stride 16), up to four stages
    (stride 32). The patches of `patch_size` are then cut from its feature map; see model/resnet_stem.py."""
    name: str = field(default="", compare=False)
    """The variant name this config came from, e.g. "B/16" (informative only)."""

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = tuple(int(s) for s in self.img_size)
        checks = {
            "patch_size": self.patch_size, "in_chans": self.in_chans, "width": self.width,
            "depth": self.depth, "heads": self.heads, "mlp_dim": self.mlp_dim,
        }
        for key, value in checks.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no head), got {self.num_classes!r}")
        if len(self.img_size) != 2 or min(self.img_size) < 1:
            raise ValueError(f"img_size must be a positive int or (H, W), got {self.img_size!r}")
        if self.stem_layers is not None:
            self.stem_layers = check_layers(self.stem_layers)
        check_image_size(self.img_size, self.patch_size, stem_stride=self.stem_stride)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.pos_embed == "learned_2d" and self.width % 2:
            raise ValueError(f"pos_embed 'learned_2d' splits the width into a row half and a column half: width "
                             f"{self.width} is odd; use an even width")
        if self.pos_embed == "sincos_2d" and self.width % 4:
            raise ValueError(f"pos_embed 'sincos_2d' needs a sine and a cosine per axis: width {self.width} is not "
                             "divisible by 4")
        if self.pos_embed_interp not in INTERPOLATION_MODES:
            raise ValueError(f"pos_embed_interp must be one of {INTERPOLATION_MODES}, got {self.pos_embed_interp!r}")
        for key in ("dropout", "attn_dropout", "drop_path", "patch_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value!r}")
        if self.representation_size is not None and self.representation_size < 1:
            raise ValueError(f"representation_size must be positive or None, got {self.representation_size!r}")

    @property
    def stem_stride(self) -> int:
        """Pixels per feature-map position of the hybrid's ResNet along each side; 1 without one."""
        return 1 if self.stem_layers is None else stem_stride(self.stem_layers)

    @property
    def total_stride(self) -> int:
        """Pixels per token along each side: the patch size, times the ResNet's stride in a hybrid."""
        return self.stem_stride * self.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_size[0] // self.total_stride, self.img_size[1] // self.total_stride

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool == "cls" else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ViT config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def _check_images(x: torch.Tensor, in_chans: int) -> tuple[int, int]:
    """The (H, W) of a (B, C, H, W) image batch with the model's C channels, or a ValueError."""
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
    _, c, h, w = x.shape
    if c != in_chans:
        raise ValueError(
            f"the model takes {in_chans}-channel images but got {c} channels (input shape "
            f"{tuple(x.shape)}); convert the images or build the model with in_chans={c}"
        )
    return h, w


class PatchEmbed(nn.Module):
    """Cut the image into PxP patches and project each to width D (a PxP conv with stride P)."""

    def __init__(self, patch_size: int, in_chans: int, width: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_image_size(_check_images(x, self.in_chans), self.patch_size)
        x = self.proj(x)  # (B, D, gh, gw)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D)


class HybridEmbed(nn.Module):
    """The hybrid's patch embedding (section 3.1): a ResNet turns the image into a feature map of stride s and C'
    channels; PxP patches of that map (P = 1 in the paper) are projected to width D. timm's names: the ResNet is
    `backbone`, the projection `proj`."""

    def __init__(self, stem_layers: tuple[int, ...], patch_size: int, in_chans: int, width: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.stem_stride = stem_stride(stem_layers)
        self.backbone = build_stem(stem_layers, in_chans)
        self.proj = nn.Conv2d(stem_channels(stem_layers), width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_image_size(_check_images(x, self.in_chans), self.patch_size, stem_stride=self.stem_stride)
        x = self.backbone(x)  # (B, C', H/s, W/s)
        x = self.proj(x)  # (B, D, gh, gw), gh = H / (s P)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D)


# The most attention probabilities (B x h x T x T values) a bf16 training step on a CPU keeps per layer for
# backward instead of recomputing them: 16 Mi values, 32 MiB in bf16 (batch 128 of 4 heads keeps them up to 180
# tokens). ViT-S/16 at 224 (197 tokens, 6 heads) keeps them up to batch 72.
KEPT_PROBABILITIES_MAX = 16 * 2**20


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, and optionally a learned bias per relative patch
    offset and head (pos_embed "relative": `relative_grid` is the trained grid of its table)."""

    def __init__(self, width: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0,
                 relative_grid: tuple[int, int] | None = None, interp: str = "bicubic"):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(dropout)
        self.relative_grid, self.interp = relative_grid, interp
        self.relative_position_bias_table = (
            nn.Parameter(torch.zeros(relative_table_size(relative_grid), heads))  # ((2gh - 1)(2gw - 1), h)
            if relative_grid is not None else None)

    def position_bias(self, grid: tuple[int, int], kept: torch.Tensor | None, prefix: int) -> torch.Tensor | None:
        """(1 or B, h, T, T) attention-logit bias of the relative positions at `grid`, or None without a table.

        `kept` (B, K): the patches PatchDropout kept (their grid indices), or None for all. Prefix tokens get a
        zero bias to and from every token.
        """
        if self.relative_position_bias_table is None:
            return None
        table = resample_relative_table(self.relative_position_bias_table, grid, self.relative_grid, self.interp)
        bias = table[relative_index(grid, table.device)].permute(2, 0, 1)  # (N, N, h) -> (h, N, N)
        if kept is None:
            bias = bias.unsqueeze(0)  # (1, h, N, N)
        else:
            bias = bias[:, kept[:, :, None], kept[:, None, :]].transpose(0, 1)  # (h, B, K, K) -> (B, h, K, K)
        return F.pad(bias, (prefix, 0, prefix, 0))  # (., h, T, T)

    def forward(self, x: torch.Tensor, need_weights: bool = False,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) tokens -> (B, T, D), and the (B, h, T, T) attention weights if `need_weights`. `bias`
        (1 or B, h, T, T) is added to the attention logits."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, T, hd)
        q, k, v = qkv.unbind(0)  # each (B, h, T, hd)
        bias = bias.to(q.dtype) if bias is not None else None
        dropout_p = self.attn_dropout if self.training else 0.0
        # The fused kernel, except when the caller wants the weights, or on a CPU when a backward pass follows:
        # there PyTorch's flash-attention backward is slower than three plain matmuls, in bf16 far slower (about
        # 5x at 50 tokens, torch 2.14), which made bf16 training slower than fp32. Where the (B, h, T, T)
        # probabilities are small, autograd keeps them: forward and backward of one layer took 4.2 against
        # 4.9 ms in bf16 at batch 128 and 17 tokens, 5.9 against 7.2 ms at 26; in fp32 4.7 against 6.7 ms at
        # batch 256 and 13 tokens, 9.7 against 10.3 at 26 (the fast preset's compiled step: 1.08x and 1.05x;
        # torch 2.14, 2 cores, AMD EPYC with AVX2). Where they are large, bf16 recomputes them in backward, as the
        # fused kernel does, so training memory stays at its level (except with attention dropout, whose mask
        # the recomputation would have to keep); fp32 keeps the fused kernel there.
        # Without a backward the fused forward is the faster: S/16's attention in bf16 at 197 tokens took 0.25
        # against 0.34 ms per layer at batch 1 and 3.0 against 3.5 ms at batch 16 (Intel Xeon with AMX).
        # q was made in this call, so it requires grad exactly when autograd records it: a backward may follow
        # (not when exporting, which traces with the parameters' requires_grad but exports inference).
        exporting = torch.compiler.is_exporting()
        cpu_training = q.device.type == "cpu" and q.requires_grad and not exporting
        cpu_bf16_training = cpu_training and q.dtype == torch.bfloat16
        small = q.shape[0] * q.shape[1] * t * t <= KEPT_PROBABILITIES_MAX
        # Exported with a dynamic size, the fused kernel with a bias decomposes into a graph whose output layout
        # the exporter gets wrong (torch 2.14): the explicit matmuls export correctly.
        biased_export = bias is not None and exporting
        if need_weights or (cpu_training and small) or (cpu_bf16_training and dropout_p > 0) or biased_export:
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, h, T, T)
            attn = (attn if bias is None else attn + bias).softmax(dim=-1)
            out = F.dropout(attn, dropout_p, self.training) @ v  # (B, h, T, hd)
            attn = attn if need_weights else None
        elif cpu_bf16_training:
            attn = None
            out = _RecomputedAttention.apply(q, k, v, self.head_dim**-0.5, bias)  # (B, h, T, hd)
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)  # (B, h, T, hd)
        out = out.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.proj_drop(self.proj(out)), attn


class _RecomputedAttention(torch.autograd.Function):
    """softmax(scale * q k^T + bias) v as plain matmuls, keeping only q, k, v (and the bias) for the backward pass.

    Autograd through the explicit matmuls would keep the (B, h, T, T) probabilities and the scaled q of
    every layer until backward; recomputing them there (one extra matmul and softmax per layer) holds
    training memory at the level of a fused attention kernel. Same arithmetic as the explicit path.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale = scale
        probs = _biased((q * scale) @ k.transpose(-2, -1), bias).softmax(dim=-1)  # (B, h, T, T)
        return probs @ v  # (B, h, T, hd)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, bias = ctx.saved_tensors
        q_scaled = q * ctx.scale
        probs = _biased(q_scaled @ k.transpose(-2, -1), bias).softmax(dim=-1)  # (B, h, T, T), as in forward
        grad_v = probs.transpose(-2, -1) @ grad_out  # (B, h, T, hd)
        # softmax's own backward kernel: it accumulates in fp32 without fp32 copies of (B, h, T, T) tensors
        grad_scores = torch.ops.aten._softmax_backward_data(grad_out @ v.transpose(-2, -1), probs, -1, probs.dtype)
        del probs  # of the (B, h, T, T) tensors only grad_scores stays alive for the last two matmuls
        grad_q = (grad_scores @ k) * ctx.scale  # (B, h, T, hd)
        grad_k = grad_scores.transpose(-2, -1) @ q_scaled  # (B, h, T, hd)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[4]:
            grad_bias = grad_scores.sum(0, keepdim=True) if bias.shape[0] == 1 else grad_scores  # bias's shape
        return grad_q, grad_k, grad_v, None, grad_bias


def _biased(scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return scores if bias is None else scores + bias


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability `rate`."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        relative_grid = cfg.grid_size if cfg.pos_embed == "relative" else None
        self.attn = Attention(cfg.width, cfg.heads, cfg.attn_dropout, cfg.dropout, relative_grid,
                              cfg.pos_embed_interp)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, need_weights: bool = False,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, attn = self.attn(self.norm1(x), need_weights, bias)
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn  # (B, T, D), (B, h, T, T) or None


class Intermediates(NamedTuple):
    """What `ViT.forward_intermediates` returns."""

    tokens: torch.Tensor
    """(B, T, D) tokens after the final norm, as from forward_features."""
    hidden: list[torch.Tensor]
    """(B, T, D) output of each requested block, before the final norm."""
    attention: list[torch.Tensor]
    """(B, h, T, T) attention weights of each requested block (empty unless asked for)."""


class ViT(nn.Module):
    """Vision Transformer. Build it with `vitkit.create_model("B/16", ...)` or `ViT(ViTConfig(...))`.

    Public surface used by training, fine-tuning, pretraining, inspection and export:
    `embed_patches` -> `encode` is `forward_features`; `forward_head` turns tokens into logits;
    `forward_intermediates` returns block outputs and attention weights; `reset_classifier`
    puts a zero-initialised head for a new number of classes; `zero_residual_branches` starts every block as the
    identity (a training option).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = (PatchEmbed(cfg.patch_size, cfg.in_chans, d) if cfg.stem_layers is None
                            else HybridEmbed(cfg.stem_layers, cfg.patch_size, cfg.in_chans, d))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.num_prefix_tokens else None
        gh, gw = cfg.grid_size
        num_tokens = cfg.num_prefix_tokens + gh * gw
        learned = cfg.pos_embed == "learned"
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, d)) if learned else None  # (1, T, D)
        if cfg.pos_embed == "learned_2d":
            self.pos_embed_row = nn.Parameter(torch.zeros(1, gh, d // 2))  # (1, gh, D/2)
            self.pos_embed_col = nn.Parameter(torch.zeros(1, gw, d // 2))  # (1, gw, D/2)
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.pre_logits = _PreLogits(d, cfg.representation_size) if cfg.representation_size else nn.Identity()
        self.head = self._new_head(cfg.num_classes)
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def num_features(self) -> int:
        """Width of the representation that the head sees."""
        return self.cfg.representation_size or self.cfg.width

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (Flax ViT): position embedding normal(0.02), class token zero, LeCun-normal
        patch projection, xavier-uniform linear layers with biases normal(1e-6), zero head. A hybrid's ResNet as in
        vit_jax/models_resnet.py: LeCun-normal convolutions, GroupNorm scale 1 and bias 0, except a zero scale on
        each unit's last GroupNorm (so every unit starts as its shortcut)."""
        for name, param in self.named_parameters():
            if name.startswith("pos_embed") or name.endswith("relative_position_bias_table"):
                nn.init.normal_(param, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        # The patch projection is LeCun-normal, as Flax's default conv init.
        _lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.patch_embed, HybridEmbed):
            for module in self.patch_embed.backbone.modules():
                if isinstance(module, StdConv2d):
                    _lecun_normal_(module.weight)
                elif isinstance(module, nn.GroupNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
            for module in self.patch_embed.backbone.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.norm3.weight)
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear) or name == "head":
                continue
            if name.endswith("attn.qkv"):
                # Three D x D matrices in one: the xavier bound of each, not of the fused (3D x D).
                d = module.weight.shape[1]
                bound = math.sqrt(6.0 / (d + d))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(module.weight)
            nn.init.normal_(module.bias, std=1e-6)
        if isinstance(self.pre_logits, _PreLogits):
            # Flax's Dense default for the pre-logits layer: LeCun normal, zero bias.
            _lecun_normal_(self.pre_logits.fc.weight)
            nn.init.zeros_(self.pre_logits.fc.bias)

    @torch.no_grad()
    def zero_residual_branches(self) -> None:
        """Zero the last weights of both residual branches in every block (the attention's output projection and
        the MLP's second layer; their tiny biases are kept), on top of `init_weights`: each block then starts as the
        identity plus a constant, as a ResNet whose last norm of each unit starts at zero, and learns its branches
        from there (their gradients are not zero, since the inputs of those layers are not)."""
        for block in self.blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a zero-initialised one for `num_classes` classes (0 = no head)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        weight = self.patch_embed.proj.weight
        self.head = self._new_head(num_classes).to(device=weight.device, dtype=weight.dtype)
        self.cfg.num_classes = num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations (and a hybrid's ResNet stages) in backward to save memory (same results, more
        compute)."""
        self.grad_checkpointing = enable
        backbone = getattr(self.patch_embed, "backbone", None)
        if isinstance(backbone, ResNet):
            backbone.grad_checkpointing = enable

    # ---- features ----

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) images -> (B, N, D) patch embeddings and the (gh, gw) grid.

        Masked patch prediction corrupts these before `encode`.
        """
        return self.patch_embed(x)

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """(1, T, D) position embedding added to the tokens at a patch grid (learned tables resampled if it is not
        the trained one), or None for the kinds that add none ("none", "relative")."""
        cfg = self.cfg
        if cfg.pos_embed == "learned":
            return resample_pos_embed(self.pos_embed, grid, cfg.grid_size, cfg.num_prefix_tokens, cfg.pos_embed_interp)
        if cfg.pos_embed == "learned_2d":
            rows = resample_1d(self.pos_embed_row, grid[0], cfg.pos_embed_interp)[0]  # (gh, D/2)
            cols = resample_1d(self.pos_embed_col, grid[1], cfg.pos_embed_interp)[0]  # (gw, D/2)
            table = concat_2d(rows, cols)  # (1, N, D)
        elif cfg.pos_embed == "sincos_2d":
            weight = self.patch_embed.proj.weight
            table = sincos_2d_table(grid, cfg.width, weight.device).to(weight.dtype)  # (1, N, D)
        else:
            return None
        return F.pad(table, (0, 0, cfg.num_prefix_tokens, 0))  # (1, T, D): the class token gets none

    def _tokens(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b = patches.shape[0]
        if self.cls_token is not None:
            patches = torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1)  # (B, T, D)
        pos = self.pos_embed_for(grid)
        return self.pos_drop(patches if pos is None else patches + pos)

    def _drop_patches(self, tokens: torch.Tensor, patch_noise: torch.Tensor | None,
                      rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> (B, P + K, D): the P prefix tokens and the K = (1 - rate) N patch tokens of lowest noise,
        (B, N) uniform draws from torch's global RNG unless `patch_noise` gives them; and the (B, K) grid indices
        of the patches kept."""
        prefix = self.cfg.num_prefix_tokens
        patches = tokens[:, prefix:]  # (B, N, D)
        b, n, d = patches.shape
        keep = max(1, int(n * (1.0 - rate)))
        if patch_noise is None:
            patch_noise = torch.rand(b, n, device=tokens.device)
        elif tuple(patch_noise.shape) != (b, n):
            raise ValueError(f"patch_noise must hold one score per patch token, shape {(b, n)}, got "
                             f"{tuple(patch_noise.shape)}")
        chosen = patch_noise.argsort(dim=1)[:, :keep]  # (B, K), without replacement
        kept = patches.gather(1, chosen.unsqueeze(-1).expand(-1, -1, d))  # (B, K, D), position embedding included
        return torch.cat([tokens[:, :prefix], kept], dim=1), chosen

    def encode(self, patches: torch.Tensor, grid: tuple[int, int], patch_noise: torch.Tensor | None = None,
               patch_dropout: float | None = None) -> torch.Tensor:
        """(B, N, D) patch embeddings -> (B, T, D) tokens after the encoder and final norm.

        While training with PatchDropout, T counts only the prefix and the patch tokens kept: those
        with the lowest `patch_noise` (B, N), random scores the caller may draw itself (a trainer does,
        to make the choice independent of how a batch is split), else drawn here. Unused otherwise.
        `patch_dropout` replaces the config's rate for this call (a trainer's schedule of rates does).
        """
        rate = self.cfg.patch_dropout if patch_dropout is None else patch_dropout
        x, kept = self._tokens(patches, grid), None
        if self.training and rate > 0:
            x, kept = self._drop_patches(x, patch_noise, rate)  # (B, P + K, D), (B, K)
        return self._run_blocks(x, grid, kept).tokens

    def _run_blocks(self, x: torch.Tensor, grid: tuple[int, int], kept: torch.Tensor | None = None,
                    keep: frozenset[int] = frozenset(), attention: bool = False) -> Intermediates:
        """(B, T, D) tokens of the patches `kept` ((B, K) grid indices; None: all) of a `grid` through every block
        and the final norm, keeping the outputs of the blocks in `keep` (and their attention weights if
        `attention`)."""
        hidden, attns = [], []
        for i, block in enumerate(self.blocks):
            bias = block.attn.position_bias(grid, kept, self.cfg.num_prefix_tokens)  # None but for "relative"
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, attn = checkpoint(block, x, attention and i in keep, bias, use_reentrant=False)
            else:
                x, attn = block(x, need_weights=attention and i in keep, bias=bias)
            if i in keep:
                hidden.append(x)
                if attention:
                    attns.append(attn)
        return Intermediates(self.norm(x), hidden, attns)

    def forward_features(self, x: torch.Tensor, patch_noise: torch.Tensor | None = None,
                         patch_dropout: float | None = None) -> torch.Tensor:
        """(B, C, H, W) images -> (B, T, D) tokens after the final norm (`patch_noise`, `patch_dropout`: see
        `encode`)."""
        patches, grid = self.embed_patches(x)
        return self.encode(patches, grid, patch_noise, patch_dropout)

    def forward_intermediates(
        self, x: torch.Tensor, blocks: list[int] | None = None, attention: bool = False
    ) -> Intermediates:
        """Run the encoder and keep the outputs (and, if asked, attention weights) of some blocks.

        `blocks` are indices into the encoder (negative counts from the end); None means all. Every patch
        token goes through (no PatchDropout), so the maps cover the whole grid.
        """
        depth = len(self.blocks)
        wanted = range(depth) if blocks is None else blocks
        keep = set()
        for i in wanted:
            if not -depth <= i < depth:
                raise ValueError(f"block index {i} is out of range for a {depth}-block encoder")
            keep.add(i % depth)
        patches, grid = self.embed_patches(x)
        return self._run_blocks(self._tokens(patches, grid), grid, None, frozenset(keep), attention)

    # ---- head ----

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens -> (B, D): the class token, or the mean of the patch tokens."""
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        return tokens.mean(dim=1)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, T, D) tokens -> (B, classes) logits, or the (B, num_features) representation if pre_logits."""
        x = self.pre_logits(self.pool(tokens))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, patch_noise: torch.Tensor | None = None,
                patch_dropout: float | None = None) -> torch.Tensor:
        """(B, C, H, W) images -> (B, classes) logits (`patch_noise`, `patch_dropout`: see `encode`)."""
        return self.forward_head(self.forward_features(x, patch_noise, patch_dropout))


def _lecun_normal_(weight: torch.Tensor) -> None:
    """Truncated normal with variance 1 / fan_in, cut at two standard deviations (jax's lecun_normal)."""
    fan_in = weight[0].numel()
    # 0.8796 is the std of a unit normal truncated to [-2, 2]; dividing restores variance 1 / fan_in.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)


class _PreLogits(nn.Module):
    """The tanh "pre-logits" layer of ImageNet-21k pretraining."""

    def __init__(self, width: int, representation_size: int):
        super().__init__()
        self.fc = nn.Linear(width, representation_size)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))
