"""Which model a state dict holds, read from its tensors.

The UNet's configuration is rebuilt from tensor shapes and matched against the presets in
``specs.py``; the text encoders are recognised by their key layout. The one thing shapes cannot
tell — whether an SD 2.x model predicts ε or v — is settled by ``resolve_prediction``: an explicit
override first, then a marker in the file, then a named, logged heuristic.

Keys that belong to no component and are safe to leave unused are listed in ``IGNORABLE``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from .specs import PRESETS, SPEC_METADATA_KEY, UNET_PREFIX, ModelSpec, spec_from_json

log = logging.getLogger(__name__)

# Keys a checkpoint may carry that no component consumes. Anything else left over is an error.
IGNORABLE = tuple(
    re.compile(p)
    for p in (
        r"^(?:betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
        r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
        r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
        r"|logvar|lvlb_weights)$",                               # the DDPM training buffers
        r"^model_ema\.",                                         # EMA copy (used only when asked for)
        r"(?:^|\.)text_model\.embeddings\.position_ids$",        # HF CLIP's constant position ids
        r"^cond_stage_model\.model\.attn_mask$",                 # OpenCLIP's constant causal mask
        r"^first_stage_model\.loss\.",                           # the VAE's training loss (LPIPS, discriminator)
        r"^(?:v_pred|edm_vpred\..*)$",                           # prediction-type marker tensors
        r"^low_scale_model\.(?:betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod"
        r"|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod"
        r"|sqrt_recipm1_alphas_cumprod)$",                        # the x4 upscaler's low-res noise schedule
        r"^embedder\.(?!model\.visual\.)",                       # unCLIP's CLIP model beside its image tower
        r"^depth_model\.model\.pretrained\.model\.head\.",       # depth2img's MiDaS: its ViT's ImageNet classifier
    )
)


def is_ignorable(key: str) -> bool:
    return any(p.search(key) for p in IGNORABLE)


# -- UNet shape signature ----------------------------------------------------------------------

_SIGNATURE_FIELDS = (
    "in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
    "transformer_depth", "transformer_depth_middle", "context_dim", "use_linear_in_transformer",
    "adm_in_channels", "num_classes",
)


def unet_signature(sd: Mapping[str, Tensor], prefix: str = UNET_PREFIX) -> dict[str, Any]:
    """The UNet configuration fields that tensor shapes determine (heads are not among them)."""
    def shape(key: str) -> tuple[int, ...]:
        return tuple(sd[prefix + key].shape)

    if prefix + "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"no UNet found (expected keys under '{prefix}input_blocks.')")
    model_channels, in_channels = shape("input_blocks.0.0.weight")[:2]
    blocks: dict[int, set[str]] = {}
    for key in sd:
        m = re.match(re.escape(prefix) + r"input_blocks\.(\d+)\.(\d+)\.(.*)", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(f"{m.group(2)}.{m.group(3)}")
    mults: list[int] = []
    res_counts: list[int] = []
    depths: list[int] = []
    level_open = True
    for i in sorted(blocks)[1:]:
        keys = blocks[i]
        if "0.op.weight" in keys:           # a Downsample closes the level
            level_open = True
            continue
        if level_open:
            mults.append(shape(f"input_blocks.{i}.0.in_layers.2.weight")[0] // model_channels)
            res_counts.append(0)
            depths.append(0)
            level_open = False
        res_counts[-1] += 1
        depths[-1] = max(depths[-1], _count_transformer_blocks(keys, "1."))
    middle = {k[len(prefix) + len("middle_block."):] for k in sd if k.startswith(prefix + "middle_block.")}
    attn2 = next((k for k in sd if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in sd if k.startswith(prefix) and k.endswith(".proj_in.weight")), None)
    label = sd.get(prefix + "label_emb.0.0.weight")
    classes = sd.get(prefix + "label_emb.weight")          # an nn.Embedding: class labels (x4 upscaler)
    return {
        "in_channels": in_channels,
        "out_channels": shape("out.2.weight")[0],
        "model_channels": model_channels,
        "channel_mult": tuple(mults),
        "num_res_blocks": max(res_counts) if res_counts else 0,
        "transformer_depth": tuple(depths),
        "transformer_depth_middle": _count_transformer_blocks(middle, "1."),
        "context_dim": tuple(sd[attn2].shape)[1] if attn2 else None,
        "use_linear_in_transformer": bool(proj_in and sd[proj_in].ndim == 2),
        "adm_in_channels": tuple(label.shape)[1] if label is not None else None,
        "num_classes": tuple(classes.shape)[0] if classes is not None else None,
    }


def _count_transformer_blocks(keys: set[str], head: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(head) + r"transformer_blocks\.(\d+)\.", k))}
    return len(found)


def config_signature(spec: ModelSpec) -> dict[str, Any]:
    return {f: getattr(spec.unet, f) for f in _SIGNATURE_FIELDS}


def text_signature(sd: Mapping[str, Tensor]) -> tuple[str, ...]:
    """The prefixes of the text encoders present, in key-layout terms."""
    found = []
    for prefix in sorted({slot.prefix for spec in PRESETS.values() for slot in spec.text}):
        hf = prefix + "text_model.embeddings.token_embedding.weight"
        oc = prefix + "token_embedding.weight"
        if hf in sd or oc in sd:
            found.append(prefix)
    return tuple(found)


# -- detection ---------------------------------------------------------------------------------


def detect_spec(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> ModelSpec:
    """The family's spec. SD 2.x models come back as ``sd2`` (ε); ``resolve_prediction`` decides v."""
    metadata = metadata or {}
    if SPEC_METADATA_KEY in metadata:
        try:
            return spec_from_json(metadata[SPEC_METADATA_KEY])
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    sig = unet_signature(sd)
    texts = text_signature(sd)
    matches = [
        spec for name, spec in PRESETS.items()
        if name != "sd2-v" and config_signature(spec) == sig and tuple(sorted(s.prefix for s in spec.text)) == texts
    ]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:  # a defect in the presets: the test suite guards against it
        raise CheckpointError(f"ambiguous model: matches {[m.family for m in matches]}")
    found = ", ".join(f"{k}={v}" for k, v in sig.items())
    raise CheckpointError(
        f"unknown model layout: UNet with {found}; text encoders at {list(texts) or 'none'}; "
        f"known families: {', '.join(PRESETS)}"
    )


_V_MARKER_TRUE = {"v", "v_prediction", "v-prediction", "true", "1"}


def prediction_marker(sd: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """A prediction type stated by the file itself, and where it was found."""
    if "v_pred" in sd or any(k.startswith("edm_vpred.") for k in sd):
        return "v", "marker tensor 'v_pred'"
    for key in ("modelspec.prediction_type", "sfumato.prediction", "ss_v_parameterization"):
        value = metadata.get(key)
        if value is not None:
            v = value.strip().lower()
            return ("v" if v in _V_MARKER_TRUE else "eps"), f"metadata {key}={value}"
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-v2") and arch.endswith("-v"):
        return "v", f"metadata modelspec.architecture={arch}"
    return None


def v_prediction_heuristic(unet: torch.nn.Module, context_dim: int) -> bool:
    """Does this SD 2.x UNet predict v? (the heuristic, for files that do not say)

    At the last training timestep (t=999, almost pure noise) an ε-model given a constant input
    x = 0.5 predicts noise ≈ x, so mean(out − x) ≈ 0; a v-model predicts v ≈ −x0·… and the mean
    is strongly negative. We call it v when mean(out − x) < −1, the same test AUTOMATIC1111 uses.
    """
    p = next(unet.parameters())
    with torch.no_grad():
        x = torch.full((1, unet.cfg.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
        ctx = torch.full((1, 2, context_dim), 0.5, dtype=p.dtype, device=p.device)
        t = torch.tensor([999.0], device=p.device)
        out = unet(x, t, ctx)
        score = (out.float() - x.float())[:, :4].mean().item()
    return score < -1


def resolve_prediction(
    spec: ModelSpec,
    sd: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    override: str | None,
    unet: torch.nn.Module | None = None,
) -> tuple[ModelSpec, str]:
    """Settle ε vs v: override, then file marker, then (SD 2.x only) the logged heuristic."""
    if override is not None:
        if override not in ("eps", "v"):
            raise CheckpointError(f"prediction must be 'eps' or 'v', got {override!r}")
        return _with_prediction(spec, override), "override"
    marker = prediction_marker(sd, metadata)
    if marker is not None:
        return _with_prediction(spec, marker[0]), marker[1]
    if spec.family != "sd2":
        return spec, "family default"
    if unet is None:
        return spec, "undetermined (no weights to probe; assuming eps)"
    is_v = v_prediction_heuristic(unet, spec.unet.context_dim)
    log.warning(
        "SD 2.x file without a prediction-type marker: the t=999 probe says %s-prediction "
        "(override with --prediction eps|v)", "v" if is_v else "eps",
    )
    return _with_prediction(spec, "v" if is_v else "eps"), "heuristic (t=999 probe)"


def _with_prediction(spec: ModelSpec, prediction: str) -> ModelSpec:
    if spec.family == "sd2" and prediction == "v":
        return PRESETS["sd2-v"]
    if spec.family == "sd2-v" and prediction == "eps":
        return PRESETS["sd2"]
    return replace(spec, prediction=prediction)
