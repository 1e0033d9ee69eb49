"""The page of `vitkit serve` in a real headless Chromium, against a real server process.

Chromium and its driver are Debian's `chromium` and `chromium-driver` (the README's set-up installs them). Without
them the test is skipped, except under CI=true, where a missing browser is a broken set-up and fails.

For the README's screenshot the same test runs on other weights and another image:
    VITKIT_BROWSER_WEIGHTS=model.safetensors VITKIT_BROWSER_IMAGE=image.png VITKIT_SCREENSHOT=docs/images/x.png \
        .venv/bin/python -m pytest tests/test_serve_browser.py
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from benchmark_scripts import benchmark_module

live_server = benchmark_module("live_server").live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
WAIT_S = 60


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        message = "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1000,640"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    if os.environ.get("VITKIT_BROWSER_WEIGHTS"):
        return Path(os.environ["VITKIT_BROWSER_WEIGHTS"])
    torch.manual_seed(0)
    model = vitkit.create_model("Ti/4", img_size=28, in_chans=1, num_classes=10, width=32, depth=2, heads=2,
                                mlp_dim=64)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    preprocess = {"mean": [0.5], "std": [0.5], "class_names": CLASSES}
    vitkit.save_weights(model, path, metadata={"vitkit_preprocess": json.dumps(preprocess)})
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    if os.environ.get("VITKIT_BROWSER_IMAGE"):
        return Path(os.environ["VITKIT_BROWSER_IMAGE"])
    # A bright blob on a dark ground, so that the page shows something one can recognise.
    y, x = np.mgrid[0:28, 0:28]
    pixels = (255 * np.exp(-((y - 12) ** 2 + (x - 15) ** 2) / 60.0)).astype(np.uint8)
    path = tmp_path / "blob.png"
    Image.fromarray(pixels).save(path)
    return path


def wait_for(driver, script: str):
    """The value of the JavaScript expression `script` once it is truthy."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(f"return {script};"))


OVERLAY_SPREAD = """
const img = document.getElementById("overlay");
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext("2d");
context.drawImage(img, 0, 0);
const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
let sum = 0, squares = 0, n = 0;
for (let i = 0; i < data.length; i += 4) {
  for (let c = 0; c < 3; c++) { sum += data[i + c]; squares += data[i + c] ** 2; n++; }
}
return [canvas.width, canvas.height, Math.sqrt(squares / n - (sum / n) ** 2)];
"""


def test_the_page_shows_the_top_k_and_the_overlay(browser, weights, image, tmp_path):
    from selenium.webdriver.common.by import By

    with live_server(weights, "--precision", "fp32") as url:
        expected = httpx.post(url + "/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
        expected_top = expected.json()["top"]
        browser.get(url + "/")
        assert "classes" in wait_for(browser, "document.getElementById('model').textContent.includes('classes')"
                                     " && document.getElementById('model').textContent")
        browser.find_element(By.ID, "file").send_keys(str(image.resolve()))
        wait_for(browser, "document.querySelectorAll('#top li').length > 0")
        wait_for(browser, "document.getElementById('overlay').complete"
                          " && document.getElementById('overlay').naturalWidth > 0")
        labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#top .label")]
        assert labels == [entry["class"] for entry in expected_top]
        widths = browser.execute_script(
            "return [...document.querySelectorAll('#top .bar')].map(b => parseFloat(b.style.width));")
        np.testing.assert_allclose(widths, [100 * entry["probability"] for entry in expected_top], atol=0.051)
        status = browser.find_element(By.ID, "status").text
        assert status == f"{image.name}: {expected_top[0]['class']}"
        width, height, spread = browser.execute_script(OVERLAY_SPREAD)
        assert (width, height) == (224, 224) and spread > 10  # an image, and not a blank one

        screenshot = base64.b64decode(browser.get_screenshot_as_base64())
        assert np.asarray(Image.open(io.BytesIO(screenshot)).convert("L"), dtype=float).std() > 5
        target = os.environ.get("VITKIT_SCREENSHOT")
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_bytes(screenshot)

        # A file that is not an image: the page says what the server said, and the next image works again.
        text = tmp_path / "notes.png"
        text.write_text("not an image")
        browser.find_element(By.ID, "file").send_keys(str(text))
        message = wait_for(browser, "document.getElementById('status').className === 'error'"
                                    " && document.getElementById('status').textContent")
        assert message.startswith("422:") and "not an image format" in message
        browser.find_element(By.ID, "file").send_keys(str(image.resolve()))
        wait_for(browser, f"document.getElementById('status').textContent === {json.dumps(status)}")
