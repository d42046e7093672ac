"""depth2img: a tiny random depth model (UNet with 5 input channels) saved as a diffusers folder.
One img2img run must equal a reference loop built here from the diffusers modules and k-diffusion's
Euler sampler, with the depth map prepared by diffusers' StableDiffusionDepth2ImgPipeline; plus the
request errors and the CLI flag."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sfumato
from reference import pixels_close, reference_tokens, scaled_linear_alphas_cumprod, tiny_sd_folder
from sfumato.cli import main
from sfumato.pipeline.params import ParamError

TINY_UNET = dict(
    sample_size=8, in_channels=5, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, use_linear_projection=True, norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64, norm_num_groups=16,
    block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("depth"), "tiny-depth", TINY_UNET, TINY_VAE, 31)


@pytest.fixture(scope="module")
def loaded(tiny):
    return sfumato.load(tiny[0], dtype="fp32")


def _image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    channels = (3,) if mode == "RGB" else ()
    blocks = rng.integers(0, 255, (h // 4, w // 4, *channels))
    smooth = np.kron(blocks, np.ones((4, 4, *(1,) * len(channels))))
    return Image.fromarray(smooth.astype(np.uint8), mode)


class _DepthConcat(nn.Module):
    """k-diffusion's CompVis interface over the diffusers UNet, the depth channel appended to x."""

    def __init__(self, unet, depth):
        super().__init__()
        self.unet, self.depth = unet, depth
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())

    def apply_model(self, x, t, cond):
        return self.unet(torch.cat([x, self.depth], dim=1), t, encoder_hidden_states=cond).sample


@torch.no_grad()
def reference_depth2img(pipe, init: Image.Image, depth: Image.Image, prompt: str, negative: str, *, seed: int,
                        steps: int, cfg: float, strength: float) -> torch.Tensor:
    import k_diffusion as K
    from diffusers import StableDiffusionDepth2ImgPipeline

    depth_values = torch.from_numpy(np.asarray(depth, dtype=np.float32))[None]
    depth_cond = StableDiffusionDepth2ImgPipeline.prepare_depth_map(
        SimpleNamespace(vae_scale_factor=8), init, depth_values, 1, True, torch.float32, torch.device("cpu"))
    den = K.external.CompVisDenoiser(_DepthConcat(pipe.unet, depth_cond))   # [uncond, cond] rows: both get the map
    c = pipe.text_encoder(reference_tokens([prompt])).last_hidden_state
    uc = pipe.text_encoder(reference_tokens([negative])).last_hidden_state
    sigmas = den.get_sigmas(steps)
    t_enc = int(min(strength, 0.999) * steps)          # A1111's img2img: the last t_enc steps
    sigmas = sigmas[steps - t_enc - 1:]
    pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    latent = pipe.vae.encode(pixels).latent_dist.mode() * 0.18215
    w, h = init.size
    noise = torch.randn((1, 4, h // 8, w // 8), generator=torch.Generator().manual_seed(seed))

    def model(x, sigma):
        u, co = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uc, c])).chunk(2)
        return u + (co - u) * cfg

    latents = K.sampling.sample_euler(model, latent + noise * sigmas[0], sigmas, disable=True)
    img = pipe.vae.decode(latents / 0.18215).sample
    return ((img.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _pixels(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images]))


def test_depth2img_equals_reference(tiny, loaded):
    _, pipe = tiny
    init, depth = _image(1, (48, 32)), _image(2, (28, 20), "L")   # the map at its own size, resized to 6x4
    kw = dict(strength=0.8, steps=5, cfg_scale=6.0, seed=7, sampler="euler", scheduler="normal", watermark=False)
    assert loaded.model.spec.is_depth
    got = _pixels(loaded.img2img("a green square", init, "a red circle", depth_map=depth, **kw).images)
    ref = reference_depth2img(pipe, init, depth, "a green square", "a red circle", seed=7, steps=5, cfg=6.0,
                              strength=0.8)
    assert got.shape == ref.shape == (1, 32, 48, 3)
    assert ref.float().std() > 5
    assert pixels_close(got, ref, 2) >= 0.99
    inverted = Image.fromarray(255 - np.asarray(depth))
    other = _pixels(loaded.img2img("a green square", init, "a red circle", depth_map=inverted, **kw).images)
    assert pixels_close(other, ref, 2) < 0.9   # the map is used


def test_request_errors(loaded, tiny_model):
    depth = _image(3, (32, 32), "L")
    with pytest.raises(ParamError, match="needs a depth map") as e:
        loaded.txt2img("x", steps=1, width=32, height=32)
    assert e.value.field == "depth_map"
    with pytest.raises(ParamError, match="flat") as e:
        loaded.txt2img("x", steps=1, width=32, height=32, depth_map=Image.new("L", (32, 32), 128))
    assert e.value.field == "depth_map"
    with pytest.raises(ParamError, match="not supported") as e:
        loaded.inpaint("x", _image(4, (32, 32)), Image.new("L", (32, 32), 255), depth_map=depth, steps=1)
    assert e.value.field == "mask"
    with pytest.raises(ParamError, match="takes no depth map") as e:
        sfumato.load(tiny_model).txt2img("x", steps=1, width=64, height=64, depth_map=depth)
    assert e.value.field == "depth_map"


def test_cli_txt2img_with_depth_map(tiny, tmp_path, capsys):
    folder, _ = tiny
    _image(5, (32, 32), "L").save(tmp_path / "depth.png")
    out = tmp_path / "out.png"
    args = ["txt2img", "a cube", "--model", str(folder), "--steps", "2", "--width", "32", "--height", "32",
            "-o", str(out), "--no-watermark"]
    assert main(args + ["--depth-map", str(tmp_path / "depth.png")]) == 0
    assert Image.open(out).size == (32, 32)
    assert main(args) == 2
    assert "depth_map" in capsys.readouterr().err


def test_depth_inferred_by_midas_equals_the_reference_map(loaded):
    """--depth-model: the init image's depth inferred by a MiDaS DPT-Hybrid as ldm's depth2img does
    (MiDaS' own transform, then the network) gives the same images as that map given by hand."""
    import warnings

    from controlnet_aux.midas.api import load_midas_transform
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    from sfumato.models.midas import midas_from_state

    warnings.filterwarnings("ignore", module="timm")
    torch.manual_seed(0)
    ref = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True).eval()
    with torch.no_grad():   # timm zero-initialises these two; the head's last bias lifts most values past its ReLU
        ref.pretrained.model.pos_embed.normal_(0, 0.2)
        ref.pretrained.model.cls_token.normal_(0, 0.2)
        ref.scratch.output_conv[4].bias.add_(0.5)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("pretrained.model.head.")}
    ours = midas_from_state(sd)
    ours.load_state_dict(sd)
    init = _image(6, (48, 32))
    sample = load_midas_transform("dpt_hybrid")({"image": np.asarray(init, dtype=np.float32) / 255.0})["image"]
    with torch.no_grad():
        depth = Image.fromarray(ref(torch.from_numpy(sample)[None])[0].numpy())
    assert depth.size == (384, 256) and np.asarray(depth).std() > 0
    kw = dict(strength=0.8, steps=4, cfg_scale=6.0, seed=7, sampler="euler", scheduler="normal", watermark=False)
    by_hand = _pixels(loaded.img2img("a green square", init, "a red circle", depth_map=depth, **kw).images)
    inferred = _pixels(loaded.img2img("a green square", init, "a red circle", depth_model=ours.eval(), **kw).images)
    assert pixels_close(inferred, by_hand, 1) >= 0.999
    with pytest.raises(ParamError, match="not both") as e:
        loaded.img2img("x", init, depth_map=depth, depth_model=ours, steps=1)
    assert e.value.field == "depth_model"
    with pytest.raises(ParamError, match="init image") as e:
        loaded.txt2img("x", steps=1, width=32, height=32, depth_model=ours)
    assert e.value.field == "depth_model"


def test_cli_depth_model_flag(tiny, tmp_path, capsys):
    folder, _ = tiny
    _image(7, (32, 32)).save(tmp_path / "init.png")
    args = ["img2img", "a cube", "--model", str(folder), "--steps", "2", "--init-image", str(tmp_path / "init.png"),
            "-o", str(tmp_path / "out.png"), "--depth-model", str(tmp_path / "missing.pt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "depth_model" in err and "not found" in err
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    assert main(args[:-1] + [str(tmp_path / "other.pt")]) == 2
    assert "not an annotator" in capsys.readouterr().err


def test_a_depth_checkpoint_carrying_its_midas_infers_depth(loaded, tmp_path):
    """ldm's depth2img files (512-depth-ema) hold the MiDaS DPT-Hybrid under ``depth_model.model.``: it
    loads with the model, and img2img without a depth map infers one from the init image with it,
    giving what that network passed as ``depth_model`` gives."""
    import warnings

    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    from sfumato.checkpoint.io import save_file
    from sfumato.checkpoint.specs import SPEC_METADATA_KEY, UNET_PREFIX, VAE_PREFIX, spec_to_json
    from sfumato.models.midas import midas_from_state

    warnings.filterwarnings("ignore", module="timm")
    torch.manual_seed(0)
    ref = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True).eval()
    with torch.no_grad():
        ref.pretrained.model.pos_embed.normal_(0, 0.2)
        ref.scratch.output_conv[4].bias.add_(0.5)
    m = loaded.model
    sd = {}
    for prefix, module in ((UNET_PREFIX, m.unet), (VAE_PREFIX, m.vae), (m.spec.text[0].prefix, m.text_encoders[0])):
        sd.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
    # stored in fp16, as the published files are; the head (the ViT's classifier) is in them too
    sd.update({"depth_model.model." + k: v.half().contiguous() for k, v in ref.state_dict().items()})
    path = tmp_path / "tiny-depth.safetensors"
    save_file(sd, path, {SPEC_METADATA_KEY: spec_to_json(m.spec), "sfumato.prediction": m.spec.prediction})
    del sd
    single = sfumato.load(path, dtype="fp32")
    assert single.model.depth_estimator is not None
    net = midas_from_state({k: v for k, v in ref.state_dict().items() if not k.startswith("pretrained.model.head.")})
    net.load_state_dict({k: v.half().float() for k, v in ref.state_dict().items()
                         if not k.startswith("pretrained.model.head.")})
    init = _image(8, (48, 32))
    kw = dict(strength=0.8, steps=3, cfg_scale=6.0, seed=2, sampler="euler", scheduler="normal", watermark=False)
    inferred = _pixels(single.img2img("a green square", init, **kw).images)
    given = _pixels(loaded.img2img("a green square", init, depth_model=net.eval(), **kw).images)
    assert pixels_close(inferred, given, 1) >= 0.999
    with pytest.raises(ParamError, match="infers depth from an init image") as e:
        single.txt2img("x", steps=1, width=32, height=32)
    assert e.value.field == "depth_map"
