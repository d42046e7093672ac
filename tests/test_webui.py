"""The web UI end to end: a real uvicorn server with the bundled model on a free loopback port, and
Debian's chromium driven headless by Playwright. Set ``SFUMATO_UPDATE_DOCS=1`` to rewrite the
screenshot ``docs/webui.png``."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import sfumato
from conftest import live_server
from sfumato.server.app import ServerConfig, create_app
from sfumato.train.judge import judge

PROMPT = "a red circle on a blue background"
STEPS = 20                                   # ~1 s for the bundled model at 64×64
SEED = 3
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "webui.png"
TIMEOUT_MS = 20_000


def _chromium() -> str:
    path = os.environ.get("SFUMATO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the web UI test needs Debian's chromium: apt-get install chromium "
                    "(or set SFUMATO_CHROMIUM to a Chromium binary)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def pipe():
    return sfumato.load()


@pytest.fixture(scope="module")
def url(pipe):
    with live_server(create_app(ServerConfig(), pipeline=pipe)) as port:
        yield f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the web UI test needs Playwright: pip install -e '.[dev]' "
                    "(its Python package only; it drives Debian's chromium)", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    status = page.locator("#status")
    status.filter(has_text=re.compile("^ready$")).wait_for()
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _decode(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix), data_url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):])))
    image.load()
    return image


def test_generate_shows_the_image_and_its_parameters(page, pipe):
    assert page.locator("#model").input_value().startswith("bundled.safetensors")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", str(STEPS))
    page.fill("#seed", str(SEED))
    page.select_option("#sampler_name", "Euler a")
    page.click("#generate")
    img = page.locator("#gallery figure img")
    img.wait_for()
    page.wait_for_function("() => { const i = document.querySelector('#gallery figure img');"
                           " return i.complete && i.naturalWidth > 0; }")
    assert img.count() == 1
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
    box = img.bounding_box()
    assert box["width"] >= 128 and box["height"] >= 128          # shown enlarged, not as a speck
    page.locator("#status").filter(has_text=re.compile("^done$")).wait_for()
    assert page.locator("#generate").is_enabled() and page.locator("#interrupt").is_disabled()

    caption = page.locator("#gallery figcaption pre").inner_text()
    assert caption.startswith(PROMPT + "\n")
    assert f"Steps: {STEPS}," in caption and f"Seed: {SEED}," in caption
    assert "Sampler: Euler a" in caption and "Size: 64x64" in caption

    image = _decode(img.get_attribute("src"))
    assert image.size == (64, 64) and image.info["parameters"] == caption
    pixels = np.asarray(image.convert("RGB"))
    verdict = judge(PROMPT, pixels)
    assert verdict["background_ok"] and verdict["count_ok"], verdict
    direct = pipe.txt2img(PROMPT, seed=SEED, steps=STEPS, sampler="Euler a", cfg_scale=7, width=64, height=64)
    assert np.array_equal(pixels, np.asarray(direct.images[0]))

    if os.environ.get("SFUMATO_UPDATE_DOCS") == "1":
        page.mouse.move(0, 0)
        shot = page.screenshot(type="png")
        tmp = SCREENSHOT.with_suffix(".png.tmp")
        tmp.write_bytes(shot)
        os.replace(tmp, SCREENSHOT)

    page.fill("#seed", "-1")
    page.fill("#steps", "7")
    page.get_by_role("button", name="Reuse settings").click()
    page.locator("#status").filter(has_text="parameters read from the image").wait_for()
    assert page.input_value("#seed") == str(SEED) and page.input_value("#steps") == str(STEPS)
    page.get_by_role("button", name="Send to img2img").click()
    assert page.locator("#img2img-fields").is_visible()
    page.wait_for_function("() => document.getElementById('init-canvas').getContext('2d')"
                           ".getImageData(32, 32, 1, 1).data[3] === 255")
    canvas = page.evaluate("() => [...document.getElementById('init-canvas').getContext('2d')"
                           ".getImageData(0, 0, 64, 64).data]")
    assert np.array_equal(np.array(canvas, np.uint8).reshape(64, 64, 4)[..., :3], pixels)


def _png_with_parameters(text: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", text)
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (230, 200, 40)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _drop(page, selector: str, png: bytes) -> None:
    """Drop ``png`` as a file on the element ``selector``, as a user dragging it from a file manager."""
    transfer = page.evaluate_handle(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            return transfer;
        }""", base64.b64encode(png).decode())
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_a_dropped_png_fills_the_form(page):
    page.fill("#negative_prompt", "left over from before")
    text = ("a green square on a yellow background\n"
            "Steps: 13, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 1234, Size: 64x48")
    _drop(page, "footer", _png_with_parameters(text))
    page.locator("#status").filter(has_text="parameters read from the image").wait_for()
    assert page.input_value("#prompt") == "a green square on a yellow background"
    assert page.input_value("#negative_prompt") == ""
    assert page.input_value("#steps") == "13" and page.input_value("#cfg_scale") == "5.5"
    assert page.input_value("#seed") == "1234"
    assert page.input_value("#width") == "64" and page.input_value("#height") == "48"
    assert page.input_value("#sampler_name") == "DPM++ 2M"
    assert page.input_value("#scheduler") == "karras"
    assert not page.evaluate("document.body.classList.contains('dragging')")


def test_a_pre_1_9_sampler_name_carries_the_schedule(page):
    _drop(page, "footer", _png_with_parameters("a prompt\nSteps: 9, Sampler: DPM++ 2M Karras, Seed: 1, Size: 64x64"))
    page.locator("#status").filter(has_text="parameters read from the image").wait_for()
    assert page.input_value("#sampler_name") == "DPM++ 2M"
    assert page.input_value("#scheduler") == "karras"


def test_a_png_dropped_on_the_canvas_becomes_the_init_image(page):
    page.click("button[data-mode=img2img]")
    _drop(page, "#canvas-wrap", _png_with_parameters("a prompt\nSteps: 9, Seed: 1, Size: 64x48"))
    page.wait_for_function("() => document.getElementById('init-canvas').height === 48")
    corner = page.evaluate("() => [...document.getElementById('init-canvas').getContext('2d')"
                           ".getImageData(0, 0, 1, 1).data]")
    assert corner == [230, 200, 40, 255]
    assert page.input_value("#width") == "64" and page.input_value("#height") == "48"
    assert page.input_value("#steps") == "20"            # the canvas takes the image, not its parameters


def test_a_png_without_parameters_is_reported(page):
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    page.fill("#prompt", "kept")
    _drop(page, "footer", out.getvalue())
    status = page.locator("#status.error")
    status.wait_for()
    assert "no generation parameters" in status.inner_text()
    assert page.input_value("#prompt") == "kept"


def test_an_unknown_sampler_in_a_png_is_reported(page):
    before = page.input_value("#sampler_name")
    _drop(page, "footer", _png_with_parameters("a prompt\nSteps: 9, Sampler: Nonexistent, Seed: 1, Size: 64x64"))
    status = page.locator("#status.error")
    status.wait_for()
    assert "Nonexistent" in status.inner_text()
    assert page.input_value("#sampler_name") == before


def test_interrupt_stops_the_running_job_and_keeps_what_it_made(page):
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "150")
    page.fill("#n_iter", "16")                       # minutes of work unless the button stops it
    page.click("#generate")
    page.locator("#status").filter(has_text=re.compile(r"step \d+/150")).wait_for()
    assert page.locator("#generate").is_disabled()
    started = time.monotonic()
    page.click("#interrupt")
    page.locator("#status").filter(has_text=re.compile("^interrupted$")).wait_for(timeout=10_000)
    assert time.monotonic() - started < 10
    assert page.locator("#gallery figure").count() >= 1      # as A1111: the images made so far stay
    assert page.locator("#generate").is_enabled() and page.locator("#interrupt").is_disabled()
    assert page.locator("#preview").is_hidden()
