"""Load on `vitkit serve` over loopback: requests/s, latency percentiles, and the batches the server formed.

    .venv/bin/python benchmarks/serve_load.py --weights runs/fashion-mnist/model.safetensors
    .venv/bin/python benchmarks/serve_load.py --weights W --requests 2000 --concurrency 16 -- --precision fp32

Starts `vitkit serve` in its own process (options after `--` go to it) and waits for /healthz. Then
`--concurrency` clients (asyncio and httpx, one connection each) send `--requests` POST /predict requests in
all, each client one after another; each request uploads one of 16 random PNGs of the model's input size as the
multipart field `file`. Latency is from sending a request to reading its whole answer; requests/s is over the
whole run. The batch sizes the server formed come from its GET /stats. Writes docs/results/serve_load_<date>.md
and .json (with command, machine, date and commit) and exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from live_server import ServerDidNotStart, live_server
from provenance import header_lines, provenance, result_base, write_json


def test_images(channels: int, size: list[int], count: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    shape = (*size, channels) if channels == 3 else tuple(size)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


async def load(url: str, images: list[bytes], requests: int, concurrency: int) -> tuple[list[float], Counter, float]:
    """Latencies in seconds of the answered requests, answers by status (or error name), seconds for all."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    counter = iter(range(requests))

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as session:
            for i in counter:
                started = time.perf_counter()
                try:
                    response = await session.post("/predict", files={"file": ("x.png", images[i % len(images)],
                                                                                "image/png")})
                    outcomes[str(response.status_code)] += 1
                    if response.status_code == 200 and response.json()["top"]:
                        latencies.append(time.perf_counter() - started)
                except httpx.HTTPError as error:
                    outcomes[type(error).__name__] += 1

    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return latencies, outcomes, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="the weights to serve")
    parser.add_argument("--requests", type=int, default=2000, help="requests in all")
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending at once")
    parser.add_argument("--out", default="docs/results", help="where the report goes")
    parser.add_argument("serve_args", nargs="*", help="options for `vitkit serve`, after --")
    args = parser.parse_args()
    started = datetime.now(timezone.utc)
    try:
        with live_server(Path(args.weights), *args.serve_args, startup_s=120.0) as url:
            health = httpx.get(url + "/healthz").json()
            images = test_images(health["channels"], health["image_size"])
            httpx.post(url + "/predict", files={"file": ("x.png", images[0], "image/png")}, timeout=60.0)  # warm-up
            before = httpx.get(url + "/stats").json()
            latencies, outcomes, seconds = asyncio.run(load(url, images, args.requests, args.concurrency))
            stats = httpx.get(url + "/stats").json()
    except ServerDidNotStart as err:
        raise SystemExit(str(err)) from None
    sizes = Counter({int(k): v for k, v in stats["batch_sizes"].items()})
    sizes.subtract({int(k): v for k, v in before["batch_sizes"].items()})
    sizes = +sizes  # the load's batches only
    ok = outcomes.get("200", 0)
    record = {
        "benchmark": "vitkit serve under load",
        **provenance(started),
        "weights": args.weights, "precision": health["precision"], "image_size": health["image_size"],
        "serve_args": args.serve_args, "requests": args.requests, "concurrency": args.concurrency,
        "outcomes": dict(outcomes), "ok": ok, "failed": args.requests - ok, "seconds": seconds,
        "requests_per_s": ok / seconds,
        "latency_ms": {f"p{q}": 1000 * percentile(latencies, q) for q in (50, 95, 99)}
        | {"mean": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
           "max": 1000 * max(latencies, default=float("nan"))},
        "batch_sizes": {str(k): sizes[k] for k in sorted(sizes)},
        "mean_batch": sum(k * n for k, n in sizes.items()) / max(1, sum(sizes.values())),
    }
    base = result_base(args.out, "serve_load", started)
    write_json(record, base)
    base.with_suffix(".md").write_text(report(record))
    print(report(record))
    return 0 if record["failed"] == 0 else 1


def report(r: dict) -> str:
    lat = r["latency_ms"]
    batches = ", ".join(f"{k}: {v}" for k, v in r["batch_sizes"].items())
    return "\n".join([
        "# vitkit serve under load (loopback)", "",
        *header_lines(r),
        f"- weights: {r['weights']} ({r['image_size'][0]}x{r['image_size'][1]}), precision {r['precision']}, "
        f"serve options: {' '.join(r['serve_args']) or '(defaults)'}",
        f"- load: {r['requests']} POST /predict (multipart PNG) from {r['concurrency']} concurrent clients; "
        "client and server share the machine's cores", "",
        "| requests | ok | failed | requests/s | p50 ms | p95 ms | p99 ms | max ms | mean batch |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['requests']} | {r['ok']} | {r['failed']} | {r['requests_per_s']:.1f} | {lat['p50']:.1f} | "
        f"{lat['p95']:.1f} | {lat['p99']:.1f} | {lat['max']:.1f} | {r['mean_batch']:.2f} |", "",
        f"Batches formed (size: count): {batches}", f"Answers by status: {r['outcomes']}", ""])


if __name__ == "__main__":
    raise SystemExit(main())
