"""Optimisers and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# Parameters that carry no weight decay: biases, norm scales, and the learned embeddings that
# are positions or a single token rather than a projection.
_NO_DECAY_NAMES = ("pos_embed", "relative_position_bias_table", "cls_token", "mask_token", "mask_embedding")


def _named_parameters(modules: nn.Module | list[nn.Module], trainable_only: bool = True
                      ) -> list[tuple[str, nn.Parameter]]:
    modules = modules if isinstance(modules, list) else [modules]
    return [(name, param) for module in modules for name, param in module.named_parameters()
            if param.requires_grad or not trainable_only]


def _is_block_matrix(name: str, param: torch.Tensor) -> bool:
    """A weight matrix of an encoder block (attention's qkv and output, the MLP's two layers): Muon's parameters."""
    return param.ndim == 2 and ".blocks." in f".{name}" and not any(key in name for key in _NO_DECAY_NAMES)


def parameter_groups(modules: nn.Module | list[nn.Module], weight_decay: float,
                     leave_out: Callable[[str, torch.Tensor], bool] | None = None) -> list[dict]:
    """Two groups: matrices with weight decay; biases, norms, position embedding, class and mask tokens without.
    Parameters `leave_out(name, param)` holds for are in neither."""
    decay, no_decay = [], []
    for name, param in _named_parameters(modules):
        if leave_out is not None and leave_out(name, param):
            continue
        if param.ndim < 2 or any(key in name for key in _NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module | list[nn.Module],
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay!r}")
    groups = parameter_groups(model, weight_decay)
    # fused: one kernel per parameter that does the whole update, on the CPU as on CUDA. At the quick preset's
    # 56 small tensors, AdamW's step took 1.0 ms fused against 3.3 ms with foreach (torch 2.14, the 2-core
    # machine; foreach on a CPU is a loop over per-tensor kernels), of a step of about 70 ms.
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    if name == "adam":
        # The paper's optimiser: Flax's Adam decays the weights apart from the gradient's moments, by
        # learning rate x weight decay x weight at every step. That is exactly AdamW's update.
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    if name == "adam-l2":
        # The weight decay added to the gradient, so it passes through Adam's moments (torch's Adam).
        return torch.optim.Adam(groups, lr=lr, betas=betas, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
    if name == "muon":
        block_matrices = [param for key, param in _named_parameters(model, trainable_only=False)
                          if _is_block_matrix(key, param)]
        matrices = [param for param in block_matrices if param.requires_grad]
        if not matrices:
            reason = ("its encoder blocks are frozen (--init.freeze), so only the head trains" if block_matrices
                      else "this model has none")
            raise ValueError(f"--optim.optimizer muon trains the weight matrices of a ViT's encoder blocks, and "
                             f"{reason}: choose adamw or sgd")
        return MuonWithAdamW(matrices, parameter_groups(model, weight_decay, leave_out=_is_block_matrix), lr,
                             weight_decay, betas)
    raise ValueError(f"unknown optimizer {name!r}: choose adamw, adam, adam-l2, sgd or muon")


# Coefficients of Muon's quintic Newton-Schulz step, a X + b (X X^T) X + c (X X^T)^2 X: chosen (Jordan et al., 2024)
# for the steepest slope at zero: five steps bring the singular values of the update, but for ones tiny against its
# norm, into roughly 0.5-1.5.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def orthogonalise(update: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(A, B) matrix -> the (A, B) matrix with the same singular vectors and singular values near 1 (Muon's
    approximate U V^T of U S V^T), by Newton-Schulz steps in fp32 on the wide orientation."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = update.shape[0] > update.shape[1]
    x = update.float().T if tall else update.float()  # (m, n), m <= n: the Gram matrix below is the small one
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1, inside the iteration's basin
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.T  # (m, m)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024) for weight matrices: Nesterov momentum whose update is orthogonalised
    (`orthogonalise`), scaled by 0.2 sqrt(max(A, B)) to the RMS of an AdamW update (Liu et al., 2025) so that AdamW's
    learning rate and weight decay carry over, and decoupled weight decay. The update of
    `torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`, with the orthogonalisation in fp32 where torch's runs in
    bf16: on a CPU without bf16 arithmetic (AMD EPYC with AVX2) that made the fast preset's step 2.5x slower."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = orthogonalise(param.grad.lerp(buffer, momentum))  # Nesterov: a step ahead on the buffer
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-lr * 0.2 * math.sqrt(max(param.shape)))


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimiser for the trainer: Muon on `matrices` (the encoder blocks' weights), fused AdamW on the
    parameter groups `others` (embeddings, norms, biases, the head, a hybrid's ResNet), at one learning rate and
    schedule: `param_groups` holds both optimisers' groups, so a learning-rate scheduler sets them all."""

    def __init__(self, matrices: list[torch.Tensor], others: list[dict], lr: float, weight_decay: float,
                 betas: tuple[float, float]):
        self.muon = Muon([{"params": matrices}], lr, weight_decay)
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=betas, fused=True)
        super().__init__([param for group in self.muon.param_groups + self.adamw.param_groups
                          for param in group["params"]], {"lr": lr})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` < 1 is a fraction of all steps, otherwise a step count."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    steps = round(warmup * total_steps) if warmup < 1 else int(warmup)
    return min(steps, total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up, then decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(progress, 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}: choose cosine, linear or constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, schedule: str, step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule over `total_steps`, at `step`: it sets the optimiser's learning rate to the one of that step (a
    `step` above 0 replaces a schedule mid-run, on an optimiser a scheduler has already been built on)."""
    lr_factor(0, total_steps, warmup, schedule)  # reject an unknown schedule now, not at step 1
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule), last_epoch=step - 1
    )


def check_patch_dropout_phases(phases: list[tuple[float, float]]) -> None:
    """Refuse phases that do not tile the run: ends rising in (0, 1], the last 1, rates in [0, 1)."""
    shown = [list(phase) for phase in phases]
    if not phases:
        raise ValueError("--optim.patch_dropout_phases is empty: give [[end, rate], ...] pairs, or null")
    ends = [end for end, _ in phases]
    if any(not 0 < end <= 1 for end in ends) or any(a >= b for a, b in zip(ends, ends[1:])) or ends[-1] != 1:
        raise ValueError(f"--optim.patch_dropout_phases {shown}: the ends must rise, each a fraction of the run in "
                         "(0, 1], and the last must be 1 (the rate of the run's end)")
    rates = [rate for _, rate in phases]
    if any(not 0 <= rate < 1 for rate in rates):
        raise ValueError(f"--optim.patch_dropout_phases {shown}: every rate must be in [0, 1) (the fraction of "
                         "patch tokens left out)")


def patch_dropout_at(phases: list[tuple[float, float]], step: int, total_steps: int) -> float:
    """The PatchDropout rate of `step` (0-based): that of the first phase whose end (a fraction of `total_steps`)
    lies beyond it."""
    for end, rate in phases:
        if step < end * total_steps:
            return rate
    return phases[-1][1]
