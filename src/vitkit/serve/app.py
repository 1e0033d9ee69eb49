"""The HTTP application of `vitkit serve`: FastAPI routes over an ImageClassifier and a BatchQueue.

An upload is the multipart form field `file`, or the image's bytes as the request body (an image/* or
application/octet-stream type). Every refusal is a 4xx whose JSON `detail` says what was wrong and what to send
instead; the server keeps serving. The status codes:
400 no image in the request; 408 the upload arrived too slowly; 413 the body is over --max_upload_mb;
415 a content type that cannot hold an image; 422 bytes that are not a readable image, or one over --max_pixels;
503 the queue is full (retry after a second); 504 the model did not answer within --timeout_s.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from vitkit.data import BadImageError, decode_image
from vitkit.inference import ImageClassifier
from vitkit.inspect import attention_rollout, overlay_image
from vitkit.serve.batching import BatchQueue, QueueFullError
from vitkit.serve.options import ServeOptions

IMAGE_BODY_TYPES = ("application/octet-stream",)
"""Body types taken as an image's bytes, besides image/*."""

DRAIN_FACTOR = 4
"""An upload over the limit is read on (and thrown away) up to this many times the limit before the 413 goes out:
a client that is still sending when the server answers and closes would see a broken connection, not the 413."""


def create_app(classifier: ImageClassifier, opts: ServeOptions) -> FastAPI:
    """The application serving `classifier` with the limits of `opts`."""
    queue: BatchQueue[torch.Tensor, torch.Tensor] = BatchQueue(
        classifier_batch(classifier), opts.max_batch, opts.max_wait_ms / 1000, opts.queue_size)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await queue.start()
        yield
        await queue.stop()

    app = FastAPI(title="vitkit serve", lifespan=lifespan,
                  description="A Vision Transformer classifier: POST an image to /predict or /explain.")
    app.state.queue = queue
    app.state.precision = classifier.runner.precision
    page = (resources.files("vitkit.serve") / "page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/healthz")
    def healthz() -> dict:
        """Whether the server is up, and what it serves."""
        cfg = classifier.model.cfg
        return {"status": "ok", "weights": opts.weights, "precision": classifier.runner.precision,
                "int8_calibrated": classifier.runner.int8_calibrated, "image_size": list(cfg.img_size),
                "channels": cfg.in_chans, "classes": classifier.class_names}

    @app.get("/stats")
    def stats() -> dict:
        """Batches run by size, requests waiting now, and requests refused because the queue was full."""
        sizes = queue.batch_sizes
        return {"batches": sum(sizes.values()), "images": sum(k * n for k, n in sizes.items()),
                "batch_sizes": {str(k): sizes[k] for k in sorted(sizes)}, "waiting": queue.waiting,
                "rejected": queue.rejected}

    @app.post("/predict")
    async def predict(request: Request, topk: int | None = Query(None, ge=1, description="classes to return")) -> dict:
        """The top-k classes of the uploaded image, most probable first."""
        image, name = await read_image(request, classifier, opts)
        try:
            probs = await within(opts.timeout_s, queue.submit(image))
        except QueueFullError as error:
            raise HTTPException(503, f"the server is busy ({error}): retry shortly",
                                headers={"Retry-After": "1"}) from None
        ranked = classifier.ranked(probs, topk or opts.topk)
        return {"image": name, "top": [{"class": c, "probability": p} for c, p in ranked]}

    @app.post("/explain", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def explain(request: Request) -> Response:
        """A PNG of the uploaded image with its attention-rollout overlay (the paper's figure 6)."""
        image, _ = await read_image(request, classifier, opts)
        png = await within(opts.timeout_s, queue.call(explanation_png, classifier, image))
        return Response(png, media_type="image/png")

    return app


def classifier_batch(classifier: ImageClassifier):
    """The batch function of the queue: prepared images (C, h, w) -> their class probabilities (classes,)."""

    def run(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(classifier.probabilities(torch.stack(list(images))).cpu())

    return run


def explanation_png(classifier: ImageClassifier, image: torch.Tensor) -> bytes:
    """The prepared image (C, h, w) with its attention rollout over it, as PNG bytes."""
    with torch.inference_mode():
        rollout = attention_rollout(classifier.model, image.unsqueeze(0).to(classifier.device))
    picture = overlay_image(image, rollout.maps[0], classifier.mean, classifier.std)  # (H', W', 3) uint8
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


async def within(seconds: float, awaitable):
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise HTTPException(504, f"the model did not answer within {seconds:g} s (--timeout_s); "
                                 "the server is overloaded or the image too large: retry later") from None


async def read_image(request: Request, classifier: ImageClassifier, opts: ServeOptions) -> tuple[torch.Tensor, str]:
    """The request's image, decoded safely and prepared for the model, and the name it came under."""
    try:
        data, name = await asyncio.wait_for(read_upload(request, opts.max_upload_bytes), opts.timeout_s)
    except TimeoutError:
        raise HTTPException(408, f"the upload did not arrive within {opts.timeout_s:g} s (--timeout_s)") from None
    def prepared() -> torch.Tensor:  # decoding and resizing a large image take a while: not on the event loop
        return classifier.prepare(decode_image(data, classifier.image_mode, name=name, max_pixels=opts.max_pixels))

    try:
        return await run_in_threadpool(prepared), name
    except BadImageError as error:
        raise HTTPException(422, f"{error}. Send a PNG, JPEG, GIF, BMP, TIFF or WebP image.") from None


async def read_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and name, from a multipart form's `file` field or from the whole body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = kind == "multipart/form-data"
    if not (multipart or kind.startswith("image/") or kind in IMAGE_BODY_TYPES):
        raise HTTPException(415, f"content type {kind or '(none)'!r} cannot hold an image: send a multipart form "
                                 "with the image in the field 'file', or the image's bytes as the body with its "
                                 "image/* type or application/octet-stream")
    body = await read_body(request, limit)
    if not multipart:
        if not body:
            raise HTTPException(400, "the request body is empty: send the image's bytes")
        return body, "the request body"
    form = await Request(request.scope, replay(body)).form(max_files=1, max_fields=10)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "the multipart form has no file in a field named 'file': "
                                 "send the image as the form field 'file'")
    data = await upload.read()
    await form.close()
    return data, upload.filename or "the uploaded file"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 once it is over `limit` bytes (as declared, or as received)."""
    declared = request.headers.get("content-length", "")
    over = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        over = over or size > limit
        if over:  # read on without keeping anything, so that the client gets to read the answer
            chunks.clear()
            if size > DRAIN_FACTOR * limit:
                break
            continue
        chunks.append(chunk)
    if over:
        raise HTTPException(413, f"the upload is over the limit of {limit / 1e6:g} MB (--max_upload_mb)")
    return b"".join(chunks)


def replay(body: bytes):
    """An ASGI `receive` that hands over `body`, already read, in one message."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
