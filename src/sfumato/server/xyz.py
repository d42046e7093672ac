"""A1111's X/Y/Z plot script (``script_name: "x/y/z plot"``): one request run once per cell of up
to three axes, the cells drawn into a grid with the axis values as legend.

``script_args`` as A1111 1.7–1.10 sends them (18 values): x_type, x_values, x_values_dropdown,
y_type, …, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode; the 14 of older releases (no
vary_seeds, no csv_mode) are read too. An axis type is an index into A1111's axis list for the
tab (txt2img's and img2img's differ: each has axes of its own), :data:`AXES`.

Each cell is the request with the axis values applied as A1111 applies them (a field, an option,
Prompt S/R), validated in full before anything runs; a value a cell cannot take is a 422 naming
``script_args``. Seeds are fixed before the cells run (one random seed for all cells) unless
"Keep -1 for seeds" is set. The response is A1111's: the grid first, then the sub-grids of a Z
axis when asked for, then every cell when "Include Sub Images" is set, each with its infotext
(the grid's names the script and its axes).
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from PIL import Image

from ..api import ImageResult
from ..pipeline import grid
from ..pipeline.grid import parse_values
from ..pipeline.infotext import quote
from ..pipeline.params import ParamError
from .a1111 import Img2ImgRequest, Txt2ImgRequest, Work, build_work, encode_png, info, run_items
from .jobs import Job
from .security import ApiError, Limits

TITLE = "x/y/z plot"
MAX_CELLS = 256

# A1111 1.10's axis list: (label, type, "txt2img"/"img2img"/None for both, how sfumato applies it)
_ALL = [
    ("Nothing", str, None, None), ("Seed", int, None, "seed"), ("Var. seed", int, None, "subseed"),
    ("Var. strength", float, None, "subseed_strength"), ("Steps", int, None, "steps"),
    ("Hires steps", int, "txt2img", "hr_second_pass_steps"), ("CFG Scale", float, None, "cfg_scale"),
    ("Image CFG Scale", float, "img2img", "image_cfg_scale"), ("Prompt S/R", str, None, "prompt s/r"),
    ("Prompt order", str, None, None), ("Sampler", str, "txt2img", "sampler_name"),
    ("Hires sampler", str, "txt2img", "hr_sampler_name"), ("Sampler", str, "img2img", "sampler_name"),
    ("Checkpoint name", str, None, "option:sd_model_checkpoint"),
    ("Negative Guidance minimum sigma", float, None, "s_min_uncond"), ("Sigma Churn", float, None, "s_churn"),
    ("Sigma min", float, None, "s_tmin"), ("Sigma max", float, None, "s_tmax"), ("Sigma noise", float, None, "s_noise"),
    ("Schedule type", str, None, "scheduler"), ("Schedule min sigma", float, None, None),
    ("Schedule max sigma", float, None, None), ("Schedule rho", float, None, None), ("Skip Early CFG", float, None, None),
    ("Beta schedule alpha", float, None, None), ("Beta schedule beta", float, None, None), ("Eta", float, None, "eta"),
    ("Clip skip", int, None, "option:CLIP_stop_at_last_layers"), ("Denoising", float, None, "denoising_strength"),
    ("Initial noise multiplier", float, None, "initial_noise_multiplier"), ("Extra noise", float, None, None),
    ("Hires upscaler", str, "txt2img", "hr_upscaler"), ("Cond. Image Mask Weight", float, "img2img", None),
    ("VAE", str, None, "option:sd_vae"), ("Styles", str, None, "styles"), ("UniPC Order", int, None, None),
    ("Face restore", str, None, "restore_faces"), ("Token merging ratio", float, None, None),
    ("Token merging ratio high-res", float, None, None), ("Always discard next-to-last sigma", str, None, None),
    ("SGM noise multiplier", str, None, None), ("Refiner checkpoint", str, None, "refiner_checkpoint"),
    ("Refiner switch at", float, None, "refiner_switch_at"), ("RNG source", str, None, "option:randn_source"),
    ("FP8 mode", str, None, None), ("Size", str, None, "size"),
]
AXES = {mode: [(label, kind, how) for label, kind, only, how in _ALL if only in (None, mode)]
        for mode in ("txt2img", "img2img")}
# axes whose values A1111 picks from a list (its dropdown; text only in csv_mode)
_CHOICES = {"Sampler", "Hires sampler", "Checkpoint name", "Schedule type", "Hires upscaler", "VAE", "Styles",
            "Refiner checkpoint", "RNG source", "Always discard next-to-last sigma", "SGM noise multiplier", "FP8 mode"}
_COST = {"Checkpoint name": 1.0, "Refiner checkpoint": 1.0, "VAE": 0.7}


def wants_plot(req: Txt2ImgRequest | Img2ImgRequest) -> bool:
    return isinstance(req.script_name, str) and req.script_name.strip().lower() == TITLE


def axes(mode: str) -> list[dict[str, Any]]:
    """The axis list of a tab, with what sfumato can vary."""
    return [{"index": i, "label": label, "supported": how is not None, "choices": label in _CHOICES}
            for i, (label, _, how) in enumerate(AXES[mode])]


@dataclass
class Axis:
    label: str
    values: list[Any]
    text: str                       # the values as the client gave them (the infotext's "X Values")
    how: str | None = None


@dataclass
class PlotWork:
    mode: str
    cells: list[Work]               # index ix + iy·nx + iz·nx·ny
    axes: tuple[Axis, Axis, Axis]
    legend: bool = True
    lone_images: bool = False
    sub_grids: bool = False
    margin: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)
    send_images: bool = True

    @property
    def n_iter(self) -> int:
        return len(self.cells)

    def order(self) -> list[int]:
        """The cells in run order: the costliest axis to change (a checkpoint) outermost, as A1111."""
        nx, ny = len(self.axes[0].values), len(self.axes[1].values)
        cost = [_COST.get(a.label, 0.0) for a in self.axes]
        outer = sorted(range(3), key=lambda k: (-cost[k], [2, 1, 0].index(k)))   # ties: z, y, x
        strides = (1, nx, nx * ny)
        sizes = [len(a.values) for a in self.axes]
        return [sum(i[k] * strides[k] for k in range(3)) for i in _nested(outer, sizes)]


def _nested(outer: list[int], sizes: list[int]) -> list[tuple[int, int, int]]:
    out = []
    for a in range(sizes[outer[0]]):
        for b in range(sizes[outer[1]]):
            for c in range(sizes[outer[2]]):
                idx = [0, 0, 0]
                idx[outer[0]], idx[outer[1]], idx[outer[2]] = a, b, c
                out.append(tuple(idx))
    return out


# -- request → cells ---------------------------------------------------------------------------------

def build_plot(req: Txt2ImgRequest | Img2ImgRequest, defaults, catalog, limits: Limits) -> PlotWork:
    """Every cell validated (a cell's error is a 422 naming ``script_args``) before anything runs."""
    mode = "img2img" if isinstance(req, Img2ImgRequest) else "txt2img"
    args = _args(req.script_args)
    for name in ("batch_size", "n_iter"):
        if getattr(req, name) != 1:
            raise ApiError(422, "the X/Y/Z plot runs one image per cell: set it to 1", name)
    base = req.model_copy(update={"script_name": None, "script_args": []})
    if not args["no_fixed_seeds"]:   # A1111's fix_seed: one random seed for every cell
        base = base.model_copy(update={k: random.randrange(4294967294) for k in ("seed", "subseed")
                                       if getattr(base, k) in (-1, None)})
    xyz = tuple(_axis(mode, args, k, not args["no_fixed_seeds"]) for k in "xyz")
    n = len(xyz[0].values) * len(xyz[1].values) * len(xyz[2].values)
    if n > MAX_CELLS:
        raise ApiError(422, f"the plot would have {n} cells; at most {MAX_CELLS}", "script_args")
    if n * req.width * req.height > limits.max_total_pixels:
        raise ApiError(422, f"{n} cells of {req.width}x{req.height} exceed {limits.max_total_pixels} pixels",
                       "script_args")
    cells = []
    for iz, z in enumerate(xyz[2].values):
        for iy, y in enumerate(xyz[1].values):
            for ix, x in enumerate(xyz[0].values):
                cell = base
                for axis, value in zip(xyz, (x, y, z)):
                    cell = _apply(cell, axis, value)
                shift = sum(i * s for i, s, vary in zip((ix, iy, iz), (1, len(xyz[0].values),
                            len(xyz[0].values) * len(xyz[1].values)), args["vary"]) if vary)
                if shift:
                    cell = cell.model_copy(update={"seed": cell.seed + shift})
                try:
                    cells.append(build_work(cell, defaults, catalog, limits))
                except ApiError as e:
                    where = ", ".join(f"{a.label} {v}" for a, v in zip(xyz, (x, y, z)) if a.label != "Nothing")
                    raise ApiError(e.status, f"the cell {where}: {e.field or 'request'}: {e.detail}",
                                   "script_args") from None
    parameters = cells[0].parameters | {"script_name": req.script_name, "script_args": req.script_args}
    return PlotWork(mode, cells, xyz, args["draw_legend"], args["include_lone_images"], args["include_sub_grids"],
                    args["margin_size"], parameters, req.send_images)


def _args(raw: list[Any]) -> dict[str, Any]:
    names = ["x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown",
             "z_type", "z_values", "z_values_dropdown", "draw_legend", "include_lone_images", "include_sub_grids",
             "no_fixed_seeds"]
    if len(raw) == 18:
        names += ["vary_x", "vary_y", "vary_z", "margin_size", "csv_mode"]
    elif len(raw) == 14:
        names += ["margin_size"]
    else:
        raise ApiError(422, f"the X/Y/Z plot takes A1111's 18 script_args (1.7+) or 14 (older), got {len(raw)}",
                       "script_args")
    args = dict(zip(names, raw))
    out: dict[str, Any] = {"csv_mode": bool(args.get("csv_mode", False)), "raw": args}
    for key in ("draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds"):
        out[key] = bool(args[key])
    out["vary"] = tuple(bool(args.get(f"vary_{k}", False)) for k in "xyz")
    margin = args["margin_size"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 500:
        raise ApiError(422, f"margin_size must be in [0, 500], got {margin!r}", "script_args")
    out["margin_size"] = int(margin)
    return out


def _axis(mode: str, args: dict[str, Any], k: str, fix_seeds: bool) -> Axis:
    raw = args["raw"]
    index, text, dropdown = raw[f"{k}_type"], raw[f"{k}_values"], raw[f"{k}_values_dropdown"]
    table = AXES[mode]
    if isinstance(index, str):   # a label instead of an index: accepted
        labels = [label.lower() for label, _, _ in table]
        index = labels.index(index.strip().lower()) if index.strip().lower() in labels else -1
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(table):
        raise ApiError(422, f"{k}_type must be an index into A1111's {mode} axis list (0–{len(table) - 1}), "
                            f"got {index!r}", "script_args")
    label, kind, how = table[index]
    if label == "Nothing":
        return Axis(label, [0], "")
    if how is None:
        raise ApiError(422, f"the {label!r} axis is not supported (sfumato has no such setting)", "script_args")
    if label in _CHOICES and not args["csv_mode"] and isinstance(dropdown, list) and dropdown:
        values, text = [str(v) for v in dropdown], ",".join(quote(str(v)) for v in dropdown)
    else:
        if not isinstance(text, str):
            raise ApiError(422, f"{k}_values must be text, got {text!r}", "script_args")
        try:
            values = parse_values(text, kind, f"{k}_values")
        except ParamError as e:
            raise ApiError(422, f"{e.field}: {e.message}", "script_args") from None
    if not values:
        raise ApiError(422, f"the {label} axis ({k}) has no values", "script_args")
    if fix_seeds and label in ("Seed", "Var. seed"):
        values = [random.randrange(4294967294) if v in (None, "", -1) else v for v in values]
    return Axis(label, values, text, how)


def _apply(req, axis: Axis, value: Any):
    how = axis.how
    if axis.label == "Nothing":
        return req
    if how == "prompt s/r":
        search = axis.values[0]
        if search not in req.prompt and search not in (req.negative_prompt or ""):
            raise ApiError(422, f"Prompt S/R did not find {search!r} in the prompt or negative prompt", "script_args")
        return req.model_copy(update={"prompt": req.prompt.replace(search, value),
                                      "negative_prompt": (req.negative_prompt or "").replace(search, value)})
    if how.startswith("option:"):
        options = dict(req.override_settings or {})
        options[how.split(":", 1)[1]] = value
        return req.model_copy(update={"override_settings": options, "override_settings_restore_afterwards": True})
    if how == "styles":
        return req.model_copy(update={"styles": [*(req.styles or []), *[s.strip() for s in value.split(",")]]})
    if how == "size":
        m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", str(value))
        if m is None:
            raise ApiError(422, f"a Size value is WIDTHxHEIGHT, got {value!r}", "script_args")
        return req.model_copy(update={"width": int(m.group(1)), "height": int(m.group(2))})
    if how == "refiner_checkpoint" and str(value).strip() in ("", "None"):
        value = None
    return req.model_copy(update={how: value})


# -- running and drawing -----------------------------------------------------------------------------

def run_plot(plot: PlotWork, job: Job, get_pipe: Callable[[Work], Any], watermark: bool) -> dict[str, Any]:
    """Every cell in run order on the worker (``get_pipe``: a cell → its loaded pipeline); an
    interrupt keeps the cells made (the others are blank, as in A1111); a cancel raises."""
    results: list[ImageResult | None] = [None] * len(plot.cells)
    pipe = None
    for done, index in enumerate(plot.order()):
        cell = plot.cells[index]
        pipe = get_pipe(cell)
        items, _, interrupted = run_items(cell, job, pipe, watermark, first=done)
        results[index] = items[0] if items else None
        if interrupted:
            break
    made = [r for r in results if r is not None]
    size = made[0].image.size if made else (plot.cells[0].params.width, plot.cells[0].params.height)
    images = [r.image if r is not None else Image.new("RGB", size) for r in results]
    first = next((r for r in results if r is not None), None)
    text = first.infotext if first else ""
    nx, ny, nz = (len(a.values) for a in plot.axes)
    x, y, z = (grid.Axis(a.label, a.values, lambda s, v: s) for a in plot.axes)
    texts = tuple(a.text for a in plot.axes)
    grids = [grid.draw_grid(images[i * nx * ny:(i + 1) * nx * ny], nx, x, y, legend=plot.legend, margin=plot.margin)
             for i in range(nz)]
    top = grids[0] if nz == 1 else grid.draw_z(grids, z, legend=plot.legend)
    seed = first.seed if first else plot.cells[0].params.seed
    out = [ImageResult(top, seed, grid.plot_infotext(text, (x, y, z), texts))]
    if plot.sub_grids and nz > 1:
        out += [ImageResult(g, seed, grid.plot_infotext(text, (x, y, grid.NOTHING), texts)) for g in grids]
    if plot.lone_images:
        out += [r for r in results if r is not None]
    base = replace(plot.cells[0], parameters=plot.parameters, send_images=plot.send_images)
    started = job.started or time.time()
    data = info(base, pipe, out, started)
    data["index_of_first_image"] = len(out) - len(made) if plot.lone_images else len(out)   # the cells' first
    images_out = [encode_png(item.image, item.infotext) for item in out] if plot.send_images else []
    return {"images": images_out, "parameters": plot.parameters, "info": json.dumps(data)}
