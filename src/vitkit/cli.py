"""`vitkit <command>`: each command is a plain function over typed config dataclasses.

The parser is built from the dataclasses with jsonargparse, so every field is an option with its
docstring as help, and `--config recipe.yaml` (or `--preset NAME`) sets many at once; options given
after it on the command line win.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from vitkit.train.config import (DataOptions, InitOptions, ModelOptions, OptimOptions, RunOptions, TrainConfig,
                                 finetune_defaults)

# Short spellings of the options every user types, rewritten before parsing (later options still win).
ALIASES = {
    "train": {"--data": "--data.dataset", "--weights": "--init.weights"},
    "finetune": {"--data": "--data.dataset", "--weights": "--init.weights", "--resolution": "--data.image_size",
                 "--freeze": "--init.freeze=true"},
}


def train_command(cfg: TrainConfig) -> int:
    """Train a ViT from scratch (default: the Fashion-MNIST recipe)."""
    from vitkit.train.loop import train

    result = train(cfg)
    return 0 if result.steps > 0 else 1


def finetune_command(cfg: TrainConfig, sweep: list[float] | None = None) -> int:
    """Fine-tune pretrained weights on a dataset with a new zero-initialised head (the paper's recipe:
    SGD momentum 0.9, no weight decay, clipping at 1, warm-up then cosine)."""
    if not cfg.init.weights:
        raise ValueError("vitkit finetune needs --weights PRETRAINED (a vitkit, timm, HF or official .npz file)")
    if sweep:
        from vitkit.finetune import finetune_sweep

        finetune_sweep(cfg, sweep)
        return 0
    return train_command(cfg)


def fewshot_command(opts) -> int:
    """Few-shot linear evaluation of frozen representations: ridge regression on K images per class."""
    from vitkit.fewshot import few_shot_eval

    few_shot_eval(opts)
    return 0


def eval_command(opts) -> int:
    """Evaluate saved weights on a dataset split: top-1, top-5 and the confusion matrix."""
    from vitkit.inference import evaluate_weights

    evaluate_weights(opts)
    return 0


def predict_command(opts) -> int:
    """Classify image files with saved weights: the top-k classes with probabilities."""
    from vitkit.inference import predict_images

    predict_images(opts)
    return 0


def presets_dir() -> Path:
    return Path(str(resources.files("vitkit") / "configs"))


def available_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def _expand_presets(argv: list[str]) -> list[str]:
    """`--preset quick` -> `--config <package>/configs/quick.yaml`, in place, so later options still win."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = None
        if arg == "--preset":
            if i + 1 >= len(argv):
                raise ValueError(f"--preset needs a name; the presets are {available_presets()}")
            name, i = argv[i + 1], i + 2
        elif arg.startswith("--preset="):
            name, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        path = presets_dir() / f"{name}.yaml"
        if not path.exists():
            raise ValueError(f"unknown preset {name!r}; the presets are {available_presets()}")
        out += ["--config", str(path)]
    return out


def _expand_aliases(argv: list[str]) -> list[str]:
    """`vitkit finetune --data mnist-subset` -> `--data.dataset mnist-subset`, and the other ALIASES."""
    if not argv or argv[0] not in ALIASES:
        return argv
    aliases = ALIASES[argv[0]]
    out = [argv[0]]
    for arg in argv[1:]:
        name, eq, value = arg.partition("=")
        target = aliases.get(name)
        if target is None:
            out.append(arg)
        elif "=" in target:  # a flag: `--freeze` alone means true, `--freeze=false` still works
            out.append(target.split("=")[0] + "=" + value if eq else target)
        else:
            out.append(target + eq + value)
    return out


def _add_training_groups(parser: ArgumentParser) -> None:
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML recipe (see configs/); later options override it.")
    parser.add_argument("--preset", type=str, help="A packaged recipe by name, e.g. 'quick' (same as --config).")
    parser.add_class_arguments(ModelOptions, "model")
    parser.add_class_arguments(InitOptions, "init")
    parser.add_class_arguments(DataOptions, "data")
    parser.add_class_arguments(OptimOptions, "optim")
    parser.add_class_arguments(RunOptions, "run")


def build_parser() -> ArgumentParser:
    from vitkit.fewshot import FewShotOptions
    from vitkit.inference import EvalOptions, PredictOptions

    # The dataclass fields' docstrings are the options' help texts.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    parser = ArgumentParser(
        prog="vitkit",
        description="Vision Transformers (Dosovitskiy et al., 2020): train, evaluate and predict. "
        "Run `vitkit <command> --help` for a command's options.",
        exit_on_error=True,
    )
    commands = parser.add_subcommands(dest="command", required=True)

    train = ArgumentParser(description=train_command.__doc__ + f" Presets (--preset): {', '.join(available_presets())}. "
                           "--data NAME is short for --data.dataset NAME.")
    _add_training_groups(train)
    commands.add_subcommand("train", train, help=train_command.__doc__)

    finetune = ArgumentParser(description=finetune_command.__doc__ + " Short forms: --weights W (--init.weights), "
                              "--data NAME (--data.dataset), --resolution R (--data.image_size), --freeze "
                              "(--init.freeze). The model's architecture is the weights'.")
    _add_training_groups(finetune)
    finetune.add_argument("--sweep", type=float | list[float] | None, default=None,
                          help="Fine-tune once per learning rate, e.g. [0.001,0.003,0.01,0.03] (the paper's), "
                          "each in <run.out>/lr-<lr>, and keep the best by validation top-1.")
    finetune.set_defaults(_flatten(finetune_defaults().to_dict()))
    commands.add_subcommand("finetune", finetune, help=finetune_command.__doc__)

    fewshot = ArgumentParser(description=fewshot_command.__doc__)
    fewshot.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options.")
    fewshot.add_class_arguments(FewShotOptions, None)
    commands.add_subcommand("fewshot", fewshot, help=fewshot_command.__doc__)

    evaluate = ArgumentParser(description=eval_command.__doc__)
    evaluate.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options.")
    evaluate.add_class_arguments(EvalOptions, None)
    commands.add_subcommand("eval", evaluate, help=eval_command.__doc__)

    predict = ArgumentParser(description=predict_command.__doc__)
    predict.add_argument("images", nargs="+", type=str, help="Image files (any size; resized as the model needs).")
    predict.add_class_arguments(PredictOptions, None)
    commands.add_subcommand("predict", predict, help=predict_command.__doc__)
    return parser


def _error(message: str) -> int:
    print(f"vitkit: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _expand_presets(_expand_aliases(argv))
    except ValueError as err:
        return _error(str(err))
    parser = build_parser()
    ns = parser.parse_args(argv)
    command = ns.command
    sub = ns[command]
    try:
        if command in ("train", "finetune"):
            init = parser.instantiate(ns)[command]
            cfg = TrainConfig(model=init.model, init=init.init, data=init.data, optim=init.optim, run=init.run)
            if command == "finetune":
                sweep = sub.sweep if sub.sweep is None or isinstance(sub.sweep, list) else [sub.sweep]
                return finetune_command(cfg, sweep)
            return train_command(cfg)
        from vitkit.fewshot import FewShotOptions
        from vitkit.inference import EvalOptions, PredictOptions

        if command == "fewshot":
            return fewshot_command(_dataclass_from(FewShotOptions, sub))

        if command == "eval":
            return eval_command(_dataclass_from(EvalOptions, sub))
        if command == "predict":
            opts = _dataclass_from(PredictOptions, sub)
            opts.images = list(sub.images)
            return predict_command(opts)
    except KeyboardInterrupt:
        print("\nvitkit: interrupted. A training run continues from its last checkpoint with --run.resume.",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, PermissionError, OSError) as err:
        return _error(str(err))
    return _error(f"unknown command {command!r}")


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.01}} -> {"optim.lr": 0.01}: parser defaults by option name."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _dataclass_from(kind, namespace):
    fields = kind.__dataclass_fields__
    return kind(**{k: namespace[k] for k in fields if k in namespace})


if __name__ == "__main__":
    raise SystemExit(main())
