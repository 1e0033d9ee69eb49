"""The trainer's objective interface: a second objective (regressing each image's brightness) gets exact resume
and torchrun from the one training loop, and its own parameters are trained and checkpointed with the model."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from test_train import _assert_same_weights, _losses, _stopped_and_resumed
from vitkit.train.config import DataOptions, ModelOptions, OptimOptions, RunOptions, TrainConfig
from vitkit.train.trainer import train

# The objective as source, so that the torchrun processes below define exactly the class this file tests.
OBJECTIVE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from vitkit.train.objective import Evaluation, Objective, StepLoss

    class Brightness(Objective):
        """Predict each image's mean pixel value, seen through a random gain drawn from the trainer's noise."""

        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(scale))  # the objective's own parameter

        def head_size(self, data):
            return 1

        def noise_shape(self, model):
            return (1,)

        def loss(self, forward, images, targets, labels, noise):
            gain = 0.5 + noise.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            x = images * gain
            target = x.mean(dim=(1, 2, 3))
            prediction = forward(x).float().squeeze(1) * self.scale
            loss = F.mse_loss(prediction, target)
            return StepLoss(loss, {"loss": loss.item() * len(x), "seen": float(len(x))})

        @torch.no_grad()
        def evaluate(self, model, dataset, device):
            was_training = model.training
            model.eval()
            images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
            mse = float(F.mse_loss(model(images).float().squeeze(1) * self.scale, images.mean(dim=(1, 2, 3))))
            model.train(was_training)
            return Evaluation({"mse": mse}, -mse, f"mse {mse:.5f}")
''')

namespace: dict = {}
exec(OBJECTIVE, namespace)
Brightness = namespace["Brightness"]


def config(out, **run) -> TrainConfig:
    return TrainConfig(
        model=ModelOptions(name="Ti/4", width=32, depth=2, heads=2, mlp_dim=64, dropout=0.1, patch_dropout=0.0),
        data=DataOptions(dataset="synthetic", crop="pad", pad=1, flip=True),
        optim=OptimOptions(batch_size=32, epochs=2, lr=3e-3, warmup=0.1, label_smoothing=0.0),
        run=RunOptions(out=str(out), precision="fp32", progress=False, tensorboard=False, checkpoint_every=7,
                       log_every=1, **run),
    )


def test_a_second_objective_learns_and_resumes_bit_exactly(tmp_path):
    whole = Brightness()
    result = train(config(tmp_path / "whole"), whole)
    (_, first), *_, (_, last) = _losses(tmp_path / "whole")
    assert last < 0.5 * first, (first, last)
    assert whole.scale.item() != 1.0  # the objective's own parameter was trained
    assert result.test is None and (tmp_path / "whole" / "results.json").exists()

    resumed = Brightness()  # a fresh process would start from a fresh objective
    # stopped mid-epoch, between checkpoints (every 7 steps)
    _stopped_and_resumed(config(tmp_path / "part"), 17, objectives=(Brightness(), resumed))
    _assert_same_weights(tmp_path / "whole", tmp_path / "part")
    assert torch.equal(whole.scale, resumed.scale)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")


def test_a_second_objective_under_torchrun_matches_one_process(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(OBJECTIVE + textwrap.dedent('''
        import os
        import sys
        from vitkit.train.config import DataOptions, ModelOptions, OptimOptions, RunOptions, TrainConfig
        from vitkit.train.trainer import train

        cfg = TrainConfig(
            model=ModelOptions(name="Ti/4", width=32, depth=2, heads=2, mlp_dim=64, patch_dropout=0.0),
            data=DataOptions(dataset="synthetic", crop="pad", pad=1, flip=True),
            optim=OptimOptions(optimizer="sgd", batch_size=32, epochs=1, lr=0.05, label_smoothing=0.0),
            run=RunOptions(out=sys.argv[1], precision="fp32", progress=False, tensorboard=False))
        # Each process starts its objective elsewhere: the trainer must give every process rank 0's values.
        rank = int(os.environ.get("RANK", "0"))
        objective = Brightness(1.0 + 0.5 * rank)
        train(cfg, objective)
        print("scale", objective.scale.item())
    '''))
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    scales = [float(line.split()[1]) for line in (one.stdout + two.stdout).splitlines() if line.startswith("scale")]
    assert len(scales) == 3 and max(scales) - min(scales) < 1e-5 and scales[0] != 1.0, scales  # trained, shared
