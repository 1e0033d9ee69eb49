"""`vitkit <command>`: each command is a plain function over one typed options dataclass.

`COMMANDS` is the whole command line: a name, the function, its dataclass (whose field docstrings are the
options' help texts), and the command's short forms, flags and several-valued options. Every parser is built
from that table the same way by jsonargparse, so `--config recipe.yaml` (or `--preset NAME`, a recipe packaged
with vitkit) sets many options at once, and options given after it win.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from vitkit.export import ExportOptions, export_weights
from vitkit.fewshot import FewShotOptions, few_shot_eval
from vitkit.inference import (CalibrateOptions, EvalOptions, PredictOptions, calibrate_weights, evaluate_weights,
                              predict_images)
from vitkit.inspection import InspectOptions, inspect_weights
from vitkit.serve import ServeOptions, serve
from vitkit.train.config import FinetuneConfig, PretrainConfig, TrainConfig, finetune_defaults, pretrain_defaults


def train_command(cfg: TrainConfig) -> int:
    """Train a ViT from scratch (default: the Fashion-MNIST recipe)."""
    from vitkit.train.trainer import train

    result = train(cfg)
    return 0 if result.steps > 0 else 1


def finetune_command(cfg: FinetuneConfig) -> int:
    """Fine-tune pretrained weights on a dataset with a new zero-initialised head (the paper's recipe:
    SGD momentum 0.9, no weight decay, clipping at 1, warm-up then cosine)."""
    if not cfg.init.weights:
        raise ValueError("vitkit finetune needs --weights PRETRAINED (a vitkit, timm, HF or official .npz file)")
    if cfg.sweep is not None:
        from vitkit.train.sweep import finetune_sweep

        finetune_sweep(cfg.training(), cfg.sweep if isinstance(cfg.sweep, list) else [cfg.sweep])
        return 0
    return train_command(cfg.training())


def pretrain_command(cfg: PretrainConfig) -> int:
    """Pretrain a ViT without labels by masked patch prediction (the paper's self-supervision, appendix B.1.2);
    the encoder is saved as ordinary weights for `vitkit finetune` and `vitkit fewshot`."""
    return train_command(cfg)


def fewshot_command(opts: FewShotOptions) -> int:
    """Few-shot linear evaluation of frozen representations: ridge regression on K images per class."""
    few_shot_eval(opts)
    return 0


def eval_command(opts: EvalOptions) -> int:
    """Evaluate saved weights on a dataset split: top-1, top-5 and the confusion matrix."""
    evaluate_weights(opts)
    return 0


def predict_command(opts: PredictOptions) -> int:
    """Classify image files with saved weights: the top-k classes with probabilities."""
    predict_images(opts)
    return 0


def calibrate_command(opts: CalibrateOptions) -> int:
    """Measure int8 inference's activation ranges on dataset images once, for eval, predict and serve's
    --int8_calibration (faster int8: no range to find at every call)."""
    calibrate_weights(opts)
    return 0


def inspect_command(opts: InspectOptions) -> int:
    """Inspect what weights learned: patch-embedding filters, position embeddings, attention distance, rollout."""
    inspect_weights(opts)
    return 0


def export_command(opts: ExportOptions) -> int:
    """Export weights to ONNX (dynamic batch, optionally dynamic size; checked in ONNX Runtime; optionally int8), the
    official .npz layout or vitkit .safetensors."""
    export_weights(opts)
    return 0


def serve_command(opts: ServeOptions) -> int:
    """Serve weights over HTTP (FastAPI on uvicorn): POST /predict, POST /explain (attention rollout as a PNG),
    GET /healthz, and a page at / to try images in a browser."""
    serve(opts)
    return 0


@dataclass(frozen=True)
class Command:
    function: Callable[[object], int]
    options: type
    """The dataclass the function takes; its fields are the command's options."""
    defaults: Callable[[], object] | None = None
    """Options whose defaults differ from the dataclass's (as one instance of it)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Short forms of options (`--data` for `--data.dataset`); a value `--x=true` makes a flag."""
    positional: str | None = None
    """A list field taken from the positional arguments."""
    flags: tuple[str, ...] = ()
    """Boolean options that may also be given alone (`--explain` for `--explain true`)."""
    several: tuple[str, ...] = ()
    """List options that take several values after one option (`--images a.png b.png`)."""


TRAINING_ALIASES = {"--data": "--data.dataset", "--weights": "--init.weights"}

COMMANDS: dict[str, Command] = {
    "train": Command(train_command, TrainConfig, aliases=TRAINING_ALIASES),
    "finetune": Command(finetune_command, FinetuneConfig, finetune_defaults,
                        {**TRAINING_ALIASES, "--resolution": "--data.image_size", "--freeze": "--init.freeze=true"}),
    "pretrain": Command(pretrain_command, PretrainConfig, pretrain_defaults, TRAINING_ALIASES),
    "fewshot": Command(fewshot_command, FewShotOptions),
    "eval": Command(eval_command, EvalOptions),
    "predict": Command(predict_command, PredictOptions, positional="images", flags=("--explain",)),
    "calibrate": Command(calibrate_command, CalibrateOptions),
    "inspect": Command(inspect_command, InspectOptions, several=("--images", "--analyses")),
    "export": Command(export_command, ExportOptions, flags=("--dynamic", "--check", "--int8"),
                      several=("--check_sizes",)),
    "serve": Command(serve_command, ServeOptions),
}


def presets_dir() -> Path:
    return Path(str(resources.files("vitkit") / "configs"))


def available_presets(command: str = "train") -> list[str]:
    """The packaged recipes of `command`: those whose first line is the command that runs them."""
    return sorted(p.stem for p in presets_dir().glob("*.yaml")
                  if p.read_text().startswith(f"# vitkit {command} "))


class RecipeFile(ActionConfigFile):
    """`--config FILE`, or `--preset NAME` for a recipe packaged with vitkit (configs/NAME.yaml)."""

    def __call__(self, parser, cfg, values, option_string=None):
        if option_string == "--preset":
            command = parser.prog.split()[-1]
            if values not in available_presets(command):
                raise ValueError(f"unknown preset {values!r} for vitkit {command}; its presets are "
                                 f"{available_presets(command)}")
            values = str(presets_dir() / f"{values}.yaml")
        super().__call__(parser, cfg, values, option_string)


def expand_aliases(argv: list[str]) -> list[str]:
    """A command's short forms written out (`finetune --data mnist-subset` -> `--data.dataset mnist-subset`).

    jsonargparse gives each option group an option of the group's own name that reads the whole group from
    YAML (`--data '{dataset: digits}'`), so `--data NAME` cannot be declared on the parser as a short form.
    """
    command = COMMANDS.get(argv[0]) if argv else None
    if command is None or not command.aliases:
        return argv
    out = [argv[0]]
    for arg in argv[1:]:
        name, eq, value = arg.partition("=")
        target = command.aliases.get(name)
        if target is None:
            out.append(arg)
        elif "=" in target:  # a flag: `--freeze` alone means true, `--freeze=false` still works
            out.append(target.split("=")[0] + "=" + value if eq else target)
        else:
            out.append(target + eq + value)
    return out


def _is_option(arg: str) -> bool:
    return arg.startswith("-") and arg != "-"


def expand_values(argv: list[str]) -> list[str]:
    """A command's flags and several-valued options written the way jsonargparse reads them.

    A flag alone means true (`--explain` -> `--explain=true`; `--explain false` and `--explain=false` work too).
    jsonargparse reads a list option from one YAML value (or `--images+ a.png --images+ b.png`), so the values
    after a several-valued option become one list: `--images a.png b.png` -> `--images ["a.png", "b.png"]`.
    ValueError for a several-valued option given no value.
    """
    command = COMMANDS.get(argv[0]) if argv else None
    if command is None or not (command.flags or command.several):
        return argv
    out = [argv[0]]
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, value = arg.partition("=")
        if name in command.flags and not eq:
            value = "true"
            if i < len(argv) and argv[i].lower() in ("true", "false"):
                value = argv[i]
                i += 1
            out.append(f"{name}={value}")
        elif name in command.several:
            values = [value] if eq else []
            while not eq and i < len(argv) and not _is_option(argv[i]):
                values.append(argv[i])
                i += 1
            if not values:
                raise ValueError(f"{name} needs at least one value, e.g. {name} A B")
            already_a_list = len(values) == 1 and values[0].lstrip().startswith("[")
            out += [name, values[0] if already_a_list else json.dumps(values)]
        else:
            out.append(arg)
    return out


def _command_parser(name: str, command: Command) -> ArgumentParser:
    summary = command.function.__doc__
    notes = []
    if command.aliases:
        notes.append("Short forms: " + ", ".join(f"{a} ({t.split('=')[0]})" for a, t in command.aliases.items()))
    if command.flags:
        notes.append("Alone, these mean true: " + ", ".join(command.flags))
    if command.several:
        notes.append("Several values after one option (--x A B ...): " + ", ".join(command.several))
    if available_presets(name):
        notes.append(f"Presets (--preset): {', '.join(available_presets(name))}")
    parser = ArgumentParser(prog=f"vitkit {name}", description=" ".join([summary, *(n + "." for n in notes)]))
    parser.add_argument("--config", "--preset", action=RecipeFile,
                        help="A YAML file of these options (--preset NAME: a recipe packaged with vitkit); "
                        "options after it override it.")
    skip = {command.positional} if command.positional else set()
    parser.add_class_arguments(command.options, None, skip=skip)
    if command.positional:
        parser.add_argument(command.positional, nargs="+", type=str,
                            help=_field_doc(command.options, command.positional))
    if command.defaults is not None:
        parser.set_defaults(_flatten(command.defaults().to_dict()))
    return parser


def build_parser() -> ArgumentParser:
    # The dataclass fields' docstrings are the options' help texts.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="vitkit", exit_on_error=True,
                            description="Vision Transformers (Dosovitskiy et al., 2020): train, pretrain, "
                            "fine-tune, evaluate, predict, inspect, export and serve. Run `vitkit <command> --help` "
                            "for a command's options.")
    commands = parser.add_subcommands(dest="command", required=True)
    for name, command in COMMANDS.items():
        commands.add_subcommand(name, _command_parser(name, command), help=command.function.__doc__)
    return parser


def parse(argv: list[str]) -> tuple[Command, object]:
    """The command `argv` names, and its options dataclass filled from the command line."""
    parser = build_parser()
    namespace = parser.parse_args(expand_values(expand_aliases(argv)))
    name = namespace.command
    command = COMMANDS[name]
    built = parser.instantiate(namespace)[name]
    return command, command.options(**{key: built[key] for key in command.options.__dataclass_fields__})


def _error(message: str) -> int:
    print(f"vitkit: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command, options = parse(argv)
    except ValueError as err:  # an unknown preset
        return _error(str(err))
    try:
        return command.function(options)
    except KeyboardInterrupt:
        print("\nvitkit: interrupted. A training run continues from its last checkpoint with --run.resume.",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, PermissionError, OSError) as err:
        return _error(str(err))


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.01}} -> {"optim.lr": 0.01}: parser defaults by option name."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _field_doc(kind: type, name: str) -> str:
    from docstring_parser import parse_from_object

    docs = {p.arg_name: p.description for p in parse_from_object(kind).params}
    return docs.get(name) or name


if __name__ == "__main__":
    raise SystemExit(main())
