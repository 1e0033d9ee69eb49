"""What capturing attention costs: `forward_intermediates(attention=True)` against the plain forward.

    .venv/bin/python benchmarks/capture_overhead.py

Interleaved rounds in one process, medians, for the default Fashion-MNIST shape (patch 4, width 128, depth 4,
batch 128 at 28 px) and S/16 at 224 px (batch 8), eval mode, fp32, no gradients. The plain forward takes the
fused attention kernel; capturing computes the attention probabilities explicitly to return them. Writes
docs/results/capture_overhead_<date>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from provenance import machine, revision

import vitkit

SHAPES = {
    "Fashion-MNIST default (Ti/4 width 128, depth 4), batch 128, 28 px":
        (dict(name="Ti/4", img_size=28, in_chans=1, num_classes=10, width=128, depth=4, heads=4, mlp_dim=256),
         (128, 1, 28, 28)),
    "S/16, batch 8, 224 px": (dict(name="S/16", num_classes=1000), (8, 3, 224, 224)),
}


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = datetime.now(timezone.utc)
    host = machine()
    lines = ["# The cost of capturing attention (forward_intermediates(attention=True))", "",
             f"- command: `{' '.join(['.venv/bin/python', *sys.argv])}`",
             f"- date: {started.isoformat(timespec='seconds')}, commit {revision()}",
             f"- machine: {host['cpu']}, {host['cores']} cores ({', '.join(host['isa'])}), torch {host['torch']} "
             f"with {torch.get_num_threads()} threads",
             f"- medians of {args.rounds} interleaved rounds after 3 warm-up calls; fp32, eval mode, no gradients", "",
             "| shape | plain forward (ms) | forward_intermediates, attention captured (ms) | overhead |",
             "|---|---|---|---|"]
    with torch.inference_mode():
        for label, (kwargs, shape) in SHAPES.items():
            name = kwargs.pop("name")
            model = vitkit.create_model(name, **kwargs).eval()
            x = torch.randn(shape)
            plain = lambda images: model(images)  # noqa: E731
            capture = lambda images: model.forward_intermediates(images, attention=True)  # noqa: E731
            for fn in (plain, capture) * 3:
                fn(x)
            times = {"plain": [], "capture": []}
            for _ in range(args.rounds):
                times["plain"].append(timed(plain, x))
                times["capture"].append(timed(capture, x))
            p, c = statistics.median(times["plain"]), statistics.median(times["capture"])
            lines.append(f"| {label} | {1000 * p:.1f} | {1000 * c:.1f} | {c / p:.2f}x |")
    out = Path(args.out) / f"capture_overhead_{started.strftime('%Y-%m-%d_%H%M')}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
