"""The package's layers only point down, its modules import no cycle, and inference does not load training.

The layers are those of docs/design.md. Every `import` statement counts, inside functions too: a lazy import
hides a dependency from import time, not from the design.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import from its own package or from a lower layer, never from a higher one or
# from another package of its own layer.
LAYERS = [
    ["vitkit.crash_points"],
    ["vitkit.atomic", "vitkit.allocator", "vitkit.plots"],
    ["vitkit.model", "vitkit.data", "vitkit.runtime"],
    ["vitkit.weights"],
    ["vitkit"],  # the package's face: the public API of the layers below
    ["vitkit.fastest_mode", "vitkit.int8_calibration"],
    ["vitkit.evaluation", "vitkit.flip_averaging", "vitkit.inference_modes", "vitkit.pretrain", "vitkit.inspect"],
    ["vitkit.inference"],
    ["vitkit.fewshot", "vitkit.inspection", "vitkit.export", "vitkit.serve"],  # commands over inference
    ["vitkit.train"],
    ["vitkit.cli"],
    ["vitkit.__main__"],  # `python -m vitkit`: the command table run as a module
]

# What `vitkit predict` and `vitkit eval` must run without. vitkit.train.config (the option dataclasses the
# command line lists in `vitkit --help`) is not training machinery.
TRAINING_MACHINERY = ["vitkit.train.trainer", "vitkit.train.objective", "vitkit.train.checkpoint",
                      "vitkit.train.optim", "vitkit.train.distributed", "vitkit.train.compile",
                      "vitkit.train.sampling", "vitkit.train.setup", "vitkit.train.sweep", "vitkit.train.metrics"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "vitkit").rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The vitkit modules `name` imports (`from vitkit.x import y` counts y when y is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m == "vitkit" or m.startswith("vitkit.")}


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, the package the module belongs to) for the most specific prefix in LAYERS."""
    best = None
    for index, layer in enumerate(LAYERS):
        for package in layer:
            if (name == package or name.startswith(package + ".")) and (best is None or len(package) > len(best[1])):
                best = (index, package)
    assert best is not None, f"{name} is in no layer of LAYERS: place it in docs/design.md and here"
    return best


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def test_every_import_points_down_or_within_its_package():
    wrong = []
    for importer, imported in graph().items():
        i_layer, i_package = layer_of(importer)
        for target in imported:
            t_layer, t_package = layer_of(target)
            if t_package == i_package:
                continue
            if t_layer >= i_layer:
                wrong.append(f"{importer} (layer {i_layer}) imports {target} (layer {t_layer})")
    assert not wrong, "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_module_imports_a_cycle():
    # A package's __init__ re-exports its modules; an import of the package from one of them is not a cycle
    # of the design, so package faces are left out of the edges' targets within their own package.
    edges = {a: {b for b in targets if not (a.startswith(b + ".") and b in LAYERS_PACKAGES)}
             for a, targets in graph().items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


LAYERS_PACKAGES = {package for layer in LAYERS for package in layer}


def test_the_checks_catch_what_they_are_for():
    # Known answers for the two checks themselves: an upward import and a cycle are reported.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert layer_of("vitkit.model.vit")[0] < layer_of("vitkit.train.trainer")[0]
    assert layer_of("vitkit.train.config") == (LAYERS.index(["vitkit.train"]), "vitkit.train")


@pytest.mark.parametrize("argv", [["predict", "--help"], ["eval", "--help"]])
def test_predict_and_eval_do_not_load_the_training_machinery(argv):
    code = ("import sys, vitkit.cli as cli\n"
            "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in sys.modules if m in {TRAINING_MACHINERY!r}))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_predicting_an_image_does_not_load_the_training_machinery(tmp_path):
    code = f"""
import sys, torch
from PIL import Image
import vitkit
from vitkit.cli import main
model = vitkit.create_model("Ti/4", img_size=8, in_chans=1, num_classes=3, width=16, depth=1, heads=2, mlp_dim=32)
vitkit.save_weights(model, "{tmp_path}/m.safetensors")
Image.new("L", (8, 8), 128).save("{tmp_path}/x.png")
assert main(["predict", "--weights", "{tmp_path}/m.safetensors", "--device", "cpu", "{tmp_path}/x.png"]) == 0
print(sorted(m for m in sys.modules if m in {TRAINING_MACHINERY!r}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
