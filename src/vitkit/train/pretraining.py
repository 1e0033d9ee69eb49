"""Masked patch prediction as a training objective: vitkit.pretrain.mpp plugged into the one training loop.

The trainer draws each image's (N, 3) corruption noise from (seed, epoch, batch), so the corruption is the
same however a batch is split over processes and micro-batches, and on resume. The encoder is the model
(saved as ordinary vitkit weights that `vitkit finetune` and `vitkit fewshot` take); the [mask] embedding
and the prediction head are the objective's own parameters, kept in the checkpoints' training state.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from vitkit.data import collate_skip_none
from vitkit.model import ViT
from vitkit.pretrain import MaskedPatchPrediction
from vitkit.train.config import MPPOptions
from vitkit.train.objective import Evaluation, Objective, StepLoss
from vitkit.train.sampling import derive_seed


class _Network(nn.Module):
    """The model and the MPP module as one module, so that DDP and torch.compile cover both."""

    def __init__(self, model: nn.Module, mpp: MaskedPatchPrediction):
        super().__init__()
        self.model, self.mpp = model, mpp

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.mpp(self.model, images, noise)
        return out.loss, out.corrupted_count, out.correct


class MaskedPatchObjective(Objective):
    """The paper's MPP (appendix B.1.2) with the options of `vitkit pretrain --mpp.*`; labels are ignored."""

    def __init__(self, options: MPPOptions | None = None, eval_seed: int = 0):
        super().__init__()
        self.options = options or MPPOptions()
        self.eval_seed = eval_seed
        self.mpp: MaskedPatchPrediction | None = None

    def prepare(self, model: nn.Module, data) -> None:
        if not isinstance(model, ViT):
            raise ValueError(f"masked patch prediction corrupts and predicts a ViT's patch tokens; the model is "
                             f"{getattr(model.cfg, 'name', type(model).__name__)}, which has none: pretrain a plain "
                             "ViT (e.g. --model.name Ti/4)")
        o, cfg = self.options, model.cfg
        self.mpp = MaskedPatchPrediction(cfg.width, cfg.in_chans, cfg.patch_size, data.mean, data.std, target=o.target,
                                         bits=o.bits, rate=o.rate, split=tuple(o.split), downsize=o.downsize)
        self.mpp.to(next(model.parameters()).device)
        self.mpp.check_model(model)  # refuses PatchDropout now, not at the first step

    def network(self, model: nn.Module) -> nn.Module:
        return _Network(model, self.mpp)

    def noise_shape(self, model) -> tuple[int, ...]:
        return self.mpp.noise_shape(model.cfg.grid_size[0] * model.cfg.grid_size[1])

    def loss(self, forward, images, targets, labels, noise) -> StepLoss:
        loss, corrupted, correct = forward(images, noise)
        n = len(images)
        return StepLoss(loss, {"loss": loss.item() * n, "seen": float(n), "corrupted": float(corrupted),
                               "correct": float(correct)})

    def train_metrics(self, window: dict[str, float], steps: int) -> dict[str, float]:
        metrics = {"train/loss": window["loss"] / steps}
        if self.options.target == "colour":
            metrics["train/patch_top1"] = window["correct"] / max(window["corrupted"], 1.0)
        return metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset, device: torch.device) -> Evaluation:
        """The MPP loss (and colour accuracy) over a split, with the same corruption at every evaluation."""
        was_training = model.training
        model.eval()
        loss_sum, seen, corrupted, correct = 0.0, 0, 0, 0
        generator = torch.Generator().manual_seed(derive_seed(self.eval_seed, 0xE7A1))
        loader = DataLoader(dataset, batch_size=500, collate_fn=collate_skip_none, generator=torch.Generator())
        for batch in loader:
            if batch is None:
                continue
            images = batch[0].to(device)
            noise = torch.rand(len(images), *self.noise_shape(model), generator=generator)
            out = self.mpp(model, images, noise)
            loss_sum += float(out.loss) * len(images)
            seen += len(images)
            corrupted, correct = corrupted + int(out.corrupted_count), correct + int(out.correct)
        model.train(was_training)
        if seen == 0:
            raise ValueError("the evaluation set is empty: nothing to evaluate")
        metrics = {"loss": loss_sum / seen}
        text = f"MPP loss {metrics['loss']:.4f}"
        if self.options.target == "colour":
            metrics["patch_top1"] = correct / corrupted
            text += f", corrupted patches' colour top-1 {100 * metrics['patch_top1']:.2f}%"
        return Evaluation(metrics, -metrics["loss"], text + f" ({seen} images)")
