"""The SD safety checker on finished images (optional, off by default as in A1111): each image is
CLIP-preprocessed (224², OpenAI's normalisation, as the reference's feature extractor), scored by
``models.safety_checker``, and a flagged image is hidden (black, as the reference, or blurred) and
reported: ``ImageResult.nsfw``, ``nsfw`` in the server's responses, and a ``Safety checker``
entry in its infotext.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image, ImageFilter

from .params import ParamError

if TYPE_CHECKING:
    from ..models.safety_checker import SafetyChecker

ACTIONS = ("black", "blur")


def check_action(action: str) -> str:
    if action not in ACTIONS:
        raise ParamError("safety_action", f"must be one of {', '.join(ACTIONS)}, got {action!r}")
    return action


def hide(image: Image.Image, action: str) -> Image.Image:
    """A flagged image: black (the reference), or blurred past recognition (radius 1/8 of its side)."""
    if check_action(action) == "black":
        return Image.new("RGB", image.size)
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(max(image.size) / 8))


def check_images(checker: SafetyChecker, images: list[Image.Image], action: str = "black"
                 ) -> tuple[list[Image.Image], list[bool]]:
    """``images`` with the flagged ones hidden, and the flags."""
    import torch

    from .clip_image import preprocess_clip

    if not images:
        return images, []
    param = next(checker.parameters())
    size = checker.vision_model.cfg.image_size
    pixels = preprocess_clip(images, size=size, kind="openai").to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        flags = checker(pixels).flagged
    return [hide(im, action) if flag else im for im, flag in zip(images, flags)], flags


def safety_infotext(flag: bool | None, action: str) -> dict[str, object]:
    """The infotext entry of a checked image: only a flagged one gets one."""
    return {"Safety checker": f"flagged ({'blacked out' if action == 'black' else 'blurred'})"} if flag else {}
