"""ControlNet in the generation loop and the front-ends: whole txt2img / img2img runs with one or two
ControlNets equal a reference loop (k-diffusion's Euler over a CFG denoiser calling diffusers'
UNet2DConditionModel with diffusers' ControlNetModel residuals, same weights, same noise); spans,
strength 0, hires fix, only-masked inpainting, the file cache, the CLI flags and bad input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import sfumato.pipeline.control as control_module
from reference import TINY_HF_TEXT, materialize, write_ldm_sd1, reference_tokens, scaled_linear_alphas_cumprod
from sfumato.api import ControlSpec, load
from sfumato.checkpoint.convert_controlnet import controlnet_config_from_diffusers, diffusers_controlnet_to_ldm
from sfumato.checkpoint.io import save_file
from sfumato.cli import main
from sfumato.models.controlnet import ControlNet, ControlNetConfig
from sfumato.models.unet import UNetConfig
from sfumato.pipeline.params import CONTROL_PREPROCESSORS, ParamError

BLOCKS = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              cross_attention_dim=32, attention_head_dim=2)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 **BLOCKS)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
                block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
UNET_CFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0),
                      num_heads=2, context_dim=32)
PROMPT, NEGATIVE, STEPS, CFG = "a red circle", "blurry", 6, 7.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1-style checkpoint and two ControlNet files (original layout) written from diffusers /
    transformers modules, which the reference loop runs."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("cn-world")
    unet = materialize(lambda: UNet2DConditionModel(**TINY_UNET), 21)
    vae = materialize(lambda: AutoencoderKL(**TINY_VAE), 22)
    text = materialize(lambda: CLIPTextModel(CLIPTextConfig(**TINY_HF_TEXT)), 23)
    model_path = write_ldm_sd1(root / "tiny.safetensors", unet, vae, text, UNET_CFG)
    cns, cn_paths = [], []
    for seed in (24, 25):
        cn = materialize(lambda: ControlNetModel(**BLOCKS), seed)
        ldm = diffusers_controlnet_to_ldm(cn.state_dict(), controlnet_config_from_diffusers(cn.config))
        path = root / f"control-{seed}.safetensors"
        save_file({"control_model." + k: v.contiguous() for k, v in ldm.items()}, path)
        cns.append(cn)
        cn_paths.append(path)
    wrong = ControlNet(ControlNetConfig(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                                   transformer_depth=(1, 0), num_heads=2, context_dim=64)))
    save_file({"control_model." + k: v.contiguous() for k, v in wrong.state_dict().items()}, root / "wrong.safetensors")
    pipe = load(model_path, dtype="fp32")
    return dict(root=root, model=model_path, pipe=pipe, unet=unet, vae=vae, text=text, cns=cns, cn_paths=cn_paths)


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A blurred random colour field with a bright square in it (edges for canny)."""
    rng = np.random.default_rng(seed)
    a = cv2.GaussianBlur((rng.random((size, size, 3)) * 255).astype(np.uint8), (0, 0), size / 16)
    a[size // 4: size // 2, size // 3: 3 * size // 4] = 230
    return Image.fromarray(a)


class _Controlled(nn.Module):
    """k-diffusion's CompVisDenoiser interface over diffusers' UNet with ControlNet residuals."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())

    def apply_model(self, x, t, cond, active):
        down = mid = None
        for cn, hint, scale in active:
            d, m = cn(x, t, cond, controlnet_cond=hint.expand(len(x), -1, -1, -1), conditioning_scale=scale,
                      return_dict=False)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return self.unet(x, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


@torch.no_grad()
def reference_latents(w, controls, *, seed=3, batch=1, init: Image.Image | None = None, strength=0.6):
    """controls: (diffusers ControlNetModel, hint [1, 3, 64, 64] in [0, 1], scale, start, end). A unit
    steers step i of N when start ≤ i/N ≤ end (A1111's rule)."""
    import k_diffusion as K

    den = K.external.CompVisDenoiser(_Controlled(w["unet"]))
    sigmas = den.get_sigmas(STEPS)
    if init is not None:
        t_enc = int(min(strength, 0.999) * STEPS)
        sigmas = sigmas[STEPS - t_enc - 1:]
    n = len(sigmas) - 1
    c = w["text"](reference_tokens([PROMPT])).last_hidden_state
    uc = w["text"](reference_tokens([NEGATIVE])).last_hidden_state

    def model(x, sigma):
        i = int((sigmas == sigma[0]).nonzero().item())
        active = [(cn, hint, scale) for cn, hint, scale, start, end in controls if start <= i / n <= end]
        outs = []
        for b in range(len(x)):   # uncond and cond rows through the same controlled UNet
            out = den(torch.cat([x[b:b + 1]] * 2), torch.cat([sigma[b:b + 1]] * 2), cond=torch.cat([uc, c]),
                      active=active)
            u, co = out.chunk(2)
            outs.append(u + (co - u) * CFG)
        return torch.cat(outs)

    noise = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed + i)) for i in range(batch)])
    x = noise * sigmas[0]
    if init is not None:
        pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        x = w["vae"].encode(pixels).latent_dist.mode() * 0.18215 + x
    return K.sampling.sample_euler(model, x, sigmas, disable=True)


def ours(w, control, *, seed=3, batch=1, **settings):
    p = w["pipe"].params(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="euler",
                         seed=seed, batch_size=batch, width=settings.pop("width", 64), height=settings.pop("height", 64),
                         control=control, **settings)
    return w["pipe"].generator.run(p).latents


def hint_of(image: Image.Image | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# -- parity with the reference loop -------------------------------------------------------------------------


@pytest.mark.parametrize("span", [(0.0, 1.0), (0.3, 0.7)], ids=["whole-run", "span-0.3-0.7"])
def test_txt2img_with_a_controlnet_equals_reference(world, span):
    image = smooth_image(1)
    start, end = span
    got = ours(world, [ControlSpec(world["cn_paths"][0], image, strength=0.8, start=start, end=end)], batch=2)
    ref = reference_latents(world, [(world["cns"][0], hint_of(image), 0.8, start, end)], batch=2)
    plain = reference_latents(world, [], batch=2)
    assert close(ref, plain) > 0.02, "the ControlNet does not change the reference: the test would prove nothing"
    assert close(got, ref) <= 2e-4


def test_two_controlnets_sum_their_residuals(world):
    """Two ControlNets (one fed OpenCV's Canny of the image) equal the reference summing both."""
    a, b = smooth_image(2), smooth_image(3)
    specs = [ControlSpec(world["cn_paths"][0], a, "canny", strength=0.7, start=0.0, end=0.6),
             ControlSpec(world["cn_paths"][1], b, strength=1.2, start=0.2, end=1.0)]
    edges = cv2.Canny(np.asarray(a), 100, 200)
    assert 0 < edges.mean() < 128
    got = ours(world, specs)
    ref = reference_latents(world, [(world["cns"][0], hint_of(np.repeat(edges[:, :, None], 3, 2)), 0.7, 0.0, 0.6),
                                    (world["cns"][1], hint_of(b), 1.2, 0.2, 1.0)])
    only_b = reference_latents(world, [(world["cns"][1], hint_of(b), 1.2, 0.2, 1.0)])
    assert close(ref, only_b) > 0.02
    assert close(got, ref) <= 2e-4


def test_img2img_with_a_controlnet_equals_reference(world):
    init, image = smooth_image(4), smooth_image(5)
    got = ours(world, [ControlSpec(world["cn_paths"][1], image, strength=1.0, start=0.0, end=0.5)], init_image=init,
               strength=0.6)
    ref = reference_latents(world, [(world["cns"][1], hint_of(image), 1.0, 0.0, 0.5)], init=init, strength=0.6)
    assert close(ref, reference_latents(world, [], init=init, strength=0.6)) > 0.01
    assert close(got, ref) <= 2e-4


# -- spans, strength, sizes -----------------------------------------------------------------------------------


def _x0_per_step(w, control, **settings) -> list[torch.Tensor]:
    steps = []
    p = w["pipe"].params(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="euler", seed=9, width=64,
                         height=64, control=control, **settings)
    w["pipe"].generator.run(p, lambda rec: steps.append(rec.denoised.clone()))
    return steps


def test_outside_its_span_the_model_runs_plain(world):
    image = smooth_image(6)
    plain = _x0_per_step(world, [])
    late = _x0_per_step(world, [ControlSpec(world["cn_paths"][0], image, start=0.5, end=1.0)])
    for i, (a, b) in enumerate(zip(plain, late, strict=True)):
        if i / STEPS < 0.5:
            assert torch.equal(a, b), f"step {i} is before the span"
        else:
            assert not torch.allclose(a, b, atol=1e-3), f"step {i} is in the span"
    never = _x0_per_step(world, [ControlSpec(world["cn_paths"][0], image, start=1.0, end=1.0)])  # i/N < 1 always
    assert all(torch.equal(a, b) for a, b in zip(plain, never, strict=True))


def test_strength_zero_equals_no_controlnet(world):
    image = smooth_image(7)
    plain = ours(world, [])
    assert torch.allclose(ours(world, [ControlSpec(world["cn_paths"][0], image, strength=0.0)]), plain, atol=1e-6)
    assert not torch.allclose(ours(world, [ControlSpec(world["cn_paths"][0], image, strength=0.5)]), plain, atol=1e-3)


def _recording(w, index: int = 0) -> tuple[ControlNet, list[torch.Tensor]]:
    """The pipeline's own ControlNet for a file, with a hook recording the hints it is fed."""
    from sfumato.adapters.controlnet import load_controlnet

    cn = load_controlnet(w["cn_paths"][index], UNET_CFG)
    hints: list[torch.Tensor] = []
    cn.register_forward_pre_hook(lambda _m, args: hints.append(args[1].clone()))
    return cn, hints


def test_hires_fix_preprocesses_the_control_image_at_each_size(world):
    cn, hints = _recording(world)
    image = smooth_image(8, size=96)
    result = world["pipe"].txt2img(PROMPT, steps=3, seed=1, width=64, height=64, hires_scale=2, hires_steps=2,
                                   control=[ControlSpec(cn, image, "canny")])
    assert result.images[0].size == (128, 128)
    sizes = sorted({tuple(h.shape[-2:]) for h in hints})
    assert sizes == [(64, 64), (128, 128)]
    for size in (64, 128):
        edges = cv2.Canny(np.asarray(image.resize((size, size), Image.LANCZOS)), 100, 200)
        hint = next(h for h in hints if h.shape[-1] == size)
        assert torch.equal(hint[0, 0], torch.from_numpy(edges).float() / 255)


def test_only_masked_inpainting_crops_the_control_image_like_the_init_image(world):
    cn, hints = _recording(world, 1)
    init = smooth_image(9)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:32, 16:32] = 255            # region (16, 16, 32, 32) with no padding, square like the output
    control = np.asarray(smooth_image(10, size=128))   # twice the init image's size: the box scales with it
    world["pipe"].inpaint(PROMPT, init, Image.fromarray(mask), steps=3, seed=2, width=64, height=64, strength=1.0,
                          only_masked=True, only_masked_padding=0, control=[ControlSpec(cn, control)])
    expected = F.interpolate(hint_of(control[32:64, 32:64]), size=(64, 64), mode="bilinear", antialias=True)
    assert hints and all(torch.allclose(h, expected.clamp(0, 1), atol=1e-6) for h in hints)


def test_each_file_is_loaded_once(world, monkeypatch):
    calls = []
    real = control_module.load_controlnet

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(control_module, "load_controlnet", counting)
    world["pipe"].generator.controlnets = control_module.ControlNets()
    a, b = world["cn_paths"]
    image = smooth_image(11)
    for _ in range(2):
        world["pipe"].txt2img(PROMPT, steps=2, seed=1, width=64, height=64, hires_scale=1.5, hires_steps=1,
                              control=[ControlSpec(a, image), ControlSpec(a, image, "canny"), ControlSpec(b, image)])
    world["pipe"].txt2img(PROMPT, steps=2, seed=1, width=64, height=64)   # no ControlNet: the cache stays
    world["pipe"].txt2img(PROMPT, steps=2, seed=1, width=64, height=64, control=[ControlSpec(b, image)])
    assert sorted(p.name for p in calls) == sorted([a.name, b.name])


def test_infotext_names_each_controlnet(world):
    result = world["pipe"].txt2img(PROMPT, steps=2, seed=1, width=64, height=64, control=[
        ControlSpec(world["cn_paths"][0], smooth_image(12), "canny", 0.5, 0.1, 0.9),
        ControlSpec(world["cn_paths"][1], smooth_image(13))])
    text = result.items[0].infotext
    assert ('ControlNet 0: "Module: canny, Model: control-24, Weight: 0.5, Guidance Start: 0.1, Guidance End: 0.9"'
            in text)
    assert 'ControlNet 1: "Module: none, Model: control-25, Weight: 1, Guidance Start: 0, Guidance End: 1"' in text


def test_preprocessor_names_agree():
    from sfumato.adapters.controlnet import PREPROCESSORS

    assert set(CONTROL_PREPROCESSORS) == set(PREPROCESSORS)


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, field", [
    (dict(strength=float("nan")), "control[0].strength"),
    (dict(strength=3.0), "control[0].strength"),
    (dict(start=-0.1), "control[0].start"),
    (dict(end=1.5), "control[0].end"),
    (dict(start=0.8, end=0.2), "control[0].start"),
    (dict(preprocessor="hed"), "control[0].preprocessor"),
    (dict(image="photo.png"), "control[0].image"),
    (dict(image=np.zeros((8, 8, 3), np.float32)), "control[0].image"),
    (dict(model="missing.safetensors"), "control[0].model"),
    (dict(model=42), "control[0].model"),
])
def test_bad_control_spec_names_the_field(world, change, field):
    spec = {"model": world["cn_paths"][0], "image": smooth_image(14), **change}
    with pytest.raises(ParamError) as e:
        world["pipe"].params(prompt="x", width=64, height=64, control=[ControlSpec(**spec)])
    assert e.value.field == field


def test_wrong_family_controlnet_is_named(world):
    for model in (world["root"] / "wrong.safetensors",
                  ControlNet(ControlNetConfig(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                                         transformer_depth=(1, 0), num_heads=2, context_dim=32,
                                                         norm_groups=8)))):
        with pytest.raises(ParamError, match="does not fit this model") as e:
            world["pipe"].txt2img(PROMPT, steps=2, width=64, height=64, control=[ControlSpec(model, smooth_image(15))])
        assert e.value.field == "control[0].model"


# -- the command line ---------------------------------------------------------------------------------------


def cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:   # argparse's usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def images(world):
    folder = world["root"] / "images"
    folder.mkdir()
    for i in range(3):
        smooth_image(20 + i).save(folder / f"c{i}.png")
    return folder


def _txt2img(world, out, *extra):
    return ["txt2img", PROMPT, "--model", world["model"], "--steps", "3", "--seed", "5", "--width", "64",
            "--height", "64", "--dtype", "fp32", "--no-watermark", "-o", out, *extra]


def test_cli_runs_two_controlnets(world, images, tmp_path, capsys):
    a, b = world["cn_paths"]
    args = _txt2img(world, tmp_path / "cn.png", "--control-model", a, "--control-image", images / "c0.png",
                    "--control-preprocessor", "canny", "--control-strength", "0.6", "--control-end", "0.8",
                    "--control-model", b, "--control-image", images / "c1.png", "--control-preprocessor", "none",
                    "--control-strength", "1.1", "--control-end", "1")
    assert cli(args, capsys)[0] == 0
    assert cli(_txt2img(world, tmp_path / "plain.png"), capsys)[0] == 0
    text = Image.open(tmp_path / "cn.png").info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: control-24, Weight: 0.6, Guidance Start: 0, Guidance End: 0.8"' in text
    assert 'ControlNet 1: "Module: none, Model: control-25, Weight: 1.1' in text
    controlled, plain = (np.asarray(Image.open(tmp_path / f), dtype=int) for f in ("cn.png", "plain.png"))
    assert np.abs(controlled - plain).max() > 0
    # the same two as a Python request give the same image
    pipe_image = world["pipe"].txt2img(PROMPT, steps=3, seed=5, width=64, height=64, watermark=False, control=[
        ControlSpec(a, Image.open(images / "c0.png"), "canny", 0.6, 0.0, 0.8),
        ControlSpec(b, Image.open(images / "c1.png"), "none", 1.1, 0.0, 1.0)]).images[0]
    assert np.array_equal(np.asarray(pipe_image), controlled)


def test_cli_img2img_with_a_controlnet(world, images, tmp_path, capsys):
    args = ["img2img", PROMPT, "--model", world["model"], "--init-image", images / "c2.png", "--steps", "3",
            "--strength", "0.5", "--dtype", "fp32", "-o", tmp_path / "i.png", "--control-model", world["cn_paths"][0],
            "--control-image", images / "c0.png", "--control-preprocessor", "scribble"]
    assert cli(args, capsys)[0] == 0
    assert 'ControlNet 0: "Module: scribble' in Image.open(tmp_path / "i.png").info["parameters"]


def test_cli_control_annotator(world, images, tmp_path, capsys):
    """--control-annotator gives its unit's network; 'none' holds the place of a unit without one."""
    from sfumato.models.lineart import LineartNet

    torch.manual_seed(6)
    torch.save(LineartNet().state_dict(), tmp_path / "sk_model.pth")
    a, b = world["cn_paths"]
    out = tmp_path / "out"
    out.mkdir()
    args = _txt2img(world, out / "la.png", "--control-model", a, "--control-image", images / "c0.png",
                    "--control-preprocessor", "canny", "--control-annotator", "none",
                    "--control-model", b, "--control-image", images / "c1.png",
                    "--control-preprocessor", "lineart_realistic", "--control-annotator", tmp_path / "sk_model.pth")
    assert cli(args, capsys)[0] == 0
    assert 'ControlNet 1: "Module: lineart_realistic, Model: control-25' in \
        Image.open(out / "la.png").info["parameters"]


@pytest.mark.parametrize("extra, message", [
    (["--control-model", "A", "--control-model", "B", "--control-image", "I"],
     "--control-image: given 1 times for 2 --control-model"),
    (["--control-model", "A", "--control-image", "I", "--control-strength", "1", "--control-strength", "2"],
     "--control-strength: given 2 times for 1 --control-model"),
    (["--control-image", "I"], "--control-image: given without --control-model"),
    (["--control-end", "0.5"], "--control-end: given without --control-model"),
    (["--control-model", "missing.safetensors", "--control-image", "I"], "--control-model: file not found"),
    (["--control-model", "A", "--control-image", "missing.png"], "--control-image: cannot read image"),
    (["--control-model", "A", "--control-image", "I", "--control-start", "2"], "control[0].start"),
    (["--control-model", "WRONG", "--control-image", "I"], "control[0].model: ControlNet (custom) does not fit"),
    (["--control-model", "A", "--control-image", "I", "--control-preprocessor", "hed"], "invalid choice: 'hed'"),
    (["--control-model", "A", "--control-image", "I", "--control-preprocessor", "openpose"],
     "control[0].annotator: the openpose preprocessor runs a network"),
    (["--control-model", "A", "--control-image", "I", "--control-preprocessor", "openpose", "--control-annotator",
      "missing.pth"], "control[0].annotator: annotator file not found"),
])
def test_cli_bad_control_input(world, images, tmp_path, capsys, extra, message):
    names = {"A": world["cn_paths"][0], "B": world["cn_paths"][1], "I": images / "c0.png",
             "WRONG": world["root"] / "wrong.safetensors"}
    code, _, err = cli(_txt2img(world, tmp_path / "x.png", *[names.get(e, e) for e in extra]), capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("preprocessor", ["lineart_realistic", "softedge_hed"])
def test_an_annotator_preprocessor_feeds_its_map(world, preprocessor, tmp_path):
    """An annotator preprocessor runs its network (from its weights file, through the allow-list) on
    the control image at the generation size; the ControlNet's hint is exactly that map."""
    from sfumato.models.hed import HEDNet
    from sfumato.models.lineart import LineartNet
    from sfumato.pipeline.annotate import hed_edges, lineart

    torch.manual_seed(5)
    net, fn = (LineartNet(), lineart) if preprocessor.startswith("lineart") else (HEDNet(), hed_edges)
    with torch.no_grad():   # line art: contrast enough to draw lines; HED: small enough not to saturate
        for p in net.parameters():
            p.mul_(3.0 if preprocessor.startswith("lineart") else 0.5)
    torch.save(net.state_dict(), tmp_path / "annotator.pth")
    cn, hints = _recording(world)
    image = smooth_image(9, size=96)
    world["pipe"].txt2img(PROMPT, steps=2, seed=1, width=64, height=64,
                          control=[ControlSpec(cn, image, preprocessor, annotator=tmp_path / "annotator.pth")])
    want = fn(net.eval(), image.resize((64, 64), Image.LANCZOS))
    assert want.std() > 1
    assert torch.equal(hints[0][0], torch.from_numpy(want).permute(2, 0, 1).float() / 255)


def test_annotator_preprocessors_need_their_file(world, tmp_path):
    image = smooth_image(9)
    with pytest.raises(ParamError, match="annotator") as e:
        world["pipe"].txt2img(PROMPT, steps=2, control=[ControlSpec(world["cn_paths"][0], image, "openpose")])
    assert e.value.field == "control[0].annotator"
    from sfumato.models.hed import HEDNet

    torch.save(HEDNet().state_dict(), tmp_path / "ControlNetHED.pth")
    with pytest.raises(ParamError, match=r"is a HED edge model \(ControlNetHED.pth\), not an OpenPose body model") as e:
        world["pipe"].txt2img(PROMPT, steps=2, control=[ControlSpec(world["cn_paths"][0], image, "openpose",
                                                                    annotator=tmp_path / "ControlNetHED.pth")])
    assert e.value.field == "control[0].annotator"
    with pytest.raises(ParamError) as e:
        world["pipe"].txt2img(PROMPT, steps=2, control=[ControlSpec(world["cn_paths"][0], image, "canny",
                                                                    annotator=tmp_path / "ControlNetHED.pth")])
    assert e.value.field == "control[0].annotator"
