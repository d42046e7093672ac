"""Every panel of the web UI end to end, in headless Chromium against a live server with the
bundled model (64×64, a few steps), a models folder of stand-in files and an outputs folder.
Set ``SFUMATO_UPDATE_DOCS=1`` to rewrite the screenshots ``docs/webui-<panel>.png``."""

from __future__ import annotations

import io
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import live_server
from sfumato.server.app import ServerConfig, create_app
from test_webui import TIMEOUT_MS, _decode, browser, pipe  # noqa: F401 — fixtures

DOCS = Path(__file__).resolve().parents[1] / "docs"
MAX_SHOT = 150_000
STEPS = 4
BUNDLED = re.compile(r"^bundled\.safetensors")


def _png(size=(64, 48), color=(230, 200, 40)) -> bytes:
    """A flat ``color`` with a dark disc in the middle."""
    image = Image.new("RGB", size, color)
    w, h = size
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(40, 30, 90))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _file(png: bytes, name: str = "image.png") -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": png}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    models = root / "models"
    for sub, name in (("Lora", "mini.safetensors"), ("hypernetworks", "hyper.pt")):
        (models / sub).mkdir(parents=True)
        (models / sub / name).write_bytes(b"stand-in")     # listed by name; never loaded here
    (models / "sam").mkdir()
    import torch

    from test_sam import reference_sam

    torch.save(reference_sam().state_dict(), models / "sam" / "sam_tiny.pth")   # a tiny random SAM
    from test_detail import yolo_onnx

    (models / "adetailer").mkdir()
    yolo_onnx(models / "adetailer" / "face_yolov8n.onnx")   # a detector that always finds the same two boxes
    from sfumato.checkpoint.io import save_file
    from sfumato.models.motion import MotionAdapter, MotionConfig

    (models / "animatediff").mkdir()
    torch.manual_seed(0)   # a random motion module at the bundled UNet's widths
    adapter = MotionAdapter(MotionConfig(channels=(48, 96, 96), per_down=1, mid=False, groups=16))
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, models / "animatediff" / "mm_tiny.safetensors")
    (models / "styles.csv").write_text("name,prompt,negative_prompt\n"
                                       'reddish,"{prompt}, reddish",blurry\nsoft,"soft light",\n')
    return models, root / "outputs"


@pytest.fixture(scope="module")
def url(pipe, folders):  # noqa: F811
    models, outputs = folders
    with live_server(create_app(ServerConfig(models_dir=models, outputs_dir=outputs), pipeline=pipe)) as port:
        yield f"http://127.0.0.1:{port}/"


def _open(browser, url, viewport=(1280, 800), before=None):  # noqa: F811
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    if before:
        before(page)
    page.goto(url)
    page.locator("#status").filter(has_text=re.compile("^ready$")).wait_for()
    return context, page, errors


@pytest.fixture
def page(browser, url):  # noqa: F811
    context, page, errors = _open(browser, url)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _shot(page, name: str, at: str | None = None) -> None:
    """Rewrite ``docs/webui-<name>.png`` when SFUMATO_UPDATE_DOCS=1 (small: under 150 KB), the page
    scrolled to its top or to the element ``at``."""
    if os.environ.get("SFUMATO_UPDATE_DOCS") != "1":
        return
    page.mouse.move(0, 0)
    if at:
        page.locator(at).evaluate("e => e.scrollIntoView({block: 'start'})")
    else:
        page.evaluate("window.scrollTo(0, 0)")
    image = Image.open(io.BytesIO(page.screenshot(type="png"))).convert("RGB")
    out = io.BytesIO()
    image.quantize(256).save(out, format="PNG", optimize=True)     # a palette: a third of the bytes
    shot = out.getvalue()
    assert len(shot) < MAX_SHOT, f"{name}: {len(shot)} bytes"
    path = DOCS / f"webui-{name}.png"
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(shot)
    os.replace(tmp, path)


def _generate(page, *, expect: str = "done", key: bool = False) -> dict:
    """Click Generate (or press Ctrl+Enter); wait until the status reads ``expect``; the request sent."""
    page.evaluate("setStatus('')")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        if key:
            page.focus("#prompt")
            page.keyboard.press("Control+Enter")
        else:
            page.click("#generate")
    if expect == "error":
        page.locator("#status.error").wait_for()
    else:
        page.locator("#status").filter(has_text=re.compile(f"^{expect}$")).wait_for()
    return sent.value.post_data_json


def _refused(page) -> str:
    """Click Generate on a form the page itself refuses (nothing is sent); the message shown."""
    page.evaluate("setStatus('')")
    page.click("#generate")
    page.locator("#status.error").wait_for()
    return page.inner_text("#status")


def _basic(page, prompt="a red circle on a blue background", seed=3) -> None:
    page.fill("#prompt", prompt)
    page.fill("#steps", str(STEPS))
    page.fill("#seed", str(seed))


def _image_size(page, selector: str) -> list[int]:
    page.wait_for_function("s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }",
                           arg=selector)
    return page.locator(selector).first.evaluate("i => [i.naturalWidth, i.naturalHeight]")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- size --------------------------------------------------------------------------------------------

def test_size_defaults_to_the_native_resolution_and_aspect_presets(page, url):
    status, body = _get(url + "v1/ui/model")
    info = json.loads(body)
    assert status == 200 and info["width"] == info["height"] == 64 and info["family"] == "bundled"
    assert BUNDLED.match(info["title"]) and info["history"] is True
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"
    for ratio, size in {"16:9": ("88", "48"), "3:4": ("56", "72"), "4:3": ("72", "56"), "1:1": ("64", "64")}.items():
        page.select_option("#aspect", ratio)
        assert (page.input_value("#width"), page.input_value("#height")) == size, ratio
    sizes = page.evaluate("() => [512, 768, 1024].map((n) => ['1:1', '16:9', '9:16'].map((r) => presetSize(n, r)))")
    assert sizes[0] == [[512, 512], [704, 384], [384, 704]]
    assert sizes[1][0] == [768, 768] and sizes[2][0] == [1024, 1024] and sizes[2][1] == [1344, 768]
    assert all(v % 64 == 0 for per in sizes for pair in per for v in pair)


# -- txt2img with hires fix, refiner, styles, networks ---------------------------------------------

def test_txt2img_with_hires_fix(page):
    _basic(page)
    page.click("#hires-panel summary")
    page.check("#enable_hr")
    page.fill("#hr_scale", "2")
    page.select_option("#hr_upscaler", "Lanczos")
    page.fill("#hr_second_pass_steps", "2")
    page.fill("#hr_denoising_strength", "0.5")
    sent = _generate(page)
    assert sent["mode"] == "txt2img" and sent["enable_hr"] is True and sent["hr_scale"] == 2
    assert sent["hr_upscaler"] == "Lanczos" and sent["hr_second_pass_steps"] == 2 and sent["denoising_strength"] == 0.5
    assert _image_size(page, "#gallery figure img") == [128, 128]
    assert "Hires upscale: 2" in page.locator("#gallery figcaption pre").first.inner_text()
    _shot(page, "txt2img")


def test_seed_options_and_the_hires_pass_s_own_settings(page, pipe):  # noqa: F811
    _basic(page, seed=5)
    page.select_option("#sampler_name", "Euler a")
    page.click("#seed-panel summary")
    page.fill("#subseed", "7")
    page.fill("#subseed_strength", "0.3")
    page.fill("#seed_resize_from_w", "32")
    page.fill("#seed_resize_from_h", "48")
    page.fill("#eta_noise_seed_delta", "11")
    page.click("#hires-panel summary")
    page.check("#enable_hr")
    page.fill("#hr_scale", "1.5")
    page.fill("#hr_second_pass_steps", "2")
    page.select_option("#hr_sampler_name", "DPM++ 2M")
    page.select_option("#hr_checkpoint_name", index=1)      # the model in use: the same as none
    page.fill("#hr_prompt", "a green square")
    page.fill("#hr_negative_prompt", "blurry")
    sent = _generate(page)
    assert (sent["subseed"], sent["subseed_strength"], sent["seed_resize_from_w"], sent["seed_resize_from_h"]) == \
        (7, 0.3, 32, 48)
    assert sent["override_settings"] == {"eta_noise_seed_delta": 11}
    assert (sent["hr_sampler_name"], sent["hr_prompt"], sent["hr_negative_prompt"]) == \
        ("DPM++ 2M", "a green square", "blurry") and BUNDLED.match(sent["hr_checkpoint_name"])
    caption = page.locator("#gallery figcaption pre").first.inner_text()
    for part in ("Variation seed: 7", "Variation seed strength: 0.3", "Seed resize from: 32x48", "ENSD: 11",
                 "Hires sampler: DPM++ 2M", "Hires prompt: a green square", "Hires negative prompt: blurry"):
        assert part in caption, part
    image = _decode(page.locator("#gallery figure img").first.get_attribute("src"))
    direct = pipe.txt2img("a red circle on a blue background", seed=5, steps=STEPS, sampler="Euler a", subseed=7,
                          subseed_strength=0.3, seed_resize_from_w=32, seed_resize_from_h=48,
                          eta_noise_seed_delta=11, hires_scale=1.5, hires_steps=2, hires_denoise=0.7,
                          hires_sampler="DPM++ 2M", hires_prompt="a green square", hires_negative_prompt="blurry",
                          width=64, height=64)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct.images[0]))
    page.fill("#subseed_strength", "0")
    page.get_by_role("button", name="Reuse settings").first.click()
    page.locator("#status").filter(has_text="parameters read from the image").wait_for()
    assert page.input_value("#subseed_strength") == "0.3" and page.input_value("#eta_noise_seed_delta") == "11"


def test_refiner_fields(page):
    _basic(page)
    page.click("#refiner-panel summary")
    title = page.locator("#refiner_checkpoint option").nth(1).get_attribute("value")
    assert BUNDLED.match(title)
    page.select_option("#refiner_checkpoint", title)
    page.fill("#refiner_switch_at", "0.5")
    sent = _generate(page)
    assert sent["refiner_checkpoint"] == title and sent["refiner_switch_at"] == 0.5
    assert "Refiner: bundled" in page.locator("#gallery figcaption pre").first.inner_text()
    _shot(page, "refiner")


def test_styles_are_sent_and_applied(page):
    _basic(page, prompt="a circle")
    page.click("#styles-panel summary")
    assert page.locator("#styles option").all_inner_texts() == ["reddish", "soft"]
    page.select_option("#styles", ["reddish", "soft"])
    sent = _generate(page)
    assert sent["styles"] == ["reddish", "soft"]
    text = page.locator("#gallery figcaption pre").first.inner_text()
    assert text.startswith("a circle, reddish, soft light\nNegative prompt: blurry\n")


def test_network_picker_inserts_tags(browser, url):  # noqa: F811
    embeddings = {"loaded": {"my-style": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                          "shape": 768, "vectors": 2}}, "skipped": {}}
    stub = lambda page: page.route("**/sdapi/v1/embeddings", lambda route: route.fulfill(json=embeddings))  # noqa: E731
    context, page, errors = _open(browser, url, before=stub)
    try:
        page.fill("#prompt", "a circle")
        page.click("#networks-panel summary")
        page.click("#lora-add")
        page.click("#embedding-add")
        page.click("#hypernet-add")
        assert page.input_value("#prompt") == "a circle <lora:mini:1> my-style <hypernet:hyper:1>"
        page.evaluate("() => { const p = document.getElementById('prompt'); p.selectionStart = p.selectionEnd = 1; }")
        page.click("#lora-add")
        assert page.input_value("#prompt").startswith("a <lora:mini:1> circle <lora:mini:1>")
        _shot(page, "networks")
    finally:
        context.close()
    assert not errors


# -- img2img, inpaint, outpaint, depth, upscale ----------------------------------------------------------

def test_img2img_from_an_uploaded_image(page):
    page.click("button[data-mode=img2img]")
    assert page.locator("#mask-tools").is_hidden() and page.locator("#hires-panel").is_hidden()
    page.set_input_files("#init-file", _file(_png((64, 48))))
    page.wait_for_function("() => document.getElementById('init-canvas').height === 48")
    _basic(page)
    page.fill("#denoising_strength", "0.6")
    sent = _generate(page)
    assert sent["mode"] == "img2img" and sent["denoising_strength"] == 0.6 and "mask" not in sent
    assert _decode(sent["init_images"][0]).size == (64, 48)
    assert _image_size(page, "#gallery figure img") == [64, 48]
    _shot(page, "img2img")


def _stroke(page, points) -> None:
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for p in xy[1:]:
        page.mouse.move(*p, steps=4)
    page.mouse.up()


def _mask(page) -> np.ndarray:
    return np.asarray(_decode(page.evaluate("maskImage()")).convert("L"))


def test_inpaint_brush_eraser_invert_undo(page):
    page.click("button[data-mode=inpaint]")
    page.set_input_files("#init-file", _file(_png((64, 64), (20, 40, 200))))
    page.wait_for_function("() => state.init !== null")
    _basic(page)
    assert "paint the area" in _refused(page)
    page.fill("#brush", "16")
    _stroke(page, [(0.2, 0.5), (0.8, 0.5)])
    painted = _mask(page)
    assert painted[32, 32] == 255 and painted[2, 2] == 0
    page.click("#tool-eraser")
    assert page.get_attribute("#tool-eraser", "aria-pressed") == "true"
    _stroke(page, [(0.5, 0.3), (0.5, 0.7)])
    assert _mask(page)[32, 32] == 0 and _mask(page)[32, 16] == 255
    page.click("#undo-mask")
    assert _mask(page)[32, 32] == 255
    page.click("#invert-mask")
    inverted = _mask(page)
    assert inverted[32, 32] == 0 and inverted[2, 2] == 255
    page.click("#undo-mask")
    assert np.array_equal(_mask(page), painted)
    page.click("#tool-brush")
    page.fill("#mask_blur", "2")
    sent = _generate(page)
    assert sent["mask_blur"] == 2 and sent["inpainting_fill"] == 1 and sent["inpainting_mask_invert"] == 0
    assert np.array_equal(np.asarray(_decode(sent["mask"]).convert("L")), painted)
    assert _image_size(page, "#gallery figure img") == [64, 64]
    _shot(page, "inpaint")


def test_inpaint_anything_click_to_mask(page):
    """Inpaint Anything: a click on the init image asks Segment Anything (the sam folder's model) for a
    mask; the best-scoring one, grown, becomes the inpainting mask that is sent."""
    page.click("button[data-mode=inpaint]")
    assert page.locator("#sam-tools").is_visible()
    assert page.locator("#sam-model option").all_inner_texts() == ["sam_tiny.pth"]
    page.set_input_files("#init-file", _file(_png((64, 64))))
    page.wait_for_function("() => state.init !== null")
    page.check("#sam-click")
    page.fill("#sam-grow", "2")
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    with page.expect_request(lambda r: r.url.endswith("/sam/sam-predict")) as asked:
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert asked.value.post_data_json["sam_positive_points"] == [[32, 32]]
    page.locator("#status").filter(has_text=re.compile("^masked")).wait_for()
    assert page.evaluate("state.masked")
    _basic(page)
    sent = _generate(page)
    mask = np.asarray(_decode(sent["mask"]).convert("L")) > 127
    assert mask.any()
    # remove: the same mask, masked content "fill", no prompt needed
    page.fill("#prompt", "")
    page.evaluate("setStatus('')")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as removed:
        page.click("#sam-remove")
    page.locator("#status").filter(has_text=re.compile("^done$")).wait_for()
    body = removed.value.post_data_json
    assert body["inpainting_fill"] == 0 and body["prompt"] == ""
    assert np.array_equal(np.asarray(_decode(body["mask"]).convert("L")) > 127, mask)
    page.click("#sam-reset")
    assert not page.evaluate("state.masked")
    page.uncheck("#sam-click")


def test_outpaint_grows_the_canvas(page):
    page.click("button[data-mode=outpaint]")
    assert page.locator("#outpaint-tools").is_visible() and page.locator("#mask-tools").is_hidden()
    page.set_input_files("#init-file", _file(_png((64, 64))))
    page.wait_for_function("() => state.init !== null")
    _basic(page)
    page.fill("#outpaint_right", "16")
    sent = _generate(page)
    assert sent["outpaint_right"] == 16 and "width" not in sent and "mask" not in sent
    assert _image_size(page, "#gallery figure img") == [80, 64]
    _shot(page, "outpaint")


def test_depth_map_is_sent_and_the_servers_error_shown(page):
    page.click("button[data-mode=depth]")
    page.set_input_files("#init-file", _file(_png((64, 64))))
    page.wait_for_function("() => state.init !== null")
    _basic(page)
    assert "depth map" in _refused(page)          # asked for before anything is sent
    page.set_input_files("#depth-file", _file(_png((64, 64), (128, 128, 128)), "depth.png"))
    page.locator("#depth-preview").wait_for()
    sent = _generate(page, expect="error")
    assert _decode(sent["depth_map"]).size == (64, 64)
    assert "depth_map" in page.inner_text("#status")          # the bundled model has no depth input
    _shot(page, "depth")


def test_upscale_with_lanczos(page):
    page.click("button[data-mode=upscale]")
    assert page.locator("#gen-fields").is_hidden() and page.inner_text("#generate") == "Upscale"
    names = page.locator("#upscaler option").all_inner_texts()
    assert "Lanczos" in names and page.input_value("#upscaler") == "Lanczos"
    page.set_input_files("#upscale-file", _file(_png((64, 48))))
    page.locator("#upscale-source").wait_for()
    page.fill("#upscale-by", "2")
    page.click("#generate")
    page.locator("#status").filter(has_text=re.compile("^done$")).wait_for()
    assert _image_size(page, "#gallery figure img") == [128, 96]
    # a generated image, sent on from the gallery
    page.click("button[data-mode=txt2img]")
    _basic(page)
    _generate(page)
    page.locator("#gallery figure").first.get_by_role("button", name="Send to upscale").click()
    assert page.locator("#upscale-fields").is_visible()
    page.wait_for_function("() => document.getElementById('upscale-source').naturalWidth === 64")
    page.select_option("#upscaler", "Nearest")
    page.evaluate("setStatus('')")
    page.click("#generate")
    page.locator("#status").filter(has_text=re.compile("^done$")).wait_for()
    assert _image_size(page, "#gallery figure img") == [128, 128]
    assert "Nearest" in page.locator("#gallery figure pre").first.inner_text()
    _shot(page, "upscale")


def test_variations_on_the_bundled_unclip_variant(page):
    """The panel says when the model takes no image embedding; on bundled-unclip (listed beside the
    bundled model) two weighted images and a noise level go out as unclip_images and come back."""
    page.click("button[data-mode=variations]")
    assert page.locator("#variations-fields").is_visible() and page.locator("#img2img-fields").is_hidden()
    assert "takes no image embedding" in page.inner_text("#unclip-note")
    _basic(page, prompt="")
    assert "choose an image" in _refused(page)
    options = page.locator("#model option").all_inner_texts()
    unclip = next(o for o in options if o.startswith("bundled-unclip"))
    try:
        page.select_option("#model", label=unclip)
        page.locator("#status").filter(has_text=re.compile("^model loaded$")).wait_for()
        assert "takes no image embedding" not in page.inner_text("#unclip-note")
        page.set_input_files("#unclip-file-0", _file(_png((64, 64))))
        page.set_input_files("#unclip-file-1", _file(_png((64, 64), (200, 40, 40)), "b.png"))
        page.locator("#unclip-thumb-1").wait_for()
        page.fill("#unclip-weight-1", "0.4")
        page.fill("#unclip_noise_level", "50")
        sent = _generate(page)
        assert sent["mode"] == "txt2img" and sent["unclip_noise_level"] == 50
        assert [u["weight"] for u in sent["unclip_images"]] == [1, 0.4]
        assert _decode(sent["unclip_images"][1]["image"]).getpixel((0, 0)) == (200, 40, 40)
        assert "unCLIP noise level: 50" in page.locator("#gallery figure pre").first.inner_text()
        _shot(page, "variations")
    finally:
        page.select_option("#model", label=next(o for o in options if BUNDLED.match(o)))
        page.locator("#status").filter(has_text=re.compile("^model loaded$")).wait_for()


def test_a_few_step_model_sets_its_model_cards_settings(browser, url):  # noqa: F811
    """A few-step model (the server's /v1/ui/model says which preset): its sampler, schedule, steps and
    CFG fill the fields, and the request carries them."""
    import urllib.request

    info = json.loads(urllib.request.urlopen(url + "v1/ui/model").read())
    info["few_step"] = {"name": "turbo", "sampler": "Euler a", "scheduler": "trailing", "steps": 1, "cfg_scale": 1.0}
    stub = lambda page: page.route("**/v1/ui/model", lambda route: route.fulfill(json=info))  # noqa: E731
    context, page, errors = _open(browser, url, before=stub)
    try:
        page.wait_for_function("() => document.getElementById('steps').value === '1'")
        assert (page.input_value("#sampler_name"), page.input_value("#scheduler"), page.input_value("#steps"),
                page.input_value("#cfg_scale")) == ("Euler a", "trailing", "1", "1")
        page.fill("#prompt", "a red circle")
        sent = _generate(page)
        assert (sent["sampler_name"], sent["scheduler"], sent["steps"], sent["cfg_scale"]) == ("Euler a", "trailing", 1, 1)
    finally:
        context.close()
    assert not errors


# -- ControlNet ---------------------------------------------------------------------------------------

def test_controlnet_units(browser, url):  # noqa: F811
    # the bundled server has no ControlNet model: list one it does not have, so the request goes
    # out whole and the server's answer (a 422 naming the unit's model) comes back
    models = {"model_list": ["canny-sd15 [0123abcd]"]}
    stub = lambda page: page.route("**/controlnet/model_list*", lambda route: route.fulfill(json=models))  # noqa: E731
    context, page, errors = _open(browser, url, before=stub)
    try:
        _controlnet_units(page)
    finally:
        context.close()
    assert not errors


def _controlnet_units(page):
    _basic(page)
    page.click("#controlnet-panel summary")
    page.click("#cn-add")
    units = page.locator(".cn-unit")
    assert units.count() == 2 and units.nth(1).locator("legend").inner_text() == "Unit 2"
    first = units.nth(0)
    assert first.locator(".cn-module option").all_inner_texts()[:3] == ["none", "canny", "threshold"]
    assert "ip-adapter_clip_sd15" in first.locator(".cn-module option").all_inner_texts()   # IP-Adapter units too
    assert first.locator(".cn-model").input_value() == "canny-sd15 [0123abcd]"
    # draw the control image: a white stroke on black
    first.locator(".cn-canvas").scroll_into_view_if_needed()
    box = first.locator(".cn-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    assert first.locator(".cn-enabled").is_checked()          # giving a unit an image enables it
    assert not units.nth(1).locator(".cn-enabled").is_checked()
    first.locator(".cn-module").select_option("canny")
    first.locator(".cn-detect").click()
    first.locator(".cn-preview").wait_for()
    page.locator("#status").filter(has_text="preprocessor preview ready").wait_for()
    assert first.locator(".cn-preview").evaluate("i => i.naturalWidth") > 0
    # the second unit: an uploaded image, then removed
    second = units.nth(1)
    second.locator(".cn-file").set_input_files(_file(_png((48, 40))))
    page.wait_for_function("() => document.querySelectorAll('.cn-canvas')[1].width === 48")
    second.locator(".cn-remove").click()
    assert units.count() == 1
    first.locator(".cn-weight").fill("0.8")
    first.locator(".cn-end").fill("0.9")
    first.locator(".cn-mode").select_option("2")
    first.locator(".cn-pixel").check()
    _shot(page, "controlnet", at="#controlnet-panel")
    first.locator(".cn-model").evaluate("s => s.replaceChildren(new Option('(none)', ''))")
    assert "unit 1: choose a model" in _refused(page)
    first.locator(".cn-model").evaluate("s => s.replaceChildren(new Option('canny-sd15 [0123abcd]'))")
    sent = _generate(page, expect="error")
    [unit] = sent["alwayson_scripts"]["controlnet"]["args"]
    assert unit["module"] == "canny" and unit["weight"] == 0.8 and unit["guidance_end"] == 0.9
    assert unit["control_mode"] == 2 and unit["pixel_perfect"] is True and unit["resize_mode"] == 1
    control = np.asarray(_decode(unit["image"]).convert("L"))
    assert control.shape == (64, 64) and control[32, 32] == 255 and control[4, 4] == 0
    assert "alwayson_scripts.controlnet.args[0].model" in page.inner_text("#status")
    # frames for an AnimateDiff clip: one image per frame, sent in file-name order as batch_images
    first.locator(".cn-frames").set_input_files([_file(_png((64, 64), (10, 20, 30)), "b.png"),
                                                 _file(_png((64, 64), (200, 20, 30)), "a.png")])
    page.wait_for_function("() => (document.querySelector('.cn-unit').frames || []).length === 2")
    assert first.locator(".cn-frames-count").inner_text() == "2 frames"
    sent = _generate(page, expect="error")
    [unit] = sent["alwayson_scripts"]["controlnet"]["args"]
    assert [tuple(np.asarray(_decode(f).convert("RGB"))[0, 0]) for f in unit["batch_images"]] == \
        [(200, 20, 30), (10, 20, 30)]


def test_pose_editor(page):
    """The OpenPose editor: a standing person to start, people added / removed, a keypoint dragged, the
    JSON loaded (either editor's layout) and saved, the exact control image from the server, and
    "Send to ControlNet" filling a new unit with it."""
    from sfumato.pipeline.pose import default_person, parse_pose, render_pose

    page.click("button[data-mode=pose]")
    assert page.locator("#pose-fields").is_visible() and not page.locator("#generate").is_visible()
    assert page.evaluate("pose.people.length") == 1
    page.click("#pose-add")
    assert page.evaluate("pose.people.length") == 2 and page.evaluate("pose.selected") == 1
    page.click("#pose-remove")
    assert page.evaluate("pose.people.length") == 1
    # drag the first person's right wrist (keypoint 4) to the canvas' top left quarter
    canvas = page.locator("#pose-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    wx, wy = page.evaluate("pose.people[0][4]")
    page.mouse.move(box["x"] + wx * box["width"], box["y"] + wy * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.25 * box["width"], box["y"] + 0.25 * box["height"], steps=4)
    page.mouse.up()
    x, y = page.evaluate("pose.people[0][4]")
    assert abs(x - 0.25) < 0.02 and abs(y - 0.25) < 0.02
    saved = page.evaluate("poseJson()")
    assert saved["canvas_width"] == 512 and len(saved["people"][0]["pose_keypoints_2d"]) == 54
    # the exact control image: the server's render of that JSON, as `sfumato pose render` draws it
    page.wait_for_function("() => { const i = $('pose-render'); return !i.hidden && i.complete && i.naturalWidth; }")
    page.wait_for_timeout(400)   # the render after the last drag
    shown = np.asarray(_decode(page.evaluate("$('pose-render').src")).convert("RGB"))
    assert np.array_equal(shown, render_pose(parse_pose(page.evaluate("poseJson()"))))
    # load fkunn1326's layout: two people on a 384×256 canvas
    editor = {"width": 384, "height": 256, "keypoints": [[x * 384, y * 256] for x, y in default_person(384, 256)] * 2}
    page.set_input_files("#pose-load", {"name": "pose.json", "mimeType": "application/json",
                                        "buffer": json.dumps(editor).encode()})
    page.locator("#status").filter(has_text="pose loaded: 2 people").wait_for()
    assert page.evaluate("[pose.width, pose.height, pose.people.length]") == [384, 256, 2]
    # hands and a face (as /controlnet/detect returns them with openpose_full) are kept, drawn and saved,
    # and a hand follows its wrist
    person = default_person(256, 256)
    hand = [[person[7][0] * 256 + 3 * i, person[7][1] * 256 + 10, 1.0] for i in range(21)]
    face = [[person[0][0] * 256 + 2 * i - 10, person[0][1] * 256, 1.0] for i in range(10)]
    full = {"canvas_width": 256, "canvas_height": 256, "people": [{
        "pose_keypoints_2d": [v for x, y in person for v in (x * 256, y * 256, 1.0)],
        "hand_left_keypoints_2d": [v for p in hand for v in p], "face_keypoints_2d": [v for p in face for v in p]}]}
    page.set_input_files("#pose-load", {"name": "full.json", "mimeType": "application/json",
                                        "buffer": json.dumps(full).encode()})
    page.locator("#status").filter(has_text="pose loaded: 1 people").wait_for()
    saved = page.evaluate("poseJson()")["people"][0]
    assert len(saved["hand_left_keypoints_2d"]) == 63 and len(saved["face_keypoints_2d"]) == 30
    assert "hand_right_keypoints_2d" not in saved
    page.wait_for_timeout(400)
    shown = np.asarray(_decode(page.evaluate("$('pose-render').src")).convert("RGB"))
    assert np.array_equal(shown, render_pose(parse_pose(full)))
    assert not np.array_equal(shown, render_pose(parse_pose(full), hands=False, face=False))
    box = canvas.bounding_box()
    scale = box["width"] / 256
    wx, wy = (v * 256 for v in person[7])
    page.mouse.move(box["x"] + wx * scale, box["y"] + wy * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + (wx - 20) * scale, box["y"] + wy * scale, steps=4)
    page.mouse.up()
    moved = page.evaluate("poseJson()")["people"][0]["hand_left_keypoints_2d"]
    assert moved[0] == pytest.approx(hand[0][0] - 20, abs=1.5) and moved[1] == pytest.approx(hand[0][1], abs=1.5)
    page.set_input_files("#pose-load", {"name": "pose.json", "mimeType": "application/json",
                                        "buffer": json.dumps(editor).encode()})
    page.locator("#status").filter(has_text="pose loaded: 2 people").wait_for()
    page.set_input_files("#pose-load", {"name": "bad.json", "mimeType": "application/json", "buffer": b"{oops"})
    page.locator("#status.error").filter(has_text="pose JSON").wait_for()
    # detection needs the annotator, and says where it goes
    page.set_input_files("#pose-detect", _file(_png((64, 64))))
    page.locator("#status.error").filter(has_text="annotators/").wait_for()
    _shot(page, "pose", at="#pose-fields")
    page.click("#pose-send")
    page.locator("#status").filter(has_text=re.compile("^pose sent to ControlNet unit")).wait_for()
    assert page.evaluate("state.tab") == "txt2img"
    unit = page.locator(".cn-unit").last
    assert unit.locator(".cn-enabled").is_checked() and unit.locator(".cn-module").input_value() == "none"
    page.wait_for_function("() => [...document.querySelectorAll('.cn-canvas')].pop().width === 384")
    sent = unit.locator(".cn-canvas").evaluate("c => c.toDataURL('image/png')")
    want = render_pose(parse_pose(editor))
    assert np.array_equal(np.asarray(_decode(sent).convert("RGB")), want) and want.any()
    unit.locator(".cn-remove").click()


def test_detail_pass(page):
    """The detail pass section sends the ADetailer extension's args; the server runs them (the
    image's infotext names the detector)."""
    _basic(page)
    page.click("#detail-panel summary")
    assert page.locator("#ad_model option").all_inner_texts() == ["face_yolov8n.onnx"]
    page.check("#ad_enable")
    page.fill("#ad_prompt", "a blue square")
    page.fill("#ad_denoising_strength", "0.5")
    sent = _generate(page)
    flag, skip, tab = sent["alwayson_scripts"]["ADetailer"]["args"]
    assert flag is True and skip is False
    assert tab["ad_model"] == "face_yolov8n.onnx" and tab["ad_prompt"] == "a blue square"
    assert tab["ad_denoising_strength"] == 0.5 and tab["ad_inpaint_only_masked_padding"] == 32
    page.locator("#gallery figure").first.wait_for()
    assert "ADetailer model: face_yolov8n.onnx" in page.locator("#gallery figure pre").first.inner_text()
    page.uncheck("#ad_enable")
    page.click("#detail-panel summary")


def test_animatediff_panel(page):
    """The AnimateDiff section sends the extension's args; the gallery plays the GIF that comes back."""
    _basic(page)
    page.click("#animate-panel summary")
    options = page.locator("#animate-model option").all_inner_texts()
    assert "mm_tiny.safetensors" in options   # (the bundled model's own module is listed first when shipped)
    page.select_option("#animate-model", "mm_tiny.safetensors")
    page.check("#animate-enable")
    page.fill("#animate-frames", "3")
    page.fill("#animate-fps", "6")
    sent = _generate(page)
    [unit] = sent["alwayson_scripts"]["AnimateDiff"]["args"]
    assert unit["model"] == "mm_tiny.safetensors" and unit["video_length"] == 3 and unit["fps"] == 6
    assert unit["format"] == ["GIF"] and sent["batch_size"] == 1
    page.locator("#gallery figure img").first.wait_for()
    src = page.locator("#gallery figure img").first.get_attribute("src")
    assert src.startswith("data:image/gif;base64,")
    import base64

    gif = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert gif.n_frames == 3 and gif.info["duration"] == 160   # 1000 / 6 ms, in GIF's centiseconds
    _shot(page, "animatediff")
    page.uncheck("#animate-enable")
    page.click("#animate-panel summary")


# -- X/Y/Z plot and attention maps ---------------------------------------------------------------------

def test_xyz_plot(page):
    _basic(page)
    page.click("#xyz-panel summary")
    page.locator("#xyz-x-type option").filter(has_text=re.compile("^Seed$")).wait_for(state="attached")
    page.check("#xyz-enable")
    page.select_option("#xyz-x-type", label="Seed")
    page.fill("#xyz-x-values", "1, 2")
    sent = _generate(page)
    assert sent["script_name"] == "x/y/z plot"
    args = sent["script_args"]
    assert len(args) == 18 and args[1] == "1, 2" and args[3] == 0 and args[9] is True
    figures = page.locator("#gallery figure")
    assert figures.count() >= 1
    sizes = page.evaluate("() => [...document.querySelectorAll('#gallery figure img')].map(i => i.naturalWidth)")
    assert max(sizes) > 64                                      # the grid: two cells side by side
    _shot(page, "xyz")


def test_attention_maps(page):
    _basic(page)
    page.check("#attention_maps")
    sent = _generate(page)
    assert sent["attention_maps"] is True
    img = page.locator("#gallery figure img").first
    original = img.get_attribute("src")
    words = page.locator("#gallery figure .words button.word")
    assert "circle" in words.all_inner_texts()
    circle = page.get_by_role("button", name="Attention map of “circle”")
    circle.click()
    assert circle.get_attribute("aria-pressed") == "true"
    heat = img.get_attribute("src")
    assert heat != original and _decode(heat).size == (64, 64)
    page.locator("#gallery figure .words button", has_text=re.compile("^image$")).click()
    assert img.get_attribute("src") == original
    circle.click()
    _shot(page, "attention")


# -- history -------------------------------------------------------------------------------------------

def test_history_survives_a_restart(page, pipe, folders, browser):  # noqa: F811
    _basic(page, seed=4242)
    _generate(page)
    outputs = folders[1]
    files = sorted(outputs.glob("*/*-4242.png"))
    assert files, list(outputs.rglob("*"))
    assert Image.open(files[-1]).info["parameters"].startswith("a red circle")
    page.click("button[data-mode=history]")
    first = page.locator("#history-list figure").first
    first.wait_for()
    assert "Seed: 4242" in first.locator("pre").inner_text()
    _shot(page, "history")

    with live_server(create_app(ServerConfig(outputs_dir=outputs), pipeline=pipe)) as port:
        context, fresh, errors = _open(browser, f"http://127.0.0.1:{port}/")
        try:
            fresh.click("button[data-mode=history]")
            item = fresh.locator("#history-list figure").first
            item.wait_for()
            assert "Seed: 4242" in item.locator("pre").inner_text()
            item.get_by_role("button", name="Reuse settings").click()
            fresh.locator("#status").filter(has_text="parameters read from the image").wait_for()
            assert fresh.input_value("#seed") == "4242" and fresh.input_value("#steps") == str(STEPS)
            fresh.click("button[data-mode=history]")
            fresh.locator("#history-list figure").first.get_by_role("button", name="Send to img2img").click()
            assert fresh.locator("#img2img-fields").is_visible()
            fresh.wait_for_function("() => state.init !== null && state.init.naturalWidth === 64")
        finally:
            context.close()
        assert not errors


def test_history_routes_refuse_other_names(url, folders):
    status, body = _get(url + "v1/history?limit=1000")
    listing = json.loads(body)
    assert status == 200 and listing["enabled"] is True and len(listing["items"]) <= 100
    for name in ("..%2F..%2Fetc/passwd.png", "2026-01-01/..%2F..%2Fstyles.png", "2026-01-01/00001-1.png",
                 "x/00001-1.png", "2026-01-01/00001-1.txt"):
        assert _get(url + "v1/history/" + name)[0] == 404, name
    if listing["items"]:
        status, png = _get(url + listing["items"][0]["url"])
        assert status == 200 and png.startswith(b"\x89PNG")


def test_history_off_is_said(browser, pipe):  # noqa: F811
    with live_server(create_app(ServerConfig(), pipeline=pipe)) as port:
        context, page, errors = _open(browser, f"http://127.0.0.1:{port}/")
        try:
            page.click("button[data-mode=history]")
            page.locator("#history-note").filter(has_text="--outputs-dir").wait_for()
        finally:
            context.close()
        assert not errors


# -- progress, keyboard, labels, layout ----------------------------------------------------------------

def test_progress_preview_time_left_and_ctrl_enter(page):
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "150")
    page.fill("#n_iter", "8")
    _generate(page, expect=r"[^\n]*step \d+/150[^\n]* s left", key=True)
    page.locator("#preview").wait_for()
    assert min(_decode(page.get_attribute("#preview", "src")).size) > 0
    page.click("#interrupt")
    page.locator("#status").filter(has_text=re.compile("^interrupted$")).wait_for(timeout=10_000)
    assert page.locator("#gallery figure").count() >= 1


LABELS_JS = """() => [...document.querySelectorAll('input, select, textarea, button')].filter((e) => {
    const named = (e.getAttribute('aria-label') || '').trim() || (e.getAttribute('aria-labelledby') || '').trim()
      || [...(e.labels || [])].some((l) => l.textContent.trim())
      || (e.tagName === 'BUTTON' && e.textContent.trim());
    return !named || e.tabIndex < 0;
  }).map((e) => e.outerHTML.slice(0, 120))"""


def test_every_control_has_a_label_and_takes_focus(page):
    page.click("#controlnet-panel summary")
    page.click("#cn-add")
    _basic(page)
    page.check("#attention_maps")
    _generate(page)                          # the gallery's buttons too
    assert page.evaluate(LABELS_JS) == []
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "negative_prompt"
    page.focus("button[data-mode=inpaint]")
    page.keyboard.press("Enter")
    assert page.locator("#mask-tools").is_visible()


TABS = ("txt2img", "img2img", "inpaint", "outpaint", "depth", "variations", "upscale", "pose", "history")


@pytest.mark.parametrize("viewport", [(390, 844), (1280, 800)])
def test_layout_has_no_horizontal_scroll(browser, url, viewport):  # noqa: F811
    context, page, errors = _open(browser, url, viewport)
    try:
        for summary in page.locator("details summary").all():
            summary.click()
        for tab in TABS:
            page.click(f"button[data-mode={tab}]")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport[0], (tab, width)
        page.click("button[data-mode=txt2img]")
        for summary in page.locator("details summary").all():
            summary.click()                          # closed again
        if viewport[0] == 1280:                      # Generate is on the first screen
            box = page.locator("#generate").bounding_box()
            assert box["y"] + box["height"] <= viewport[1]
        else:
            _shot(page, "phone")
    finally:
        context.close()
    assert not errors
