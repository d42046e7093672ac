"""The X/Y/Z plot: one request run once per cell of up to three axes, drawn as a grid with the
axis values as its legend (A1111's "X/Y/Z plot" script, as a library function and its pieces).

:func:`plot` varies the settings of ``Pipeline.run`` along axes named as A1111 names them ("Seed",
"Steps", "CFG Scale", "Sampler", "Schedule type", "Prompt S/R", "Denoising", …, :data:`AXES`) or by
the request field itself ("seed", "cfg_scale"). Values are given as a list or as A1111's text:
comma-separated, with ranges for numbers ("1-5" = 1..5, "1-10 (+3)" = 1, 4, 7, 10, "0-1 [5]" = five
evenly spaced). Every cell is validated before the first runs. The server's A1111 script and the
CLI's ``--xyz-*`` flags reach the same function pieces: :func:`parse_values`, :func:`draw_grid`,
:func:`draw_z`.
"""

from __future__ import annotations

import csv
import io
import random
import re
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .params import MAX_SEED, GenerationParams, ParamError

if TYPE_CHECKING:
    from ..api import ImageResult, Pipeline

MAX_VALUES = 256
_RANGE = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_COUNT = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\[(\d+(?:\.\d*)?)\s*])?\s*")

# A1111's axis labels → (the request field, its value type); "Prompt S/R" and "Size" are special
AXES: dict[str, tuple[str, type]] = {
    "Seed": ("seed", int), "Var. seed": ("subseed", int), "Var. strength": ("subseed_strength", float),
    "Steps": ("steps", int), "Hires steps": ("hires_steps", int), "CFG Scale": ("cfg_scale", float),
    "Prompt S/R": ("prompt", str), "Sampler": ("sampler", str), "Hires sampler": ("hires_sampler", str),
    "Schedule type": ("scheduler", str), "Clip skip": ("clip_skip", int), "Denoising": ("strength", float),
    "Hires upscaler": ("hires_upscaler", str), "Refiner switch at": ("refiner_switch", float),
    "RNG source": ("rng", str), "Size": ("size", str), "Token merging ratio": ("tome_ratio", float),
}
_LABEL_ONLY = {"Prompt S/R", "Sampler", "Hires sampler", "Schedule type", "Checkpoint name", "Hires upscaler",
               "RNG source"}   # legends show the bare value (A1111's format_value)


def parse_values(text: str, kind: type, name: str = "values") -> list[Any]:
    """A1111's axis text: comma-separated (CSV quoting), numbers with ranges; ParamError naming ``name``."""
    items = [v.strip() for v in chain.from_iterable(csv.reader(io.StringIO(text))) if v.strip()]
    if kind not in (int, float):
        return items
    out: list[Any] = []
    for v in items:
        m, c = _RANGE.fullmatch(v), _COUNT.fullmatch(v)
        try:
            if m is not None:
                start, end = kind(m.group(1).replace(" ", "")), kind(m.group(2).replace(" ", ""))
                step = kind(m.group(3)) if m.group(3) is not None else kind(1)
                if step == 0 or abs((end - start) / step) > MAX_VALUES:
                    raise ParamError(name, f"the range {v!r} has too many values (at most {MAX_VALUES})")
                out += list(range(start, end + 1, step)) if kind is int else np.arange(start, end + step, step).tolist()
            elif c is not None:
                start, end = kind(c.group(1).replace(" ", "")), kind(c.group(2).replace(" ", ""))
                num = int(float(c.group(3))) if c.group(3) is not None else 1
                if not 1 <= num <= MAX_VALUES:
                    raise ParamError(name, f"the count in {v!r} must be in [1, {MAX_VALUES}]")
                out += [kind(x) for x in np.linspace(start, end, num).tolist()]
            else:
                out.append(kind(v))
        except ParamError:
            raise
        except ValueError:
            raise ParamError(name, f"{v!r} is not a {'whole number' if kind is int else 'number'}") from None
    return out


@dataclass
class Axis:
    """An axis: its legend label, its values, and how a value changes the settings."""

    label: str
    values: list[Any]
    apply: Callable[[dict[str, Any], Any], dict[str, Any]]

    def legend(self, value: Any) -> str:
        text = f"{value:g}" if isinstance(value, float) else str(value)
        return text if self.label in _LABEL_ONLY else f"{self.label}: {text}"


NOTHING = Axis("Nothing", [None], lambda s, v: s)


def axis(name: str, values: str | list[Any], field: str = "values") -> Axis:
    """The axis called ``name`` (an A1111 label, or the request field it sets) over ``values``."""
    by_label = {k.lower(): k for k in AXES}
    by_field = {f: k for k, (f, _) in AXES.items()}
    label = by_label.get(name.strip().lower()) or by_field.get(name.strip())
    if label is None:
        raise ParamError(field, f"unknown axis {name!r}; valid: {', '.join(AXES)} (or their request fields)")
    key, kind = AXES[label]
    if isinstance(values, str):
        values = parse_values(values, kind, field)
    if not values:
        raise ParamError(field, f"the {label} axis has no values")
    if len(values) > MAX_VALUES:
        raise ParamError(field, f"the {label} axis has {len(values)} values; at most {MAX_VALUES}")
    if label == "Prompt S/R":
        search = values[0]

        def apply(s: dict[str, Any], v: Any) -> dict[str, Any]:
            if search not in s.get("prompt", "") and search not in s.get("negative_prompt", ""):
                raise ParamError(field, f"Prompt S/R did not find {search!r} in the prompt or negative prompt")
            return {**s, "prompt": s.get("prompt", "").replace(search, v),
                    "negative_prompt": s.get("negative_prompt", "").replace(search, v)}
    elif label == "Size":
        def apply(s: dict[str, Any], v: Any) -> dict[str, Any]:
            m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", str(v))
            if m is None:
                raise ParamError(field, f"a Size value is WIDTHxHEIGHT, got {v!r}")
            return {**s, "width": int(m.group(1)), "height": int(m.group(2))}
    elif label == "Denoising":   # txt2img with a hires pass: its denoising (A1111's one field serves both)
        def apply(s: dict[str, Any], v: Any) -> dict[str, Any]:
            hires = s.get("init_image") is None and s.get("hires_scale", 1) > 1
            return {**s, "hires_denoise" if hires else "strength": v}
    else:
        def apply(s: dict[str, Any], v: Any) -> dict[str, Any]:
            return {**s, key: v}
    return Axis(label, list(values), apply)


@dataclass
class PlotResult:
    grid: Image.Image                   # the X/Y grid, or the Z axis's grids side by side
    cells: list[ImageResult]            # index ix + iy·nx + iz·nx·ny
    infotext: str                       # the first cell's, with the script and its axes


def plot(pipe: Pipeline, x: Axis, y: Axis = NOTHING, z: Axis = NOTHING, *, legend: bool = True,
         run: Callable[[GenerationParams], ImageResult] | None = None, **settings) -> PlotResult:
    """Run ``settings`` (``Pipeline.params``' fields, one image per cell; the size defaults as in
    ``txt2img`` / ``img2img``) once per cell and draw the grid. ``run``: how a cell's request runs
    (default ``pipe.run(p).items[0]``)."""
    if settings.get("batch_size", 1) != 1:
        raise ParamError("batch_size", "the X/Y/Z plot runs one image per cell: set it to 1")
    init = settings.get("init_image")   # the sizes Pipeline.txt2img / img2img default to
    for key, side in (("width", 0), ("height", 1)):
        settings.setdefault(key, init.size[side] // 8 * 8 if init is not None else pipe.model.spec.resolution)
    for key, on in (("seed", True), ("subseed", settings.get("subseed_strength", 0) > 0)):
        if on and settings.get(key, -1) == -1:   # A1111's fix_seed: one random seed for every cell
            settings[key] = random.randint(0, MAX_SEED - 64)
    cells = []
    for vz in z.values:
        for vy in y.values:
            for vx in x.values:   # validated before any runs
                cells.append(pipe.params(**z.apply(y.apply(x.apply(dict(settings), vx), vy), vz)))
    run = run or (lambda p: pipe.run(p).items[0])
    made = [run(p) for p in cells]
    nx, ny = len(x.values), len(y.values)
    grids = [draw_grid([m.image for m in made[i * nx * ny:(i + 1) * nx * ny]], nx, x, y, legend=legend)
             for i in range(len(z.values))]
    grid = grids[0] if len(grids) == 1 else draw_z(grids, z, legend=legend)
    return PlotResult(grid, made, plot_infotext(made[0].infotext, (x, y, z)))


def plot_infotext(text: str, axes: tuple[Axis, ...], texts: tuple[str, ...] | None = None) -> str:
    """A cell's infotext with A1111's script keys: Script, X Type, X Values (as given: ``texts``), the
    seeds used (Fixed X Values), and the same for Y and Z."""
    from .infotext import quote

    extra = [("Script", "X/Y/Z plot")]
    for i, (name, a) in enumerate(zip("XYZ", axes)):
        if a.label == "Nothing":
            continue
        values = texts[i] if texts is not None else ", ".join(a.legend(v).split(": ")[-1] for v in a.values)
        extra += [(f"{name} Type", a.label), (f"{name} Values", values)]
        if a.label in ("Seed", "Var. seed"):
            extra.append((f"Fixed {name} Values", ", ".join(str(v) for v in a.values)))
    return text + "".join(f", {k}: {quote(str(v))}" for k, v in extra)


# -- drawing --------------------------------------------------------------------------------------------

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):   # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(texts: list[str], width: float, size: int) -> tuple[Any, list[str], int]:
    """A font small enough (down to 8 px) for each text to fit ``width``, words wrapped beyond that:
    (font, the texts with line breaks, their most lines)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while True:
        font = _font(size)
        if size <= 8 or all(draw.textlength(t, font=font) <= width for t in texts):
            break
        size -= 1
    out = []
    for text in texts:
        lines, line = [], ""
        for word in text.split(" "):
            if line and draw.textlength(f"{line} {word}", font=font) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        out.append("\n".join(lines + [line]))
    return font, out, max((t.count("\n") + 1 for t in out), default=1)


def draw_grid(images: list[Image.Image], cols: int, x: Axis, y: Axis, *, legend: bool = True,
              margin: int = 0) -> Image.Image:
    """The cells in ``cols`` columns (row-major), ``x``'s values above and ``y``'s left of them;
    without a legend exactly the cells, ``margin`` pixels apart."""
    w, h = max(im.width for im in images), max(im.height for im in images)
    rows = -(-len(images) // cols)
    size = max(10, min(w, h) // 6)
    show_x, show_y = legend and x.label != "Nothing", legend and y.label != "Nothing"
    x_font, x_texts, x_lines = _fit([x.legend(v) for v in x.values], w - 4, size)
    y_font, y_texts, _ = _fit([y.legend(v) for v in y.values], max(w, 96) - 8, size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max(measure.multiline_textbbox((0, 0), t, font=y_font)[2] for t in y_texts)) + 8 if show_y else 0
    top = int(x_lines * x_font.size * 1.25) + 8 if show_x else 0
    canvas = Image.new("RGB", (left + cols * w + (cols - 1) * margin, top + rows * h + (rows - 1) * margin), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(im.convert("RGB"), (left + c * (w + margin), top + r * (h + margin)))
    if show_x:
        for c, text in enumerate(x_texts):
            draw.multiline_text((left + c * (w + margin) + w / 2, top / 2), text, fill="black", font=x_font,
                                anchor="mm", align="center")
    if show_y:
        for r, text in enumerate(y_texts):
            draw.multiline_text((left / 2, top + r * (h + margin) + h / 2), text, fill="black", font=y_font,
                                anchor="mm", align="center")
    return canvas


def draw_z(grids: list[Image.Image], z: Axis, *, legend: bool = True) -> Image.Image:
    """The Z axis: the X/Y grids side by side, each titled with its Z value."""
    w, h = max(g.width for g in grids), max(g.height for g in grids)
    font, texts, lines = _fit([z.legend(v) for v in z.values], w - 8, max(10, h // 12))
    top = int(lines * font.size * 1.25) + 8 if legend else 0
    canvas = Image.new("RGB", (len(grids) * w, top + h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (g, text) in enumerate(zip(grids, texts)):
        canvas.paste(g, (i * w, top))
        if legend:
            draw.multiline_text((i * w + w / 2, top / 2), text, fill="black", font=font, anchor="mm", align="center")
    return canvas
