"""depth2img: SD 2's depth model takes a depth map as a fifth UNet input channel.

The map (greyscale, white = near, as MiDaS / DPT write relative inverse depth; given, or inferred
from the init image by a MiDaS DPT model as ldm's depth2img does) is resized to the
latent size with bicubic interpolation and normalised per image to [−1, 1], as the model was
trained (and as diffusers' StableDiffusionDepth2ImgPipeline feeds it). Classifier-free guidance
gives the unconditional row the same map (the generation loop's image conditioning does that).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..checkpoint.specs import ModelSpec
from .params import GenerationParams, ParamError


def check_depth_request(spec: ModelSpec, p: GenerationParams, estimator: bool = False) -> None:
    """A depth model needs a depth map (given, or inferred from the init image by a MiDaS model: the
    request's, or the one the checkpoint carries), and only a depth model takes one."""
    if spec.is_depth:
        if p.depth_map is None and p.depth_model is None and estimator:
            if p.init_image is None:
                raise ParamError("depth_map", f"the {spec.family} model infers depth from an init image (img2img), "
                                              "or takes a depth map (--depth-map FILE)")
        elif p.depth_map is None and p.depth_model is None:
            raise ParamError("depth_map", f"the {spec.family} model needs a depth map (--depth-map FILE: greyscale, "
                                          "white = near), or a MiDaS model to infer it from the init image "
                                          "(--depth-model dpt_hybrid-midas-501f0c75.pt)")
        if p.depth_model is not None and p.init_image is None:
            raise ParamError("depth_model", "infers the depth of the init image: give one (img2img)")
        if p.mask is not None:
            raise ParamError("mask", f"inpainting with the depth model ({spec.family}) is not supported")
    elif p.depth_map is not None or p.depth_model is not None:
        name = "depth_map" if p.depth_map is not None else "depth_model"
        raise ParamError(name, f"the {spec.family} model takes no depth map (only SD 2's depth model does)")


def inferred_depth(p: GenerationParams, device, estimator=None) -> Image.Image:
    """The request's depth map: given, or inferred from the init image by the request's MiDaS model,
    else by the checkpoint's (ldm's depth2img: DPT at 384 px, keeping the aspect)."""
    if p.depth_map is not None:
        return p.depth_map
    from .annotate import annotator_network, estimate_depth

    net = annotator_network(p.depth_model, "midas", "depth_model", device) if p.depth_model is not None else estimator
    return estimate_depth(net, p.init_image)


def depth_values(image: Image.Image) -> np.ndarray:
    """float32 [H, W]: 16-bit and float maps keep their precision; colour maps become luminance."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32)


def depth_conditioning(depth_map: Image.Image, latent_height: int, latent_width: int, n: int) -> Tensor:
    """[n, 1, h, w] float32 in [−1, 1]: the map at latent size, min → −1 (far), max → 1 (near)."""
    d = torch.from_numpy(depth_values(depth_map))[None, None]
    d = F.interpolate(d, size=(latent_height, latent_width), mode="bicubic", align_corners=False)
    lo, hi = d.amin(), d.amax()
    if not hi > lo:
        raise ParamError("depth_map", "is flat (one value everywhere at latent size): it carries no depth")
    return (2 * (d - lo) / (hi - lo) - 1).repeat(n, 1, 1, 1)
