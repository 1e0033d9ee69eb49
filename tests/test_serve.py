"""`vitkit serve`'s application through an in-process client, and its batch queue: known answers and refusals."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from image_corpus import huge_png_bytes, truncated_bytes
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.data import eval_transform, load_image
from vitkit.inspect import attention_rollout, overlay_image
from vitkit.serve import ServeOptions, build_app
from vitkit.serve.batching import BatchQueue, QueueFullError

CLASSES = [f"class {i}" for i in range(10)]
MEAN, STD = [0.25], [0.5]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Tiny 1-channel 28 x 28 weights (7 x 7 patches, 2 blocks) with a random head, so that classes differ."""
    torch.manual_seed(0)
    model = vitkit.create_model("Ti/4", img_size=28, in_chans=1, num_classes=10, width=32, depth=2, heads=2,
                                mlp_dim=64)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    preprocess = {"mean": MEAN, "std": STD, "class_names": CLASSES}
    vitkit.save_weights(model, path, metadata={"vitkit_preprocess": json.dumps(preprocess)})
    return path


@pytest.fixture(scope="module")
def client(weights):
    app = build_app(ServeOptions(weights=str(weights), precision="fp32", max_upload_mb=1.0, max_pixels=1_000_000,
                                 topk=3))
    with TestClient(app) as test_client:  # the context runs the lifespan: the batch queue starts and stops
        yield test_client


def png(shape: tuple[int, ...], seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def reference_probabilities(weights: Path, data: bytes, tmp_path: Path) -> torch.Tensor:
    """The model's class probabilities for an image file, computed without the server."""
    model, _ = vitkit.load_pretrained(str(weights))
    path = tmp_path / "image.png"
    path.write_bytes(data)
    image = eval_transform(tuple(MEAN), tuple(STD), (28, 28))(load_image(path, mode="L"))
    with torch.no_grad():
        return model.eval()(image.unsqueeze(0)).softmax(-1)[0]


def post_file(client, route: str, data: bytes, name: str = "x.png", kind: str = "image/png", **params):
    return client.post(route, files={"file": (name, data, kind)}, params=params)


def test_predict_gives_the_models_top_k(client, weights, tmp_path):
    data = png((40, 30, 3), seed=1)  # RGB and not 28 x 28: converted to grey and resized as `vitkit predict` does
    response = post_file(client, "/predict", data, name="shirt.png")
    assert response.status_code == 200, response.text
    answer = response.json()
    probs = reference_probabilities(weights, data, tmp_path)
    expected = probs.topk(3)
    assert answer["image"] == "shirt.png"
    assert [entry["class"] for entry in answer["top"]] == [CLASSES[i] for i in expected.indices.tolist()]
    np.testing.assert_allclose([entry["probability"] for entry in answer["top"]], expected.values.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_the_body_and_the_form_give_the_same_answer(client):
    data = png((28, 28), seed=2)
    as_form = post_file(client, "/predict", data).json()["top"]
    for kind in ("image/png", "application/octet-stream"):
        as_body = client.post("/predict", content=data, headers={"content-type": kind})
        assert as_body.status_code == 200, as_body.text
        assert as_body.json()["top"] == as_form
        assert as_body.json()["image"] == "the request body"


def test_topk_is_taken_from_the_request(client):
    data = png((28, 28), seed=3)
    assert len(post_file(client, "/predict", data, topk=1).json()["top"]) == 1
    every = post_file(client, "/predict", data, topk=50).json()["top"]  # more than there are: all of them, ranked
    assert sorted(entry["class"] for entry in every) == sorted(CLASSES)
    probabilities = [entry["probability"] for entry in every]
    assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 1e-5
    assert post_file(client, "/predict", data, topk=0).status_code == 422


def test_explain_returns_the_rollout_overlay(client, weights, tmp_path):
    data = png((28, 28), seed=4)
    response = post_file(client, "/explain", data)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert served.shape == (224, 224, 3)  # 28 pixels enlarged 8 times
    model, _ = vitkit.load_pretrained(str(weights))
    path = tmp_path / "image.png"
    path.write_bytes(data)
    image = eval_transform(tuple(MEAN), tuple(STD), (28, 28))(load_image(path, mode="L"))
    expected = overlay_image(image, attention_rollout(model.eval(), image.unsqueeze(0)).maps[0], MEAN, STD)
    np.testing.assert_array_equal(served, expected)
    assert served.std() > 10  # not blank


def test_overlay_image_blends_the_peak_in_the_colour_map():
    image = torch.zeros(1, 2, 2)  # black after denormalising with mean 0, std 1
    attention = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    picture = overlay_image(image, attention, [0.0], [1.0], min_side=4)  # 2 px -> 4 px: each pixel twice
    assert picture.shape == (4, 4, 3) and picture.dtype == np.uint8
    # The bottom-right corner holds the map's peak: jet's top colour (dark red, 0.5, 0, 0) at half strength.
    np.testing.assert_array_equal(picture[3, 3], [64, 0, 0])
    assert picture[0, 0, 2] > 0 and picture[0, 0, 0] == 0  # the map's zero: jet's bottom colour, dark blue


def test_healthz_and_the_page(client, weights):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["classes"] == CLASSES and health["precision"] == "fp32"
    assert health["int8_calibrated"] is False
    assert health["image_size"] == [28, 28] and health["channels"] == 1 and health["weights"] == str(weights)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and 'fetch("predict"' in page.text


BAD_UPLOADS = {
    "not an image": (lambda: post_file_args(b"this is text, not a PNG", "image/png"), 422, "not an image format"),
    "truncated": (lambda: post_file_args(truncated_bytes("PNG"), "image/png"), 422, "cannot read image"),
    "empty file": (lambda: post_file_args(b"", "image/png"), 422, "empty"),
    "empty body": (lambda: {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    "50 MB": (lambda: {"content": b"\0" * 50_000_000, "headers": {"content-type": "image/png"}}, 413, "1 MB"),
    "50 MB form": (lambda: post_file_args(b"\0" * 50_000_000, "image/png"), 413, "--max_upload_mb"),
    "decompression bomb": (lambda: post_file_args(huge_png_bytes(), "image/png"), 422, "over the limit"),
    "JSON": (lambda: {"content": b'{"image": 1}', "headers": {"content-type": "application/json"}}, 415, "json"),
    "no content type": (lambda: {"content": png((28, 28), 5)}, 415, "(none)"),
    "form without file": (lambda: {"files": {"image": ("x.png", png((28, 28), 5), "image/png")}}, 400,
                          "field named 'file'"),
}


def post_file_args(data: bytes, kind: str) -> dict:
    return {"files": {"file": ("upload.png", data, kind)}}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_gets_a_4xx_and_the_next_request_succeeds(client, case):
    make, status, words = BAD_UPLOADS[case]
    response = client.post("/predict", **make())
    assert response.status_code == status, response.text
    assert words.lower() in response.json()["detail"].lower()
    assert post_file(client, "/predict", png((28, 28), seed=6)).status_code == 200


def test_every_route_refuses_alike(client):
    response = client.post("/explain", content=b"garbage", headers={"content-type": "image/jpeg"})
    assert response.status_code == 422 and "cannot read image the request body" in response.json()["detail"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(weights):
    app = build_app(ServeOptions(weights=str(weights), precision="fp32", max_batch=8, max_wait_ms=200))
    images = [png((28, 28), seed=100 + i) for i in range(8)]
    with TestClient(app) as client:
        alone = [post_file(client, "/predict", data).json()["top"] for data in images]
        before = dict(client.get("/stats").json()["batch_sizes"])
        assert before == {"1": 8}

        with ThreadPoolExecutor(len(images)) as pool:  # the test client is thread-safe: one event loop serves all
            answers = list(pool.map(lambda data: post_file(client, "/predict", data), images))
        stats = client.get("/stats").json()
    for single, batched in zip(alone, answers):
        assert [e["class"] for e in batched.json()["top"]] == [e["class"] for e in single]
        np.testing.assert_allclose([e["probability"] for e in batched.json()["top"]],
                                   [e["probability"] for e in single], rtol=1e-4, atol=1e-6)
    assert stats["images"] == 16 and stats["batches"] < 16  # the eight sent together shared batches


# ---- the batch queue ----

def run_queue(coroutine_factory):
    return asyncio.run(coroutine_factory())


def test_the_queue_batches_waiting_inputs_up_to_max_batch():
    seen: list[list[int]] = []

    def double(items):
        seen.append(list(items))
        time.sleep(0.05)
        return [2 * x for x in items]

    async def scenario():
        queue = BatchQueue(double, max_batch=4, max_wait=0.05, capacity=100)
        await queue.start()
        results = await asyncio.gather(*[queue.submit(i) for i in range(10)])
        await queue.stop()
        return results, queue.batch_sizes

    results, sizes = run_queue(scenario)
    assert results == [2 * i for i in range(10)]
    assert max(len(batch) for batch in seen) == 4 and sorted(x for batch in seen for x in batch) == list(range(10))
    assert sizes == {4: 2, 2: 1}


def test_a_full_queue_refuses_at_once():
    async def scenario():
        queue = BatchQueue(lambda items: (time.sleep(0.2), list(items))[1], max_batch=1, max_wait=0, capacity=2)
        await queue.start()
        tasks = [asyncio.create_task(queue.submit(0))]
        await asyncio.sleep(0.05)  # the first is running: the queue is empty again
        tasks += [asyncio.create_task(queue.submit(i)) for i in range(1, 4)]  # two wait; the third finds it full
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await queue.stop()
        return outcomes, queue.rejected

    outcomes, rejected = run_queue(scenario)
    assert [o for o in outcomes if not isinstance(o, Exception)] == [0, 1, 2]
    assert isinstance(outcomes[3], QueueFullError) and rejected == 1


def test_a_cancelled_request_is_left_out_and_a_failing_batch_fails_only_its_requests():
    seen: list[list[int]] = []

    def run(items):
        seen.append(list(items))
        time.sleep(0.1)
        if -1 in items:
            raise RuntimeError("boom")
        return list(items)

    async def scenario():
        queue = BatchQueue(run, max_batch=8, max_wait=0, capacity=10)
        await queue.start()
        first = asyncio.create_task(queue.submit(0))  # runs alone while the next ones queue up
        await asyncio.sleep(0.02)
        abandoned = asyncio.create_task(queue.submit(1))
        kept = asyncio.create_task(queue.submit(2))
        await asyncio.sleep(0.01)
        abandoned.cancel()  # as a request timeout does
        await asyncio.sleep(0.2)
        failing = await asyncio.gather(queue.submit(-1), return_exceptions=True)
        after = await queue.submit(3)
        await queue.stop()
        return await first, await kept, failing, after

    first, kept, failing, after = run_queue(scenario)
    assert (first, kept, after) == (0, 2, 3)
    assert [2] in seen and not any(1 in batch for batch in seen)
    assert isinstance(failing[0], RuntimeError)


@pytest.mark.parametrize("arguments", [dict(max_batch=0), dict(max_wait=-1), dict(capacity=0)])
def test_the_queue_refuses_bad_limits(arguments):
    with pytest.raises(ValueError, match=next(iter(arguments))):
        BatchQueue(list, **arguments)


# ---- options ----

def test_auto_is_chosen_at_the_largest_batch_and_reported(weights, monkeypatch, tmp_path):
    import vitkit.fastest_mode as fastest_mode

    monkeypatch.setenv("VITKIT_CACHE_DIR", str(tmp_path / "cache"))
    app = build_app(ServeOptions(weights=str(weights), max_batch=4))  # precision auto, the default
    assert app.state.precision in fastest_mode.candidates(torch.device("cpu"))
    if len(fastest_mode.candidates(torch.device("cpu"))) > 1:  # timed once, at the batch requests are gathered into
        entries = json.loads((tmp_path / "cache" / fastest_mode.CACHE_FILE).read_text()).values()
        # the precision's own entry; fp32's linears and int8's attention may have been timed too, under their keys
        (entry,) = [e for e in entries if not {"fp32_linears", "int8_attention"} & set(e["key"])]
        assert entry["key"]["batch"] == 4 and entry["precision"] == app.state.precision


@pytest.mark.parametrize("option, value", [("port", "0"), ("port", "70000"), ("max_batch", "0"), ("topk", "0"),
                                           ("max_upload_mb", "0"), ("timeout_s", "-1"), ("max_wait_ms", "-5")])
def test_bad_options_name_the_value(weights, capsys, option, value):
    assert main(["serve", "--weights", str(weights), f"--{option}", value]) != 0
    err = capsys.readouterr().err
    assert f"--{option}" in err and value in err


def test_missing_weights_are_named(tmp_path, capsys):
    assert main(["serve", "--weights", str(tmp_path / "none.safetensors")]) != 0
    assert "none.safetensors" in capsys.readouterr().err


def test_the_command_line_does_not_load_the_web_stack():
    code = "import sys, vitkit.cli; print(any(m.split('.')[0] in ('fastapi', 'uvicorn') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("compile, max_batch, warmed", [(True, 8, [1, 2]), (True, 1, [1]), (False, 8, [])])
def test_a_compiled_server_compiles_before_it_opens(weights, monkeypatch, compile, max_batch, warmed):
    # torch compiles batch 1 apart and one graph for every larger batch: after batches 1 and 2 no request waits.
    from vitkit.inference import ImageClassifier

    seen = []
    original = ImageClassifier.probabilities
    monkeypatch.setattr(ImageClassifier, "probabilities",
                        lambda self, images: seen.append(images.shape) or original(self, images))
    monkeypatch.setattr(torch, "compile", lambda model, **_: model)  # the calls, not the compilation, are checked
    build_app(ServeOptions(weights=str(weights), precision="fp32", compile=compile, max_batch=max_batch))
    assert seen == [(n, 1, 28, 28) for n in warmed]
