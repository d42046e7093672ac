"""Reading a TAESD-compatible tiny decoder: ``taesd_decoder.safetensors`` (TAESD's keys) or a diffusers
``AutoencoderTiny`` file (its decoder's keys converted at this boundary), the layout read from the
tensors, through the checked loader."""

from __future__ import annotations

import os

from torch import Tensor

from ..errors import CheckpointError
from ..models.taesd import TinyDecoder, TinyDecoderConfig
from .io import check_finite, load_file


def convert_diffusers_decoder(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderTiny`` keys (``decoder.layers.i.…``, encoder keys ignored) → TAESD's."""
    out = {}
    for key, value in sd.items():
        if key.startswith("decoder.layers."):
            index, rest = key.removeprefix("decoder.layers.").split(".", 1)
            out[f"{int(index) + 1}.{rest}"] = value
    return out


def config_from_state_dict(sd: dict[str, Tensor]) -> TinyDecoderConfig:
    """The layout of a TAESD-style decoder from its tensors (residual blocks counted between the
    bias-free upsampling convolutions)."""
    first = sd["1.weight"]
    indices = sorted({int(k.split(".")[0]) for k in sd})
    blocks, count = [], 0
    for i in indices[1:]:
        if f"{i}.conv.0.weight" in sd:
            count += 1
        elif f"{i}.bias" not in sd:        # an upsampling conv closes a group
            blocks.append(count)
            count = 0
    blocks.append(count)
    return TinyDecoderConfig(latent_channels=first.shape[1], channels=first.shape[0], blocks=tuple(blocks))


def load_tiny_decoder(path: str) -> TinyDecoder:
    """A TAESD decoder from ``taesd_decoder.safetensors`` (TAESD keys) or a diffusers
    ``AutoencoderTiny`` ``diffusion_pytorch_model.safetensors`` (converted)."""
    sd, _ = load_file(path)
    check_finite(sd, f"the weights of tiny decoder {os.path.basename(path)}")
    if any(k.startswith("decoder.layers.") for k in sd):
        sd = convert_diffusers_decoder(sd)
    if "1.weight" not in sd:
        raise CheckpointError(f"{path}: not a TAESD decoder (no '1.weight' or 'decoder.layers.0.weight')",
                              "the file is not a TAESD decoder")
    try:
        decoder = TinyDecoder(config_from_state_dict(sd))
        decoder.load_state_dict(sd, strict=True)
    except (RuntimeError, KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: not a TAESD decoder layout ({str(e).splitlines()[0][:200]})",
                              "the file's tensors are not a TAESD decoder's") from None
    return decoder.eval()
