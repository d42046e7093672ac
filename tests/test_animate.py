"""AnimateDiff against diffusers: a tiny SD 1-style model and a MotionAdapter (v1, v2 and v3 layouts:
24- or 32-frame encodings, with and without the mid-block module) built with diffusers, run as
diffusers' UNetMotionModel in a k-diffusion loop (Euler, CFG, frame f's noise from seed + f). Our
latents, from the adapter saved both as a diffusers folder and in the original file layout, must
match within 1e-4. Plus the context-window schedule, prompt travel, the files written and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from reference import TINY_HF_TEXT, materialize, randomize_, reference_tokens, scaled_linear_alphas_cumprod, write_ldm_sd1
from sfumato.api import ControlSpec
from sfumato.checkpoint.io import save_file
from sfumato.cli import main
from sfumato.errors import ParamError
from sfumato.pipeline.animate import context_windows, frame_weights, travel_prompts
from test_controlnet_pipeline import TINY_UNET, TINY_VAE, UNET_CFG   # the same tiny SD 1-style model

LAYOUTS = {"v1": dict(motion_max_seq_length=24, use_motion_mid_block=False),
           "v2": dict(motion_max_seq_length=32, use_motion_mid_block=True),
           "v3": dict(motion_max_seq_length=32, use_motion_mid_block=False)}
PROMPT, NEGATIVE, STEPS, CFG, FRAMES, SEED = "a red circle", "blurry", 4, 6.0, 6, 7


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("animate")
    unet = materialize(lambda: UNet2DConditionModel(**TINY_UNET), 41)
    vae = materialize(lambda: AutoencoderKL(**TINY_VAE), 42)
    text = materialize(lambda: CLIPTextModel(CLIPTextConfig(**TINY_HF_TEXT)), 43)
    model = write_ldm_sd1(root / "tiny.safetensors", unet, vae, text, UNET_CFG)
    adapters = {}
    for k, (version, layout) in enumerate(LAYOUTS.items()):
        adapter = randomize_(MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,   # on the CPU:
                                           motion_num_attention_heads=8, motion_norm_num_groups=32,   # its position
                                           **layout), 50 + k).eval()                                  # buffers built
        folder = root / f"mm-{version}"
        adapter.save_pretrained(folder)
        original = root / f"mm_{version}.safetensors"
        save_file(original_layout(adapter.state_dict()), original)
        adapters[version] = (adapter, folder, original)
    return dict(root=root, model=model, unet=unet, vae=vae, text=text, adapters=adapters,
                pipe=sfumato.load(model, dtype="fp32"))


def original_layout(sd: dict) -> dict:
    """The published files' keys: diffusers' conversion (loaders.single_file_utils) run backwards, and
    each attention's position encoding stored as the original modules store it."""
    import re

    out = {}
    for key, value in sd.items():
        m = re.match(r"(.*?\.motion_modules\.\d+)\.(.*)", key)
        head, rest = m[1], "." + m[2]
        if rest.endswith(".pos_embed.pe"):
            block = rest[:-len(".pos_embed.pe")]
            for a in (0, 1):
                out[f"{head}.temporal_transformer{block}.attention_blocks.{a}.pos_encoder.pe"] = value.clone()
            continue
        for ours, theirs in ((".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."),
                             (".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm.")):
            rest = rest.replace(ours, theirs)
        out[f"{head}.temporal_transformer{rest}"] = value.contiguous()
    return out


class _Motion(torch.nn.Module):
    """k-diffusion's CompVis interface over diffusers' UNetMotionModel: x is (B, C, F, H, W). With a
    ControlNet, as AnimateDiffControlNetPipeline runs it: on the B·F frames flattened, each with its own
    hint (``hints``: (F, 3, H, W), the same for the uncond and cond clips)."""

    def __init__(self, unet, controlnet=None, hints=None):
        super().__init__()
        self.unet, self.controlnet, self.hints = unet, controlnet, hints
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())

    def apply_model(self, x, t, cond):
        if self.controlnet is None:
            return self.unet(x, t, encoder_hidden_states=cond).sample
        b, c, f, h, w = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        down, mid = self.controlnet(flat, t.repeat_interleave(f), cond, controlnet_cond=self.hints.repeat(b, 1, 1, 1),
                                    conditioning_scale=1.0, return_dict=False)
        return self.unet(x, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


@torch.no_grad()
def reference_clip(w, version: str, frames: int = FRAMES, unet2d=None, controlnet=None, hints=None) -> torch.Tensor:
    import k_diffusion as K
    from diffusers import UNetMotionModel

    unet = UNetMotionModel.from_unet2d(unet2d or w["unet"], w["adapters"][version][0]).eval()
    den = K.external.CompVisDenoiser(_Motion(unet, controlnet, hints))
    sigmas = den.get_sigmas(STEPS)
    c = w["text"](reference_tokens([PROMPT])).last_hidden_state
    uc = w["text"](reference_tokens([NEGATIVE])).last_hidden_state
    noise = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(SEED + f))
                         for f in range(frames)], dim=1)[None]            # (1, C, F, h, w)

    context = torch.cat([uc, c]).repeat_interleave(frames, dim=0)   # per frame, as AnimateDiffPipeline feeds it

    def model(x, sigma):
        u, co = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=context).chunk(2)
        return u + (co - u) * CFG

    out = K.sampling.sample_euler(model, noise * sigmas[0], sigmas, disable=True)
    return out[0].permute(1, 0, 2, 3)                                     # (F, C, h, w)


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("source", ["folder", "original"])
def test_clip_latents_equal_diffusers(world, version, source):
    _, folder, original = world["adapters"][version]
    result = world["pipe"].animate(PROMPT, NEGATIVE, motion_module=folder if source == "folder" else original,
                                   frames=FRAMES, steps=STEPS, cfg_scale=CFG, seed=SEED, sampler="euler",
                                   scheduler="normal", width=64, height=64, watermark=False)
    ref = reference_clip(world, version)
    assert result.latents.shape == ref.shape == (FRAMES, 4, 8, 8)
    torch.testing.assert_close(result.latents, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert len(result.frames) == FRAMES and result.frames[0].size == (64, 64)
    assert f"version: {version}" in result.infotext and "video_length: 6" in result.infotext
    # the motion module is what ties the frames: without it frame f is the still image of seed + f
    still = world["pipe"].txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED + 2, sampler="euler",
                                  scheduler="normal", width=64, height=64, watermark=False).latents[0]
    assert (result.latents[2] - still).abs().max() > 1e-3


def _animate(w, prompt=PROMPT, **settings):
    return w["pipe"].animate(prompt, NEGATIVE, motion_module=w["adapters"]["v2"][1], frames=FRAMES, steps=STEPS,
                             cfg_scale=CFG, seed=SEED, sampler="euler", scheduler="normal", width=64, height=64,
                             watermark=False, **settings)


@pytest.fixture(scope="module")
def control(world):
    """A diffusers ControlNetModel for the tiny model, its file (original layout) and per-frame images."""
    from diffusers import ControlNetModel

    from sfumato.checkpoint.convert_controlnet import controlnet_config_from_diffusers, diffusers_controlnet_to_ldm
    from test_controlnet_pipeline import BLOCKS, smooth_image

    cn = materialize(lambda: ControlNetModel(**BLOCKS), 44)
    ldm = diffusers_controlnet_to_ldm(cn.state_dict(), controlnet_config_from_diffusers(cn.config))
    path = world["root"] / "control.safetensors"
    save_file({"control_model." + k: v.contiguous() for k, v in ldm.items()}, path)
    return cn, path, [smooth_image(100 + f) for f in range(FRAMES)]


def test_controlnet_per_frame_equals_diffusers(world, control):
    """A ControlNet steering each frame with its own image, and one image for all frames: the latents of
    diffusers' ControlNetModel run per frame into UNetMotionModel (AnimateDiffControlNetPipeline's way)."""
    from test_controlnet_pipeline import hint_of

    cn, path, images = control
    per_frame = _animate(world, control=[ControlSpec(path, images)])
    ref = reference_clip(world, "v2", controlnet=cn, hints=torch.cat([hint_of(i) for i in images]))
    torch.testing.assert_close(per_frame.latents, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert 'ControlNet 0: "Module: none, Model: control, Weight: 1' in per_frame.infotext
    one = _animate(world, control=[ControlSpec(path, images[2])])
    ref_one = reference_clip(world, "v2", controlnet=cn, hints=hint_of(images[2]).repeat(FRAMES, 1, 1, 1))
    torch.testing.assert_close(one.latents, ref_one, rtol=1e-4, atol=1e-4 * float(ref_one.abs().max()))
    assert (one.latents - per_frame.latents).abs().max() > 1e-3
    with pytest.raises(ParamError) as e:       # neither one image nor one per frame
        _animate(world, control=[ControlSpec(path, images[:2])])
    assert e.value.field == "control[0].image"
    with pytest.raises(ParamError) as e:       # frame lists belong to animations
        world["pipe"].txt2img(PROMPT, steps=1, width=64, height=64, control=[ControlSpec(path, images)])
    assert e.value.field == "control[0].image"


def test_lora_tag_in_an_animation_equals_diffusers_with_the_lora_merged(world, tmp_path):
    """``<lora:name:w>`` in an animation's prompt: the clip of diffusers' UNet with W + w·(α/r)·up·down
    (the kohya formula, applied here by hand), the weights restored after the run."""
    import copy

    target, theirs = "input_blocks.1.1.transformer_blocks.0.attn2.to_k", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    pipe = world["pipe"]
    weight = pipe.model.unet.get_parameter(target + ".weight")
    before = weight.detach().clone()
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, weight.shape[1], generator=g) * 0.3, torch.randn(weight.shape[0], 4, generator=g) * 0.3
    name = "lora_unet_" + target.replace(".", "_")
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
              folder / "wave.safetensors")
    tagged = sfumato.load(world["model"], dtype="fp32", lora_dir=folder)
    result = tagged.animate(f"{PROMPT} <lora:wave:0.7>", NEGATIVE, motion_module=world["adapters"]["v2"][1],
                            frames=FRAMES, steps=STEPS, cfg_scale=CFG, seed=SEED, sampler="euler", scheduler="normal",
                            width=64, height=64, watermark=False)
    assert torch.equal(tagged.model.unet.get_parameter(target + ".weight"), before)   # detached after the run
    merged = copy.deepcopy(world["unet"])
    with torch.no_grad():
        merged.get_parameter(theirs + ".weight").add_(0.7 * (2.0 / 4) * (up @ down))
    ref = reference_clip(world, "v2", unet2d=merged)
    torch.testing.assert_close(result.latents, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert 'Lora hashes: "wave: ' in result.infotext
    assert (result.latents - _animate(world).latents).abs().max() > 1e-3


def test_context_windows_follow_the_extensions_schedule():
    """The uniform schedule worked by hand: windows of 16 every 12 frames (overlap 4), frames wrapping
    around, shifted each step by the step's ordered-halving fraction of the clip (0, 1/2, 1/4, 3/4, …)."""
    wrap = lambda a, b: [e % 24 for e in range(a, b)]   # noqa: E731
    assert context_windows(0, 12, 16, 4) == [list(range(12))]                 # short clips: one window
    assert context_windows(0, 24, 16, 4) == [list(range(16)), wrap(12, 28)]
    assert context_windows(1, 24, 16, 4) == [wrap(12, 28), wrap(24, 40)]       # shifted by 24 · 1/2
    assert context_windows(2, 24, 16, 4) == [wrap(6, 22), wrap(18, 34)]        # by 24 · 1/4
    assert context_windows(0, 24, 16, 4, closed_loop=True) == [list(range(16)), wrap(12, 28)]
    assert context_windows(0, 40, 16, 4, closed_loop=True) == [[e % 40 for e in range(j, j + 16)] for j in (0, 12, 24, 36)]
    # stride 2: also windows of every second frame
    strided = context_windows(0, 40, 16, 4, stride=2)
    assert [e % 40 for e in range(0, 32, 2)] in strided and list(range(16)) in strided


def test_prompt_travel():
    keyed, plain = travel_prompts("masterpiece\n0: a red circle\n8: a blue circle\non a white background", 16)
    assert plain is None and keyed == {0: "masterpiece, a red circle, on a white background",
                                       8: "masterpiece, a blue circle, on a white background"}
    keyed, _ = travel_prompts("0: a red circle, 8: a blue circle", 16)
    assert keyed == {0: "a red circle", 8: "a blue circle"}
    assert travel_prompts("a red circle", 16) == ({}, "a red circle")
    weights = frame_weights([0, 8], 16, closed_loop=False)
    assert weights[0] == [(0, 1.0)] and weights[4] == [(0, 0.5), (1, 0.5)] and weights[12] == [(1, 1.0)]
    looped = frame_weights([0, 8], 16, closed_loop=True)
    assert looped[12] == [(1, 0.5), (0, 0.5)]
    for bad in ("0: a\nnot a keyframe\n8: b", "0: a\n20: b", "0: a\n0: b"):
        with pytest.raises(ParamError) as e:
            travel_prompts(bad, 16)
        assert e.value.field == "prompt"


def test_files_and_errors(world, control, tmp_path, capsys):
    folder = world["adapters"]["v2"][1]
    out = tmp_path / "clip.gif"
    args = ["animate", "0: a red circle\n3: a blue circle", "--model", str(world["model"]), "--motion-module",
            str(folder), "--frames", "4", "--fps", "4", "--steps", "2", "--seed", "3", "--width", "64", "--height", "64",
            "--dtype", "fp32", "--no-watermark", "-o", str(out)]
    assert main(args) == 0
    gif = Image.open(out)
    assert gif.n_frames == 4 and gif.info["duration"] == 250 and b"AnimateDiff" in gif.info["comment"]
    webp = tmp_path / "clip.webp"
    assert main(args[:-1] + [str(webp)]) == 0
    assert Image.open(webp).n_frames == 4
    import av

    mp4 = tmp_path / "clip.mp4"
    assert main(args[:-1] + [str(mp4)]) == 0
    with av.open(str(mp4)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert "AnimateDiff" in container.metadata.get("comment", "")
    assert len(decoded) == 4 and decoded[0].shape == (64, 64, 3)
    lossless = Image.open(webp)
    lossless.seek(0)
    first = np.asarray(lossless.convert("RGB"), dtype=int)
    error = np.abs(decoded[0].astype(int) - first).mean()
    print(f"MP4 frame 0 vs the lossless frame: mean abs error {error:.2f}")
    assert error < 20   # H.264 4:2:0 at CRF 18 on pixel noise (another clip: ~58): near, not equal
    capsys.readouterr()
    for extra, message in ((["--frames", "0"], "frames"), (["--frames", "999"], "frames"),
                           (["--motion-module", str(world["model"])], "motion_module"),
                           (["-o", str(tmp_path / "x.png")], "output")):
        bad = list(args)
        for flag, value in zip(extra[::2], extra[1::2]):
            bad[bad.index(flag) + 1] = value
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # ControlNet from the CLI: a folder of frames, one per frame, as the library's per-frame list
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for f, image in enumerate(control[2][:4]):
        image.save(frames_dir / f"{f:03d}.png")
    steered = tmp_path / "steered.webp"
    assert main(args[:-1] + [str(steered), "--control-model", str(control[1]), "--control-image", str(frames_dir)]) == 0
    want = world["pipe"].animate("0: a red circle\n3: a blue circle", motion_module=folder, frames=4, steps=2, seed=3,
                                 width=64, height=64, watermark=False, sampler="Euler a", cfg_scale=7.0,
                                 control=[ControlSpec(control[1], control[2][:4])])
    clip = Image.open(steered)
    for k in range(4):
        clip.seek(k)
        assert np.array_equal(np.asarray(clip.convert("RGB")), np.asarray(want.frames[k]))
    capsys.readouterr()
    assert main(args[:-1] + [str(steered), "--control-model", str(control[1]), "--control-image",
                             str(tmp_path / "empty-nothing")]) == 2
    assert "--control-image" in capsys.readouterr().err
    # a module for another UNet (three levels) is refused by name
    from diffusers import MotionAdapter

    wide = randomize_(MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=1,
                                    motion_norm_num_groups=32), 60)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ParamError, match="does not fit") as e:
        world["pipe"].animate("x", motion_module=tmp_path / "wide", frames=2, steps=1, width=64, height=64)
    assert e.value.field == "motion_module"


# -- the A1111 AnimateDiff extension's API ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(world, control):
    import shutil

    from conftest import live_server
    from sfumato.server.app import ServerConfig, create_app

    models = world["root"] / "models"
    (models / "animatediff").mkdir(parents=True)
    shutil.copy(world["model"], models / "tiny.safetensors")
    shutil.copy(world["adapters"]["v2"][2], models / "animatediff" / "mm_v2.safetensors")
    (models / "ControlNet").mkdir()
    shutil.copy(control[1], models / "ControlNet" / "control.safetensors")
    app = create_app(ServerConfig(models_dir=models, model=models / "tiny.safetensors", watermark=False, dtype="fp32"))
    with live_server(app) as port:
        yield f"http://127.0.0.1:{port}"


def test_the_extensions_api_gives_the_librarys_clip(server, world, control):
    import base64
    import json

    import requests

    assert requests.get(f"{server}/v1/motion-modules", timeout=30).json() == ["mm_v2.safetensors"]
    unit = {"model": "mm_v2.safetensors", "format": ["GIF", "Frame"], "enable": True, "video_length": 4, "fps": 4,
            "loop_number": 0, "closed_loop": "N", "batch_size": 16, "stride": 1, "overlap": -1}
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 3, "cfg_scale": CFG, "seed": SEED,
            "sampler_name": "Euler", "width": 64, "height": 64, "alwayson_scripts": {"AnimateDiff": {"args": [unit]}}}
    r = requests.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=300)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 1 + 4                      # the GIF, then each frame
    gif = Image.open(__import__("io").BytesIO(base64.b64decode(images[0])))
    want = world["pipe"].animate(PROMPT, NEGATIVE, motion_module=world["adapters"]["v2"][2], frames=4, fps=4, steps=3,
                                 cfg_scale=CFG, seed=SEED, sampler="euler", width=64, height=64, watermark=False)
    for k in range(4):
        frame = np.asarray(Image.open(__import__("io").BytesIO(base64.b64decode(images[1 + k]))).convert("RGB"))
        assert np.array_equal(frame, np.asarray(want.frames[k]))
    assert gif.n_frames == 4
    info = json.loads(r.json()["info"])
    assert "AnimateDiff" in info["infotexts"][0] and "model: mm_v2" in info["infotexts"][0]
    # a ControlNet unit with one image per frame (batch_images) steers the clip as the library's does
    frames = []
    for image in control[2][:4]:
        buf = __import__("io").BytesIO()
        image.save(buf, format="PNG")
        frames.append(base64.b64encode(buf.getvalue()).decode())
    cn_unit = {"model": "control", "module": "none", "batch_images": frames, "resize_mode": "Just Resize"}
    steered = dict(body, alwayson_scripts={"AnimateDiff": {"args": [dict(unit, format=["Frame"])]},
                                           "ControlNet": {"args": [cn_unit]}})
    r = requests.post(f"{server}/sdapi/v1/txt2img", json=steered, timeout=300)
    assert r.status_code == 200, r.text
    want = world["pipe"].animate(PROMPT, NEGATIVE, motion_module=world["adapters"]["v2"][2], frames=4, fps=4, steps=3,
                                 cfg_scale=CFG, seed=SEED, sampler="euler", width=64, height=64, watermark=False,
                                 control=[ControlSpec(control[1], control[2][:4])])
    for k, data in enumerate(r.json()["images"]):
        frame = np.asarray(Image.open(__import__("io").BytesIO(base64.b64decode(data))).convert("RGB"))
        assert np.array_equal(frame, np.asarray(want.frames[k]))
    for cn_bad in ({"batch_images": "/etc/frames"}, {"batch_images": frames[:3]}):   # a folder; 3 frames for 4
        bad = dict(steered, alwayson_scripts={**steered["alwayson_scripts"], "ControlNet": {"args": [dict(cn_unit, **cn_bad)]}})
        r = requests.post(f"{server}/sdapi/v1/txt2img", json=bad, timeout=60)
        assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.ControlNet.args[0].batch_images", r.text
    still = dict(body, alwayson_scripts={"ControlNet": {"args": [cn_unit]}})
    r = requests.post(f"{server}/sdapi/v1/txt2img", json=still, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.ControlNet.args[0].batch_images", r.text
    # the job API runs it too (with a preview of the middle frame while it runs)
    job = requests.post(f"{server}/v1/jobs", json={"mode": "txt2img", **body}, timeout=60).json()
    import time

    for _ in range(600):
        status = requests.get(f"{server}/v1/jobs/{job['id']}", timeout=30).json()
        if status["status"] in ("done", "failed"):
            break
        time.sleep(0.1)
    assert status["status"] == "done", status
    assert len(status["result"]["images"]) == 5


@pytest.mark.parametrize("unit, field", [
    ({"model": "missing.ckpt"}, "alwayson_scripts.AnimateDiff.args[0].model"),
    ({"model": "../mm_v2.safetensors"}, "alwayson_scripts.AnimateDiff.args[0].model"),
    ({"model": "mm_v2.safetensors", "video_length": 999}, "alwayson_scripts.AnimateDiff.args[0].video_length"),
    ({"model": "mm_v2.safetensors", "format": ["WEBM"]}, "alwayson_scripts.AnimateDiff.args[0].format"),
    ({"model": "mm_v2.safetensors", "interp": "FILM"}, "alwayson_scripts.AnimateDiff.args[0].interp"),
    ({"model": "mm_v2.safetensors", "closed_loop": "X"}, "alwayson_scripts.AnimateDiff.args[0].closed_loop"),
])
def test_bad_animatediff_args_name_the_field(server, unit, field):
    import requests

    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"AnimateDiff": {"args": [unit]}}}
    r = requests.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_a_folder_of_frames_is_read_in_natural_order(tmp_path):
    from sfumato.commands.units import _control_image

    for name, value in (("f10.png", 10), ("f2.png", 2), ("f1.png", 1), ("notes.txt", None)):
        if value is None:
            (tmp_path / name).write_text("not a frame")
        else:
            Image.new("RGB", (8, 8), (value, 0, 0)).save(tmp_path / name)
    frames = _control_image(str(tmp_path), frames=True)
    assert [im.getpixel((0, 0))[0] for im in frames] == [1, 2, 10]
    from sfumato.errors import SfumatoError

    with pytest.raises(SfumatoError, match="a folder of frames is for animations"):
        _control_image(str(tmp_path), frames=False)

