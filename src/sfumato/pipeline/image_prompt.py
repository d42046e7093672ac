"""IP-Adapter image prompts in the generation loop.

A request's :class:`IPAdapterSpec` list becomes :class:`ImagePrompt` s: each adapter file and each CLIP
image encoder loaded once (kept while the next request uses them, as ControlNets are), the adapter checked
against the base model's UNet, the image encoded (CLIP preprocessing as transformers' processor does it,
at the tower's size) and projected to context tokens — for the uncond row the projection of zero image
embeds (base) or of a zero image's hidden states (plus), as diffusers does. The run loop hooks them into
the base model's cross-attention for each sampler pass on that UNet, reading the pass's step clock for
their spans (``adapters.ip_adapter.image_prompts_applied``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..adapters.ip_adapter import IPAdapter, ImagePrompt, check_fits, infotext_module, load_ip_adapter
from ..checkpoint.image_encoder import load_image_encoder
from ..errors import CheckpointError, ParamError
from ..models.clip_vision import CLIPVisionTower
from .clip_image import preprocess_clip
from .infotext import format_value
from .params import IPAdapterSpec

if TYPE_CHECKING:
    from .engine import Engine


class ImagePrompts:
    """The IP-Adapters and image encoders of the latest request that used any, each file loaded once."""

    def __init__(self) -> None:
        self._loaded: dict[tuple, object] = {}
        self.modules: list[str] = []   # the latest request's preprocessor names, for its infotext

    def get(self, specs: Sequence[IPAdapterSpec], engine: Engine) -> list[ImagePrompt]:
        """The specs' image prompts for ``engine``'s UNet (ParamErrors name ``ip_adapters[i].…``)."""
        if not specs:
            self.modules = []
            return []
        keep: dict[tuple, object] = {}
        prompts, modules = [], []
        for i, spec in enumerate(specs):
            field = f"ip_adapters[{i}]"
            adapter = self._load(keep, spec.model, engine, f"{field}.model", load_ip_adapter)
            check_fits(adapter, engine.model.unet, f"{field}.model")
            encoder = self._load(keep, spec.encoder_path, engine, f"{field}.image_encoder", load_image_encoder)
            prompts.append(image_prompt(spec, adapter, encoder, f"{field}.image_encoder"))
            modules.append(infotext_module(adapter, encoder.cfg.width))
        self._loaded, self.modules = keep, modules
        return prompts

    def _load(self, keep: dict, path: str | Path, engine: Engine, field: str, loader):
        path = Path(path).resolve()
        try:
            key = (loader.__name__, str(path), path.stat().st_mtime_ns, engine.dtype, str(engine.device))
            if key not in keep:
                found = self._loaded.get(key)
                keep[key] = found if found is not None else loader(path, dtype=engine.dtype, device=engine.device)
        except (OSError, CheckpointError) as e:
            public = e.public if isinstance(e, CheckpointError) else "cannot be read"
            raise ParamError(field, str(e), public=public) from None
        return keep[key]


@torch.no_grad()
def image_prompt(spec: IPAdapterSpec, adapter: IPAdapter, encoder: CLIPVisionTower, field: str) -> ImagePrompt:
    """The spec's image encoded and projected: cond and uncond tokens ``[tokens, cross_dim]``."""
    cfg = adapter.cfg
    plus = cfg.kind == "plus"
    width = encoder.cfg.width if plus else encoder.cfg.projection_dim
    if width != cfg.clip_dim:
        what = "hidden states" if plus else "image embeds"
        raise ParamError(field, f"the image encoder gives {what} of width {width}, IP-Adapter {adapter.name!r} "
                                f"takes {cfg.clip_dim} (another encoder: ViT-H/14 or ViT-bigG/14?)")
    pixels = preprocess_clip([spec.image], encoder.cfg.image_size, "openai")
    device, dtype = encoder.conv1.weight.device, encoder.conv1.weight.dtype
    pixels = pixels.to(device, dtype)
    if plus:
        features = encoder(torch.cat([pixels, torch.zeros_like(pixels)]), output_hidden_states=True).hidden_states[-2]
        tokens = adapter.tokens(features)
        cond, uncond = tokens[0], tokens[1]
    else:
        embeds = encoder(pixels).image_embeds
        tokens = adapter.tokens(torch.cat([embeds, torch.zeros_like(embeds)]))
        cond, uncond = tokens[0], tokens[1]
    return ImagePrompt(adapter, cond, uncond, float(spec.scale), float(spec.start), float(spec.end))


def ip_adapter_infotext(specs: Sequence[IPAdapterSpec], modules: Sequence[str], first: int = 0) -> dict[str, str]:
    """The units as sd-webui-controlnet writes IP-Adapter units: ``ControlNet N`` entries numbered on
    from ``first`` (after the request's ControlNets), with the preprocessor name, model, weight and span."""
    return {
        f"ControlNet {first + i}": f"Module: {module}, Model: {s.model_name}, Weight: {format_value(float(s.scale))}, "
                                   f"Guidance Start: {format_value(float(s.start))}, "
                                   f"Guidance End: {format_value(float(s.end))}"
        for i, (s, module) in enumerate(zip(specs, modules))
    }
