"""The LoRA that ``train_lora`` trains: rank-r updates of the UNet's transformer Linears (and 1×1
``proj_in``/``proj_out`` convs), optionally of the text encoder's, put in as weight
parametrizations, and saved with kohya's key names."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..checkpoint.convert_unet import ldm_unet_to_diffusers
from ..checkpoint.load import LoadedModel
from ..errors import SfumatoError


class _Delta(nn.Module):
    """A weight parametrization ``W + up @ down · scale`` (reshaped to W's shape: 1×1 convs too)."""

    def __init__(self, down: nn.Parameter, up: nn.Parameter, scale: float):
        super().__init__()
        self.down, self.up, self.scale = down, up, scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.up @ self.down).view(weight.shape).to(weight.dtype) * self.scale


class LoRA(nn.Module):
    """Rank-``rank`` updates ``W += up @ down · alpha / rank`` of Linear (and 1×1 conv) weights, put in
    as weight parametrizations, so every use of the weight sees them (also ``F.linear`` on slices)."""

    def __init__(self, layers: dict[str, nn.Linear | nn.Conv2d], rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise SfumatoError(f"rank: must be ≥ 1, got {rank}")
        self.names = list(layers)
        self.layers = layers
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank
        self.down = nn.ParameterList(nn.Parameter(torch.empty(rank, m.weight[0].numel())) for m in layers.values())
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(m.weight.shape[0], rank)) for m in layers.values())
        for d in self.down:
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))

    @contextmanager
    def applied(self) -> Iterator[None]:
        modules = list(self.layers.values())
        for module, down, up in zip(modules, self.down, self.up):
            parametrize.register_parametrization(module, "weight", _Delta(down, up, self.scale))
        try:
            yield
        finally:
            for module in modules:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)

    def state_dict_kohya(self, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        """kohya's keys; a 1×1 conv's factors get its trailing ``[1, 1]`` dimensions."""
        sd = {}
        for (name, module), down, up in zip(self.layers.items(), self.down, self.up):
            tail = module.weight.shape[2:]
            sd[f"{name}.lora_down.weight"] = down.detach().reshape(self.rank, -1, *tail).to(dtype).contiguous()
            sd[f"{name}.lora_up.weight"] = up.detach().reshape(-1, self.rank, *tail).to(dtype).contiguous()
            sd[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return sd


def lora_targets(model: LoadedModel, text_encoder: bool = False) -> dict[str, nn.Linear | nn.Conv2d]:
    """kohya name → layer: every Linear inside the UNet's spatial transformers and their
    ``proj_in`` / ``proj_out`` (Linear or 1×1 conv), named as kohya names them (``lora_unet_`` + the
    diffusers module path, '.' → '_'); with ``text_encoder`` also every Linear of the
    (transformers-layout) text encoder's layers (``lora_te_`` + its path)."""
    unet = model.unet
    keys = list(unet.state_dict())
    to_diffusers = {ldm: d for d, ldm in ldm_unet_to_diffusers(dict(zip(keys, keys)), unet.cfg).items()}
    out: dict[str, nn.Linear | nn.Conv2d] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and ".transformer_blocks." in name or (
                isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith((".proj_in", ".proj_out"))):
            diffusers = to_diffusers[f"{name}.weight"].removesuffix(".weight")
            out["lora_unet_" + diffusers.replace(".", "_")] = module
    if text_encoder:
        if len(model.text_encoders) != 1 or model.spec.text[0].config.layout != "hf":
            raise SfumatoError("train_text_encoder: supported for one transformers-layout text encoder (SD 1.x)")
        for name, module in model.text_encoders[0].named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                out["lora_te_" + name.replace(".", "_")] = module
    return out
