"""A1111 infotext: exact layout, A1111's parsing rules on hand-written A1111 texts, round trips
through GenerationParams, and the text's home in PNG / JPEG / WebP files."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from PIL import Image

from sfumato.errors import SfumatoError
from sfumato.pipeline.images import save_image
from sfumato.pipeline.infotext import (
    format_infotext,
    generation_infotext,
    params_from_infotext,
    parse_infotext,
    read_image_parameters,
)
from sfumato.pipeline.params import GenerationParams

BASE = GenerationParams("a cat", sampler="dpmpp_2m", scheduler="karras", seed=1)
VERSION = "Version: sfumato 0.1.0"


def _text(p: GenerationParams, **kwargs) -> str:
    return generation_infotext(p, model_name="name", model_hash="0123456789", **kwargs)


# -- writing -----------------------------------------------------------------------------------

def test_layout_and_key_order():
    assert _text(BASE) == (
        "a cat\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        f"Model hash: 0123456789, Model: name, RNG: CPU, {VERSION}"
    )


@pytest.mark.parametrize("sampler, scheduler, label, read_back", [
    ("euler", None, "Automatic", None),       # none chosen: A1111's Automatic (the sampler's default σ's)
    ("dpmpp_2m", None, "Automatic", None),    # … Karras for DPM++ 2M, still written as Automatic
    ("euler", "normal", "Normal", "normal"),  # chosen, even where Automatic would pick the same σ's
    ("dpmpp_2m", "karras", "Karras", "karras"),
    ("dpmpp_3m_sde", "exponential", "Exponential", "exponential"),
    ("euler", "karras", "Karras", "karras"),
    ("dpmpp_2m", "normal", "Normal", "normal"),
    ("dpmpp_2m", "sgm_uniform", "SGM Uniform", "sgm_uniform"),
])
def test_schedule_type_is_the_one_chosen_and_automatic_only_when_none_was(sampler, scheduler, label, read_back):
    """As A1111 writes ``p.scheduler`` (issue 14: an explicit Karras used to be written "Automatic")."""
    text = _text(replace(BASE, sampler=sampler, scheduler=scheduler))
    assert f", Schedule type: {label}, " in text
    assert params_from_infotext(text)["scheduler"] == read_back


def test_an_old_combined_sampler_label_chooses_its_schedule():
    p = GenerationParams("a cat", sampler="DPM++ 2M Karras", seed=1).validated()
    assert (p.sampler, p.scheduler) == ("dpmpp_2m", "karras")
    p = GenerationParams("a cat", sampler="DPM++ 2M", seed=1).validated()
    assert (p.sampler, p.scheduler) == ("dpmpp_2m", None)
    assert params_from_infotext("x\nSteps: 5, Sampler: DPM++ 2M Karras, Seed: 1")["scheduler"] == "karras"


def test_negative_prompt_line_and_used_settings():
    p = replace(BASE, negative_prompt="blurry, ugly", cfg_scale=7.5, clip_skip=2, width=768, height=512,
                subseed=99, subseed_strength=0.25, hires_scale=1.5, hires_steps=10, hires_denoise=0.55,
                guidance_rescale=0.7, sampler="euler_a", scheduler=None, rng="nv")
    assert _text(p) == (
        "a cat\n"
        "Negative prompt: blurry, ugly\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 1, Size: 768x512, "
        "Model hash: 0123456789, Model: name, Variation seed: 99, Variation seed strength: 0.25, "
        "Denoising strength: 0.55, Clip skip: 2, RNG: NV, Hires upscale: 1.5, Hires steps: 10, "
        f"Hires upscaler: Latent, CFG Rescale φ: 0.7, {VERSION}"
    )


def test_inpainting_and_refiner_settings():
    image = Image.new("RGB", (64, 64))
    p = replace(BASE, init_image=image, mask=Image.new("L", (64, 64)), strength=0.6, mask_blur=8,
                only_masked=True, only_masked_padding=48, masked_content="fill",
                refiner="sd_xl_refiner_1.0 [7440042bbd]", refiner_switch=0.75)
    settings = _text(p).split("\n")[-1]
    assert (
        "Model: name, Denoising strength: 0.6, RNG: CPU, Mask blur: 8, Inpaint area: Only masked, "
        "Masked area padding: 48, Masked content: fill, Refiner: sd_xl_refiner_1.0 [7440042bbd], "
        f"Refiner switch at: 0.75, {VERSION}"
    ) in settings


def test_values_that_would_break_the_line_are_json_quoted():
    text = generation_infotext(BASE, model_name='my, "best": model', extra={"Lora hashes": "a: 1, b: 2", "Flag": "Flag"})
    assert 'Model: "my, \\"best\\": model", RNG: CPU, Lora hashes: "a: 1, b: 2", Flag, Version' in text
    parsed = parse_infotext(text)
    assert parsed["Model"] == 'my, "best": model' and parsed["Lora hashes"] == "a: 1, b: 2"
    assert "Model hash" not in parsed and parsed["Version"] == "sfumato 0.1.0"


def test_format_infotext_drops_none_and_empty_negative():
    assert format_infotext("p", "", {"Steps": 4, "Seed": None, "CFG scale": 1.0, "Size": "8x8"}) == (
        "p\nSteps: 4, CFG scale: 1, Size: 8x8"
    )


# -- reading A1111's own texts ---------------------------------------------------------------------

A1111_HIRES = """masterpiece, best quality, 1girl, (blue eyes:1.2),\x20
standing in a field of flowers
Negative prompt: lowres, bad anatomy,
(worst quality:1.4)
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3452109876, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, \
Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: Latent, \
Lora hashes: "add_detail: 7c6bad76eb54, film: 1b2c3d4e5f60", TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1"""


def test_parse_a1111_hires_text():
    s = parse_infotext(A1111_HIRES)
    assert s["Prompt"] == "masterpiece, best quality, 1girl, (blue eyes:1.2),\nstanding in a field of flowers"
    assert s["Negative prompt"] == "lowres, bad anatomy,\n(worst quality:1.4)"
    assert (s["Size-1"], s["Size-2"]) == ("512", "768") and "Size" not in s
    assert s["Lora hashes"] == "add_detail: 7c6bad76eb54, film: 1b2c3d4e5f60"
    assert s["TI hashes"] == "EasyNegative: c74b4e810b03"
    assert s["VAE"] == "vae-ft-mse-840000-ema-pruned.safetensors" and s["Version"] == "v1.10.1"
    p = params_from_infotext(A1111_HIRES)
    assert p == {
        "prompt": s["Prompt"], "negative_prompt": s["Negative prompt"], "steps": 28, "cfg_scale": 6.5,
        "seed": 3452109876, "width": 512, "height": 768, "clip_skip": 2, "hires_steps": 15,
        "sampler": "dpmpp_2m", "scheduler": "karras", "hires_scale": 2.0, "hires_upscaler": "latent",
        "hires_denoise": 0.45,
    }   # no "rng": A1111's default GPU noise is left to the request


def test_parse_old_a1111_text_with_combined_sampler_label():
    text = ("a photo of an astronaut riding a horse on mars\n"
            "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")
    p = params_from_infotext(text)
    assert (p["sampler"], p["scheduler"], p["seed"]) == ("dpmpp_2m", "karras", 965400086)
    assert params_from_infotext(text.replace("DPM++ 2M Karras", "Euler a"))["sampler"] == "euler_a"
    unknown = params_from_infotext(text.replace("DPM++ 2M Karras", "Restart"))   # left for validation
    assert (unknown["sampler"], unknown["scheduler"]) == ("Restart", None)


def test_parse_a1111_inpainting_and_extension_settings():
    text = ("a red fox\n"
            "Steps: 30, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 512x512, "
            "Model hash: abc, Model: sd-inpaint, Variation seed: 1234, Variation seed strength: 0.3, "
            "Denoising strength: 0.6, RNG: NV, Mask blur: 8, Inpaint area: Only masked, Masked area padding: 48, "
            "Masked content: latent noise, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, "
            "CFG Rescale φ: 0.7, Version: v1.10.1")
    p = params_from_infotext(text)
    assert p["scheduler"] is None and p["sampler"] == "euler"
    assert (p["subseed"], p["subseed_strength"], p["strength"], p["rng"]) == (1234, 0.3, 0.6, "nv")
    assert (p["mask_blur"], p["only_masked"], p["only_masked_padding"], p["masked_content"]) == (8, True, 48, "latent noise")
    assert (p["refiner"], p["refiner_switch"], p["guidance_rescale"]) == ("sd_xl_refiner_1.0 [7440042bbd]", 0.8, 0.7)
    assert "hires_scale" not in p and "hires_denoise" not in p


def test_hires_resize_gives_a_scale_when_it_keeps_the_aspect():
    text = "x\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x384, Hires resize: 1024x768, Denoising strength: 0.5"
    assert params_from_infotext(text)["hires_scale"] == 2.0
    assert params_from_infotext(text)["hires_denoise"] == 0.5
    assert "hires_scale" not in params_from_infotext(text.replace("1024x768", "1024x1024"))


def test_text_without_settings_line_is_all_prompt():
    s = parse_infotext("just a prompt\nstyle: oil, mood: calm")   # two pairs: not a settings line
    assert s == {"Prompt": "just a prompt\nstyle: oil, mood: calm", "Negative prompt": ""}


@pytest.mark.parametrize("p", [
    BASE,
    replace(BASE, prompt="line one\nline two: with colon", negative_prompt="neg, one\nneg two", cfg_scale=4.5,
            steps=35, seed=4294967295, width=1024, height=576, clip_skip=2, sampler="euler", scheduler="karras"),
    replace(BASE, negative_prompt="x", subseed=7, subseed_strength=0.125, rng="nv", guidance_rescale=0.5,
            sampler="dpmpp_2m_sde", scheduler="exponential"),
    replace(BASE, hires_scale=2.0, hires_steps=12, hires_denoise=0.4, hires_upscaler="lanczos", scheduler="simple"),
    replace(BASE, init_image=Image.new("RGB", (8, 8)), mask=Image.new("L", (8, 8)), strength=0.3, mask_blur=0,
            only_masked=True, only_masked_padding=16, masked_content="latent nothing",
            refiner="ref, v2", refiner_switch=0.6),
    replace(BASE, tome_ratio=0.5, deepcache_interval=3),
], ids=["basic", "multiline", "variation", "hires", "inpaint", "accelerations"])
def test_round_trip_through_generation_params(p):
    back = params_from_infotext(_text(p))
    for name, value in back.items():
        assert getattr(p, name) == value, name
    assert GenerationParams(**back).prompt == p.prompt   # the keys are request fields
    used = {"prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "sampler", "scheduler"}
    assert used <= back.keys()
    if p.tome_ratio:
        assert "Token merging ratio: 0.5, DeepCache interval: 3" in _text(p)
        assert (back["tome_ratio"], back["deepcache_interval"]) == (0.5, 3)


# -- files -------------------------------------------------------------------------------------

TEXT = "ünïcödé prompt, 猫\nNegative prompt: bad\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp"])
def test_parameters_round_trip_through_files(tmp_path, suffix):
    path = save_image(Image.new("RGB", (64, 48), (200, 30, 30)), tmp_path / f"out{suffix}", TEXT)
    assert read_image_parameters(path) == TEXT
    assert [f.name for f in tmp_path.iterdir()] == [path.name]   # no temporary file left behind
    with Image.open(path) as img:
        assert img.size == (64, 48) and img.format == {".jpg": "JPEG", ".jpeg": "JPEG"}.get(suffix, suffix[1:].upper())


def test_jpeg_user_comment_is_exif_undefined_unicode(tmp_path):
    """A1111 (piexif) reads UserComment as type UNDEFINED with the 8-byte UNICODE code, UTF-16."""
    with Image.open(save_image(Image.new("RGB", (16, 16)), tmp_path / "a.jpg", TEXT)) as img:
        tiff = img.info["exif"][6:]
    assert tiff[:4] == b"MM\0\x2a"
    u16, u32 = (lambda o: struct.unpack(">H", tiff[o:o + 2])[0]), (lambda o: struct.unpack(">I", tiff[o:o + 4])[0])
    ifd0 = u32(4)
    entries = {u16(ifd0 + 2 + 12 * i): ifd0 + 2 + 12 * i for i in range(u16(ifd0))}
    exif_ifd = u32(entries[0x8769] + 8)
    entries = {u16(exif_ifd + 2 + 12 * i): exif_ifd + 2 + 12 * i for i in range(u16(exif_ifd))}
    entry = entries[0x9286]
    kind, count, offset = u16(entry + 2), u32(entry + 4), u32(entry + 8)
    assert kind == 7
    assert tiff[offset:offset + count] == b"UNICODE\0" + TEXT.encode("utf-16-be")


def test_files_without_parameters_and_bad_extensions(tmp_path):
    for name in ("a.png", "a.jpg", "a.webp"):
        assert read_image_parameters(save_image(Image.new("RGB", (8, 8)), tmp_path / name)) is None
    with pytest.raises(SfumatoError, match="extension"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "a.gif", TEXT)
    rgba = save_image(Image.new("RGBA", (8, 8)), tmp_path / "rgba.jpg", TEXT)   # JPEG has no alpha
    assert read_image_parameters(rgba) == TEXT
    with pytest.raises(SfumatoError, match="too long for JPEG"):   # one APP1 segment holds 64 KiB
        save_image(Image.new("RGB", (8, 8)), tmp_path / "long.jpg", "x" * 40000)
    assert not (tmp_path / "long.jpg").exists()
    assert read_image_parameters(save_image(Image.new("RGB", (8, 8)), tmp_path / "long.webp", "x" * 40000)) == "x" * 40000
