"""The bundled model: a Stable Diffusion in miniature, trained by sfumato on the shapes world.

Sizes are chosen so the fp16 single file stays under 16 MB: the 49408×64 token embedding of the
text encoder alone is 6.3 MB and the VAE (32 channels, 16×16×4 latents) 1.5 MB, which leaves
~8 MB for the UNet. A 48-channel UNet with attention at the 8×8 and 4×4 levels (not at 16×16,
which costs the most compute for the least gain on scenes of one or two objects) has 3.7 M
parameters and trains at ~100 samples/s on two CPU cores."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.io import save_file
from ..checkpoint.specs import SPEC_METADATA_KEY, UNET_PREFIX, VAE_PREFIX, ModelSpec, TextSlot, spec_to_json
from ..models.clip import TextEncoderConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig

BUNDLED_SPEC = ModelSpec(
    "bundled",
    UNetConfig(model_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 1),
               transformer_depth_middle=1, num_heads=4, context_dim=64, use_linear_in_transformer=True,
               norm_groups=16),
    VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, norm_groups=16, z_channels=4, embed_dim=4,
              scale_factor=1.0),  # the measured factor replaces this at export
    (TextSlot("cond_stage_model.transformer.", TextEncoderConfig("hf", width=64, layers=4, heads=4)),),
    resolution=64,
)
from ..data import BUNDLED_PATH as BUNDLED_PATH  # re-exported: the file train shapes --export writes


def bundled_state_dict(spec: ModelSpec, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                       dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """The three components under their original single-file prefixes, in ``dtype``."""
    sd: dict[str, Tensor] = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (spec.text[0].prefix, text_encoder)):
        for k, v in module.state_dict().items():
            sd[prefix + k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    return sd


def export(path: str | Path, spec: ModelSpec, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
           scale_factor: float, family: str = "bundled") -> ModelSpec:
    """Write the single-file model (fp16, spec JSON in the metadata) atomically; returns its spec."""
    spec = replace(spec, family=family, vae=replace(spec.vae, scale_factor=scale_factor))
    metadata = {SPEC_METADATA_KEY: spec_to_json(spec), "sfumato.prediction": spec.prediction}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(bundled_state_dict(spec, unet, vae, text_encoder), path, metadata)
    return spec


def evaluate_model(path: str | Path, *, steps: int = 20, cfg_scale: float = 7.0, seed: int = 0,
                   prompts: list[str] | None = None, guidance: bool = True, edit_cases: int = 50,
                   dtype: str = "fp32", device: str = "cpu", quant: str = "none") -> dict[str, dict]:
    """Generate one image per prompt (``EVAL_PROMPTS`` by default; prompt k with seed ``seed + k``)
    through ``sfumato.load(path).txt2img`` and judge them (see ``judge.evaluate``). With
    ``guidance``, add the rows of ``edits``: ``cfg_1`` (the same prompts without guidance),
    ``img2img`` and ``inpaint`` (``edit_cases`` each). ``dtype`` "bf16" stores every weight in bf16
    and forces bf16 arithmetic in the UNet and VAE even where the CPU would upcast (the quality of
    bf16 itself, whatever this machine's speed rule picks). ``device``: where it runs (auto, cpu, cuda…).
    ``quant``: "int8" evaluates the 8-bit UNet (``models.quant``)."""
    import numpy as np
    import torch

    from ..api import load
    from .edits import evaluate_edits
    from .judge import evaluate
    from .shapes import EVAL_PROMPTS

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    pipe = load(path, dtype=dtype, device=device, quant=quant)
    if dtype == "bf16":
        pipe.model.unet.dtype_override = pipe.model.vae.dtype_override = torch.bfloat16

    def generate(cfg: float) -> dict[str, np.ndarray]:
        images = {}
        for k, prompt in enumerate(prompts or EVAL_PROMPTS):
            result = pipe.txt2img(prompt, steps=steps, cfg_scale=cfg, seed=seed + k, watermark=False)
            images[prompt] = np.asarray(result.images[0].convert("RGB"))
        return images

    report = evaluate(generate(cfg_scale))
    if guidance:
        report["cfg_1"] = evaluate(generate(1.0))["all"]
        report.update(evaluate_edits(pipe, n=edit_cases, steps=steps, cfg_scale=cfg_scale, seed=seed))
    return report


def format_report(report: dict[str, dict]) -> str:
    """A table: one row per group, the fraction of images passing each check."""
    checks = ("all_ok", "objects_ok", "colours_ok", "shapes_ok", "count_ok", "background_ok")
    lines = [f"{'group':<16}{'n':>5}" + "".join(f"{c.removesuffix('_ok'):>12}" for c in checks)]
    for group, row in report.items():
        cells = "".join(f"{'-' if row[c] is None else f'{100 * row[c]:.1f}%':>12}" for c in checks)
        lines.append(f"{group:<16}{row['n']:>5}{cells}")
    return "\n".join(lines)
