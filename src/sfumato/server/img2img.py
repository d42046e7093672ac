"""An A1111 img2img request's image fields as the library's: the init image, the mask (sent, or
Segment Anything's for ``sam_*`` prompts: Inpaint Anything in one call), inpainting settings,
sfumato's outpainting sides and depth map."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from ..pipeline.masks import check_outpaint, outpaint_canvas
from ..pipeline.params import MASKED_CONTENT, ParamError
from .security import ApiError, Catalog, Limits, decode_image

if TYPE_CHECKING:
    from .a1111 import Img2ImgRequest


def img2img_settings(req: Img2ImgRequest, limits: Limits, catalog: Catalog) -> dict[str, Any]:
    if not req.init_images:
        raise ApiError(422, "img2img needs one init image", "init_images")
    if len(req.init_images) > 1:
        raise ApiError(422, "only one init image is supported", "init_images")
    init = decode_image(req.init_images[0], "init_images", limits).convert("RGB")
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    out: dict[str, Any] = dict(init_image=init, strength=strength)
    if req.depth_map:
        out["depth_map"] = decode_image(req.depth_map, "depth_map", limits)
    mask = None
    if req.sam_model_name:
        if req.mask:
            raise ApiError(422, "give a mask or sam_model_name (Segment Anything makes the mask), not both", "mask")
        from .segment import object_mask

        mask = object_mask(catalog, init, req.sam_model_name, req.sam_positive_points, req.sam_negative_points,
                           req.sam_box, req.sam_dilation)
    elif req.sam_positive_points or req.sam_negative_points or req.sam_box:
        raise ApiError(422, "Segment Anything prompts need the model that reads them", "sam_model_name")
    elif req.mask:
        mask = _mask_channel(decode_image(req.mask, "mask", limits))
        if mask.size != init.size:
            mask = mask.resize(init.size, Image.LANCZOS)
    if mask is not None:
        if req.inpainting_mask_invert not in (0, 1):
            raise ApiError(422, "must be 0 or 1", "inpainting_mask_invert")
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
    if req.mask_blur is None and req.mask_blur_x != req.mask_blur_y:
        raise ApiError(422, "different horizontal and vertical blur is not supported", "mask_blur_x")
    if not 0 <= req.inpainting_fill < len(MASKED_CONTENT):
        raise ApiError(422, f"must be 0..{len(MASKED_CONTENT) - 1} ({', '.join(MASKED_CONTENT)})", "inpainting_fill")
    inpaint = dict(mask_blur=req.mask_blur if req.mask_blur is not None else req.mask_blur_x,
                   masked_content=MASKED_CONTENT[req.inpainting_fill], only_masked=req.inpaint_full_res,
                   only_masked_padding=req.inpaint_full_res_padding)
    if any((req.outpaint_left, req.outpaint_right, req.outpaint_up, req.outpaint_down)):
        if mask is not None:
            raise ApiError(422, "outpainting makes its own mask; send no mask with it", "mask")
        init, mask = _outpaint_canvas(req, init, limits)
        out["init_image"] = init
        for name, size in (("width", init.width), ("height", init.height)):
            if name not in req.model_fields_set:
                out[name] = size // 8 * 8
        # what the client left unset takes the outpainting defaults of Pipeline.outpaint
        given = req.model_fields_set | ({"mask_blur"} if "mask_blur_x" in req.model_fields_set else set())
        unset = {"denoising_strength": ("strength", 1.0), "mask_blur": ("mask_blur", 0),
                 "inpaint_full_res": ("only_masked", False), "inpainting_fill": ("masked_content", "original")}
        for field, (name, value) in unset.items():
            if field not in given:
                (out if name == "strength" else inpaint)[name] = value
    if mask is not None:
        out.update(mask=mask, **inpaint)
    return out


def _outpaint_canvas(req: Img2ImgRequest, init: Image.Image, limits: Limits) -> tuple[Image.Image, Image.Image]:
    sides = dict(left=req.outpaint_left, right=req.outpaint_right, up=req.outpaint_up, down=req.outpaint_down)
    try:
        check_outpaint(**sides)
    except ParamError as e:
        raise ApiError(422, e.message, f"outpaint_{e.field}") from None
    w, h = init.width + sides["left"] + sides["right"], init.height + sides["up"] + sides["down"]
    for name, size, limit, side in (("width", w, limits.max_width, "left"), ("height", h, limits.max_height, "up")):
        if size > limit:   # checked before the canvas is built: its size is the result's size
            field = next((f"outpaint_{k}" for k in ((side, "right") if side == "left" else (side, "down"))
                          if sides[k]), f"outpaint_{side}")
            raise ApiError(422, f"the outpainted canvas would be {w}x{h}; its {name} must be at most {limit}", field)
    if w * h > limits.max_image_pixels:
        raise ApiError(422, f"the outpainted canvas {w}x{h} exceeds {limits.max_image_pixels} pixels", "outpaint_left")
    return outpaint_canvas(init, **sides)


def _mask_channel(mask: Image.Image) -> Image.Image:
    """A1111's reading of a mask: its alpha if the alpha is used (not all opaque), else its grey."""
    if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema() != (255, 255):
        return mask.getchannel("A")
    return mask.convert("L")
