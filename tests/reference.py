"""Independent reference chain for end-to-end tests: diffusers / transformers modules, open_clip's
tokenizer and k-diffusion's discrete denoiser and samplers. Nothing here imports sfumato except the
key converters used to *write* original-layout files from the reference modules' weights."""

from __future__ import annotations

import math

import torch
from torch import nn

SD1_UNET_DIFFUSERS = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD_VAE_DIFFUSERS = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L_HF = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded random values that keep activations in a sane range:
    weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1²), biases ~ N(0, 0.02²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                if "embedding" in name:
                    fan_in = 16
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return module


def materialize(make, seed: int) -> nn.Module:
    """Build a module on the meta device (fast), then allocate and randomise it."""
    with torch.device("meta"):
        m = make()
    m = m.to_empty(device="cpu")
    # non-persistent buffers (e.g. position ids) lost by to_empty are rebuilt by a fresh copy
    with torch.device("cpu"):
        for name, buf in list(m.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            mod = m.get_submodule(owner) if owner else m
            if "position_ids" in leaf:
                mod.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
    return randomize_(m, seed).eval().requires_grad_(False)


def round_to(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round the weights through a storage dtype so both sides see identical values."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).to(p.dtype))
    return module


def hf_text_state(model: nn.Module) -> dict:
    """transformers ≥5 drops the ``text_model.`` prefix from a bare CLIPTextModel's keys; files keep it."""
    sd = model.state_dict()
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def reference_tokens(prompts: list[str], pad_id: int = 49407) -> torch.Tensor:
    """SD 1.x tokens via open_clip's tokenizer: BOS + ids[:75] + EOS, padded with ``pad_id``."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    rows = []
    for p in prompts:
        ids = [49406] + tok.encode(p)[:75] + [49407]
        rows.append(ids + [pad_id] * (77 - len(ids)))
    return torch.tensor(rows)


class _CompVisWrapper(nn.Module):
    """What k-diffusion's CompVisDenoiser expects: ``apply_model`` and ``alphas_cumprod``."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod)

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


@torch.no_grad()
def reference_txt2img(
    unet, vae, text_model, prompt: str, negative: str, *, seed: int, steps: int, cfg: float,
    width: int, height: int, sampler: str = "euler", scheduler: str = "normal", batch: int = 1,
    scale_factor: float = 0.18215, discard_penultimate: bool = False,
) -> torch.Tensor:
    """uint8 [B, H, W, 3] from the reference modules with k-diffusion sampling."""
    import k_diffusion as K

    den = K.external.CompVisDenoiser(_CompVisWrapper(unet, scaled_linear_alphas_cumprod()))
    n = steps + 1 if discard_penultimate else steps   # A1111 asks for one more σ, then drops one
    c = text_model(reference_tokens([prompt] * batch)).last_hidden_state
    uc = text_model(reference_tokens([negative] * batch)).last_hidden_state
    if scheduler == "normal":
        sigmas = den.get_sigmas(n)
    elif scheduler == "karras":
        sigmas = K.sampling.get_sigmas_karras(n, den.sigma_min.item(), den.sigma_max.item())
    else:
        raise ValueError(scheduler)
    if discard_penultimate:  # A1111's "discard_next_to_last_sigma" for DPM2
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])

    def model(x, sigma):
        out = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uc, c]))
        u, co = out.chunk(2)
        return u + (co - u) * cfg

    noise = torch.stack([
        torch.randn((4, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(seed + i))
        for i in range(batch)
    ])
    fn = getattr(K.sampling, "sample_" + {"dpm2": "dpm_2"}.get(sampler, sampler))
    latents = fn(model, noise * sigmas[0], sigmas, disable=True)
    img = vae.decode(latents / scale_factor).sample
    return ((img.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def pixels_close(a: torch.Tensor, b: torch.Tensor, tol: int = 2) -> float:
    """Fraction of pixel values within ±tol."""
    return ((a.int() - b.int()).abs() <= tol).float().mean().item()


def write_hf_clip_tokenizer(folder) -> None:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, built from the CLIP BPE file the way
    CLIP builds its vocabulary (bytes, bytes+</w>, merges, the two specials)."""
    import gzip
    import json
    from pathlib import Path

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


# a 2-layer, 32-wide CLIP text model with the real vocabulary (tiny diffusers pipelines in the tests)
TINY_HF_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def tiny_hf_text(root, seed: int) -> dict:
    """``text_encoder`` (random, seeded) and ``tokenizer`` (the real CLIP BPE, written under `root`)
    for a tiny diffusers pipeline."""
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(root) / "tok"
    write_hf_clip_tokenizer(folder)
    return {"text_encoder": materialize(lambda: CLIPTextModel(CLIPTextConfig(**TINY_HF_TEXT)), seed),
            "tokenizer": CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                       pad_token="<|endoftext|>", model_max_length=77)}


def tiny_sd_folder(root, name: str, unet: dict, vae: dict, seed: int):
    """A diffusers StableDiffusionPipeline of random tiny parts (UNet and VAE configs as given, the
    tiny CLIP text parts, Euler), saved under ``root/name``: ``(folder, pipe)``. Seeds seed, +1, +2."""
    from pathlib import Path

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline(
        vae=materialize(lambda: AutoencoderKL(**vae), seed),
        **tiny_hf_text(root, seed + 1),
        unet=materialize(lambda: UNet2DConditionModel(**unet), seed + 2),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = Path(root) / name
    pipe.save_pretrained(folder)
    return folder, pipe


def write_ldm_sd1(path, unet, vae, text, unet_cfg):
    """A tiny SD 1-style single file in the original layout from diffusers / transformers modules (the
    reference side of a parity test), with its spec in the metadata; returns ``path``."""
    from sfumato.checkpoint.convert_text import hf_text_sd
    from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm
    from sfumato.checkpoint.convert_vae import diffusers_vae_to_ldm
    from sfumato.checkpoint.io import save_file
    from sfumato.checkpoint.specs import SPEC_METADATA_KEY, ModelSpec, TextSlot, spec_to_json
    from sfumato.models.clip import TextEncoderConfig
    from sfumato.models.vae import VAEConfig

    spec = ModelSpec("custom", unet_cfg, VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
                     (TextSlot("cond_stage_model.transformer.", TextEncoderConfig("hf", 32, 2, 2, mlp_ratio=2.0)),),
                     resolution=64)
    sd = {"model.diffusion_model." + k: v for k, v in diffusers_unet_to_ldm(unet.state_dict(), unet_cfg).items()}
    sd |= {"first_stage_model." + k: v for k, v in diffusers_vae_to_ldm(vae.state_dict()).items()}
    text_sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text.state_dict().items()}
    sd |= {"cond_stage_model.transformer." + k: v for k, v in hf_text_sd(text_sd).items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, path, {SPEC_METADATA_KEY: spec_to_json(spec)})
    return path
