"""Do two revisions of vitkit train the same weights? Runs the same training commands with the code of an
earlier commit (a temporary git worktree) and with this checkout, and compares the SHA-256 of every weight.

    .venv/bin/python benchmarks/same_weights.py --before 896d6e4

The runs: the default recipe for 200 steps (compiled, bf16-mixed where the CPU has native bf16, as `auto`
chooses), the same in eager fp32, and a one-epoch fine-tune of the first run's weights on digits at 32 px.
Writes docs/results/same_weights_<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine, revision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "default recipe, 200 steps": ["train", "--run.max_steps", "200"],
    "default recipe, 200 steps, eager fp32": ["train", "--run.max_steps", "200", "--run.compile", "false",
                                              "--run.precision", "fp32"],
    "fine-tune on digits at 32 px, 1 epoch": ["finetune", "--weights", "{first}", "--data", "digits",
                                              "--resolution", "32", "--optim.epochs", "1"],
}


def digest(path: Path) -> str:
    """SHA-256 over every tensor's name and bytes, in name order."""
    tensors = load_file(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_all(src: Path, out: Path) -> dict[str, str]:
    """Every run of RUNS with the vitkit package in `src`; the digest of each run's final weights."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    digests, first = {}, None
    for i, (name, args) in enumerate(RUNS.items()):
        run_dir = out / f"run{i}"
        args = [a.replace("{first}", str(first)) for a in args]
        cmd = [sys.executable, "-m", "vitkit.cli", *args, "--run.out", str(run_dir), "--run.progress", "false",
               "--run.overwrite", "true"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out)
        if done.returncode:
            raise SystemExit(f"{name} failed with the code in {src}:\n{done.stderr[-2000:]}")
        digests[name] = digest(run_dir / "model.safetensors")
        first = first or run_dir / "model.safetensors"
        print(f"{src}: {name}: {digests[name]}", flush=True)
    return digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "before"), args.before],
                       check=True, capture_output=True)
        try:
            (tmp / "b").mkdir()
            (tmp / "a").mkdir()
            before = run_all(tmp / "before" / "src", tmp / "b")
            after = run_all(ROOT / "src", tmp / "a")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                           capture_output=True)
    after_commit, host = revision(), machine()
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# Same weights before and after the change ({args.before} -> {after_commit})", "",
             f"- command: `{' '.join(['.venv/bin/python', *sys.argv])}`",
             f"- date: {now.isoformat(timespec='seconds')}, before: {args.before}, after: {after_commit}",
             f"- machine: {host['cpu']}, {host['cores']} cores ({', '.join(host['isa'])}), torch {host['torch']}", "",
             "| run | before (SHA-256 of the weights) | after | identical |", "|---|---|---|---|"]
    for name in RUNS:
        lines.append(f"| {name} | `{before[name][:16]}` | `{after[name][:16]}` | "
                     f"{'yes' if before[name] == after[name] else 'NO'} |")
    path = Path(args.out) / f"same_weights_{now.strftime('%Y-%m-%d_%H%M')}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    if before != after:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
