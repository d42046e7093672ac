"""Stable unCLIP: image variations and mixing against diffusers' StableUnCLIPImg2ImgPipeline components.

The reference side: transformers' CLIPVisionModelWithProjection on CLIPImageProcessorPil's pixels,
diffusers' ``noise_image_embeddings`` (StableUnCLIPImageNormalizer + the squaredcos_cap_v2
DDPMScheduler) and its UNet (``class_embed_type="projection"``), sampled by k-diffusion's Euler with
CFG (uncond: the prompt "" and a zero vector, as diffusers and A1111), noise as A1111 seeds it. The
same random weights load into sfumato from the diffusers folder and from a single file in the
original layout (``embedder.model.visual.``, ``noise_augmentor.``, ``label_emb``).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from reference import TINY_HF_TEXT, materialize, pixels_close, reference_tokens, scaled_linear_alphas_cumprod, \
    tiny_hf_text
from sfumato.api import load
from sfumato.checkpoint.convert_text import hf_text_sd
from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm
from sfumato.checkpoint.convert_vae import diffusers_vae_to_ldm
from sfumato.checkpoint.convert_vision import hf_vision_to_ours
from sfumato.checkpoint.io import load_file, save_file
from sfumato.checkpoint.specs import SPEC_METADATA_KEY, ImageEmbedder, ModelSpec, TextSlot, spec_to_json
from sfumato.cli import main
from sfumato.errors import CheckpointError
from sfumato.models.clip import TextEncoderConfig
from sfumato.models.clip_vision import VisionConfig
from sfumato.models.unclip import NoiseAugmentor
from sfumato.models.unet import UNetConfig
from sfumato.models.vae import VAEConfig
from sfumato.pipeline.params import ParamError
from sfumato.pipeline.unclip import NOISE_SEED_OFFSET

E = 24   # the tiny image embedding's width
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=2, class_embed_type="projection",
                 projection_class_embeddings_input_dim=2 * E)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
                block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
UNET_CFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0),
                      num_heads=2, context_dim=32, adm_in_channels=2 * E)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, projection_dim=E, hidden_act="gelu")
PROMPT = "a red circle"


def smooth_image(seed: int, size: int = 40) -> Image.Image:
    g = np.random.default_rng(seed)
    a = g.integers(0, 256, (size // 8, size // 8, 3)).astype(np.uint8)
    return Image.fromarray(a).resize((size, size + 6), Image.BICUBIC)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableUnCLIPImg2ImgPipeline, \
        UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("unclip")
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=E)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        normalizer.mean.copy_(torch.randn(1, E, generator=g) * 0.3)
        normalizer.std.copy_(0.5 + torch.rand(1, E, generator=g))
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        image_encoder=materialize(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)), 41),
        image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000),
        **tiny_hf_text(root, 42),
        unet=materialize(lambda: UNet2DConditionModel(**TINY_UNET), 43),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        vae=materialize(lambda: AutoencoderKL(**TINY_VAE), 44),
    )
    folder = root / "unclip-folder"
    pipe.save_pretrained(folder)
    single = write_single_file(root / "tiny-unclip.safetensors", pipe)
    return dict(root=root, pipe=pipe, folder=folder, single=single)


def write_single_file(path, pipe):
    """The pipeline's weights in the original single-file layout, with their spec in the metadata."""
    vision = VisionConfig(28, 7, 48, 3, 4, 96, E, "gelu")
    spec = ModelSpec("custom", UNET_CFG, VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
                     (TextSlot("cond_stage_model.transformer.", TextEncoderConfig("hf", 32, 2, 2, mlp_ratio=2.0)),),
                     resolution=64, image_embedder=ImageEmbedder(vision))
    sd = {"model.diffusion_model." + k: v for k, v in diffusers_unet_to_ldm(pipe.unet.state_dict(), UNET_CFG).items()}
    sd |= {"first_stage_model." + k: v for k, v in diffusers_vae_to_ldm(pipe.vae.state_dict()).items()}
    text_sd = {(k if k.startswith("text_model.") else "text_model." + k): v
               for k, v in pipe.text_encoder.state_dict().items()}
    sd |= {"cond_stage_model.transformer." + k: v for k, v in hf_text_sd(text_sd).items()}
    sd |= {"embedder.model.visual." + k: v for k, v in hf_vision_to_ours(pipe.image_encoder.state_dict()).items()}
    sd |= {"noise_augmentor.data_mean": pipe.image_normalizer.mean, "noise_augmentor.data_std": pipe.image_normalizer.std}
    ac = pipe.image_noising_scheduler.alphas_cumprod.double()   # ldm's schedule buffers, as its files carry them
    sd |= {"noise_augmentor.betas": pipe.image_noising_scheduler.betas, "noise_augmentor.alphas_cumprod": ac.float(),
           "noise_augmentor.sqrt_alphas_cumprod": ac.sqrt().float(),
           "noise_augmentor.sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt().float()}
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, path, {SPEC_METADATA_KEY: spec_to_json(spec)})
    return path


def embed_noise(seed: int, batch: int) -> torch.Tensor:
    return torch.stack([torch.randn(E, generator=torch.Generator().manual_seed(seed + i + NOISE_SEED_OFFSET))
                        for i in range(batch)])


@torch.no_grad()
def reference_vectors(pipe, images, level, seed, batch):
    """The y vectors diffusers makes: CLIPImageProcessor (PIL) pixels, image_embeds summed by weight,
    ``noise_image_embeddings`` with the documented per-image noise."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    embeds = [pipe.image_encoder(processor(images=[im], return_tensors="pt")["pixel_values"]).image_embeds[0] * w
              for im, w in images]
    mixed = torch.stack(embeds).sum(0, keepdim=True).expand(batch, E)
    return pipe.noise_image_embeddings(mixed, level, noise=embed_noise(seed, batch))


@torch.no_grad()
def reference_latents(pipe, images, *, level=0, prompt=PROMPT, steps=5, cfg=4.0, seed=11, batch=2):
    import k_diffusion as K

    y = reference_vectors(pipe, images, level, seed, batch) if images else torch.zeros(batch, 2 * E)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())

        def apply_model(self, x, t, cond, vector):
            return pipe.unet(x, t, encoder_hidden_states=cond, class_labels=vector).sample

    den = K.external.CompVisDenoiser(Wrapped())
    sigmas = den.get_sigmas(steps)
    c = pipe.text_encoder(reference_tokens([prompt])).last_hidden_state
    uc = pipe.text_encoder(reference_tokens([""])).last_hidden_state

    def model(x, sigma):
        outs = []
        for b in range(len(x)):
            out = den(torch.cat([x[b:b + 1]] * 2), torch.cat([sigma[b:b + 1]] * 2), cond=torch.cat([uc, c]),
                      vector=torch.cat([torch.zeros(1, 2 * E), y[b:b + 1]]))
            u, co = out.chunk(2)
            outs.append(u + (co - u) * cfg)
        return torch.cat(outs)

    noise = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed + i)) for i in range(batch)])
    latents = K.sampling.sample_euler(model, noise * sigmas[0], sigmas, disable=True)
    img = pipe.vae.decode(latents / 0.18215).sample
    return latents, ((img.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def test_noise_augmentation_matches_diffusers(world):
    pipe = world["pipe"]
    aug = NoiseAugmentor(E)
    aug.data_mean.copy_(pipe.image_normalizer.mean)
    aug.data_std.copy_(pipe.image_normalizer.std)
    g = torch.Generator().manual_seed(3)
    embeds, noise = torch.randn(3, E, generator=g), torch.randn(3, E, generator=g)
    for level in (0, 1, 250, 999):
        ours = aug(embeds, torch.full((3,), level), noise)
        ref = pipe.noise_image_embeddings(embeds, level, noise=noise)
        assert (ours - ref).abs().max() < 1e-5, level   # ldm computes the schedule in float64, diffusers in float32


@pytest.mark.parametrize("source", ["folder", "single"])
def test_variations_equal_reference(world, source):
    """Two images mixed by weight and a prompt, at noise level 100: latents and pixels."""
    pipe = load(world[source], dtype="fp32", device="cpu")
    assert pipe.model.spec.is_unclip
    images = [(smooth_image(1), 1.0), (smooth_image(2, 56), 0.4)]
    got = pipe.variations(images, PROMPT, noise_level=100, steps=5, cfg_scale=4.0, sampler="euler", seed=11,
                          batch_size=2, width=64, height=64, watermark=False)
    ref_latents, ref_pixels = reference_latents(world["pipe"], images, level=100)
    plain, _ = reference_latents(world["pipe"], [])
    assert (ref_latents - plain).abs().max() / plain.abs().max() > 0.05   # the images do steer
    err = ((got.latents - ref_latents).abs().max() / ref_latents.abs().max()).item()
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in got.images]))
    close = pixels_close(pixels, ref_pixels)
    print(f"{source}: latents max relative diff {err:.2e}, pixels within ±2: {close:.4%}")
    assert err <= 1e-4
    assert close >= 0.99
    text = got.items[0].infotext
    assert "unCLIP noise level: 100" in text and 'unCLIP image weights: "1, 0.4"' in text


def test_a_batch_item_equals_a_lone_run(world):
    pipe = load(world["single"], dtype="fp32", device="cpu")
    kw = dict(steps=3, cfg_scale=3.0, sampler="euler", width=64, height=64, watermark=False, noise_level=300)
    batch = pipe.variations([smooth_image(4)], seed=20, batch_size=2, **kw)
    lone = pipe.variations([smooth_image(4)], seed=21, **kw)
    assert torch.equal(batch.latents[1], lone.latents[0])


def test_img2img_embeds_its_init_image_and_txt2img_gets_zeros(world):
    """A1111's unCLIP conventions: img2img conditions on the init image (level 0), txt2img on zeros."""
    pipe = load(world["single"], dtype="fp32", device="cpu")
    init = smooth_image(6, 64).crop((0, 0, 64, 64))
    kw = dict(steps=4, cfg_scale=3.0, sampler="euler", seed=3, width=64, height=64, watermark=False)
    a = pipe.img2img(PROMPT, init, strength=0.8, **kw)
    b = pipe.img2img(PROMPT, init, strength=0.8, unclip_images=[(init, 1.0)], **kw)
    assert torch.equal(a.latents, b.latents)
    got = pipe.txt2img(PROMPT, steps=5, cfg_scale=4.0, sampler="euler", seed=11, batch_size=2, width=64, height=64,
                       watermark=False)
    ref, _ = reference_latents(world["pipe"], [])
    assert ((got.latents - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_bad_requests_name_the_field(world, tmp_path):
    pipe = load(world["single"], dtype="fp32", device="cpu")
    with pytest.raises(ParamError, match="unclip_noise_level"):
        pipe.variations([smooth_image(1)], noise_level=1000, steps=2, width=64, height=64)
    with pytest.raises(ParamError, match=r"unclip_images\[0\]\.weight"):
        pipe.variations([(smooth_image(1), float("nan"))], steps=2, width=64, height=64)
    with pytest.raises(ParamError, match=r"unclip_images\[1\]"):
        pipe.variations([smooth_image(1), "x.png"], steps=2, width=64, height=64)
    with pytest.raises(ParamError, match="unclip_images"):
        pipe.variations([], steps=2)
    plain = load(None, dtype="fp32", device="cpu")   # the bundled model: no image conditioning
    with pytest.raises(ParamError, match="unclip_images.*takes no image embedding"):
        plain.variations([smooth_image(1)], steps=2)


def test_cli(world, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    smooth_image(1).save(a)
    smooth_image(2).save(b)
    out = tmp_path / "v.png"
    args = ["variations", PROMPT, "--model", str(world["single"]), "--image", str(a), "--image", f"{b}:0.4",
            "--noise-level", "100", "--steps", "5", "--cfg-scale", "4", "--sampler", "Euler", "--seed", "11",
            "--width", "64", "--height", "64", "--no-watermark", "--dtype", "fp32", "-o", str(out)]
    assert main(args) == 0
    lib = load(world["single"], dtype="fp32", device="cpu").variations(
        [(Image.open(a), 1.0), (Image.open(b), 0.4)], PROMPT, noise_level=100, steps=5, cfg_scale=4.0,
        sampler="euler", seed=11, width=64, height=64, watermark=False)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(lib.images[0]))
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for extra, field in ((["--image", str(bad)], "--image"), (["--image", str(a), "--noise-level", "-1"],
                                                                 "unclip_noise_level")):
        code = main(["variations", "--model", str(world["single"]), *extra, "-o", str(tmp_path / "x.png")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and field in err and len(err.splitlines()) == 1, err
    code = main(["variations", "--model", str(tmp_path / "missing.safetensors"), "--image", str(a), "-o", str(out)])
    assert code == 2


def test_overlay_checks_its_base(tmp_path):
    """The bundled variant names its base by file name and sha256; another base or a path is refused."""
    from sfumato.data import BUNDLED_PATH, BUNDLED_UNCLIP_PATH

    sd, meta = load_file(BUNDLED_UNCLIP_PATH)
    base = tmp_path / "bundled.safetensors"
    base.write_bytes(BUNDLED_PATH.read_bytes()[:-1] + b" ")   # one byte differs
    save_file(sd, tmp_path / "v.safetensors", meta)
    with pytest.raises(CheckpointError, match="sha256"):
        load(tmp_path / "v.safetensors", dtype="fp32", device="cpu")
    save_file(sd, tmp_path / "w.safetensors", {**meta, "sfumato.base": "../bundled.safetensors"})
    with pytest.raises(CheckpointError, match="not a file name"):
        load(tmp_path / "w.safetensors", dtype="fp32", device="cpu")
    pipe = load(BUNDLED_UNCLIP_PATH, dtype="fp32", device="cpu")
    assert pipe.family == "bundled-unclip" and pipe.model.spec.is_unclip
    assert BUNDLED_UNCLIP_PATH.stat().st_size < 4_000_000


# -- the bundled unCLIP variant (tier 3: semantic checks on the shipped weights) ----------------------

def test_bundled_variations_keep_one_object_scenes():
    """``sfumato eval variations`` on its first 8 cases (the README gives the 32-case numbers): the
    one-object scenes come back with their object and background, mostly in a new layout. (Two-object
    scenes and mixing are below issue 16's targets: the README says by how much.)"""
    from sfumato.train.eval_unclip import evaluate_variations

    report = evaluate_variations(_bundled_unclip(), n=8)
    print(report)
    singles = [c for c in report["variations"]["cases"] if c["objects"] == 1]
    assert len(singles) == 4
    assert sum(c["keep"] for c in singles) >= 3
    assert sum(c["moved"] for c in singles) >= 2


def test_bundled_variations_from_the_command_line(tmp_path):
    """A fresh install: no --model, the bundled variant; the image's scene comes back in a new layout."""
    from sfumato.train.judge import MIN_OBJECT, detect
    from sfumato.train.shapes import Obj, Scene, render

    scene = Scene((Obj("square", "yellow", 0.3, 0.3, 0.4),), "purple")
    source = tmp_path / "x.png"
    Image.fromarray(render(scene, 64)).save(source)
    out = tmp_path / "v.png"
    assert main(["variations", "--image", str(source), "--seed", "4", "-o", str(out)]) == 0
    det = detect(np.asarray(Image.open(out).convert("RGB")))
    assert det.background == "purple"
    assert {(o.colour, o.shape) for o in det.objects if o.area >= MIN_OBJECT} == {("yellow", "square")}


def _bundled_unclip():
    from sfumato.data import BUNDLED_UNCLIP_PATH

    return BUNDLED_UNCLIP_PATH
