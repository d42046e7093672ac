"""AnimateDiff: N frames of one clip, denoised together by a still-image model with a motion module.

* The motion module's temporal transformers are attached to the UNet for the run (forward hooks on
  the last spatial layer of each block: after the attention, or the ResBlock where there is none,
  before any up-sampler) and always detached after.
* Frame f's initial noise is seeded ``seed + f`` (A1111's batch convention; the extension generates
  a clip as one batch). Classifier-free guidance sends a window's unconditional clip and then its
  conditional clip through the UNet (two calls: half the activation memory of one; each motion module
  sees every frame of the window); at CFG 1 only the conditional one.
* Clips longer than the context (the module's length, 16 by default) are denoised in overlapping
  windows, scheduled per step as the A1111 extension's "uniform" scheduler does (an ordered-halving
  offset per step; closed loops wrap around), each frame's x̂0 averaged over its windows.
* Prompt travel: lines ``N: text`` in the prompt are keyframes; frame f's conditioning interpolates
  linearly between the keyframes around it (held before the first and after the last; a closed loop
  travels back to the first). Text before the first keyframe line and after the last is the head and
  tail of every frame's prompt.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..diffusion.noise import ImageNoise
from ..diffusion.samplers import StepRecord, get_sampler, sampler_sigmas
from ..errors import ParamError
from .guidance import StepClock
from ..models.motion import MotionAdapter
from ..models.unet import Downsample, Upsample, UNetModel
from ..text.conditioner import Cond

MAX_FRAMES = 256


@dataclass
class AnimationSettings:
    frames: int = 16
    fps: int = 8
    context: int | None = None      # frames per window (default: 16, at most the module's length)
    overlap: int = -1               # frames shared by neighbouring windows (-1: a quarter of the context)
    stride: int = 1                 # the extension's context stride (1: windows of consecutive frames)
    closed_loop: bool = False       # the last frame leads back to the first (the windows wrap around)
    loop_prompts: bool | None = None  # prompt travel wraps too (None: as closed_loop; the extension's R-P: no)

    def validate(self, module_frames: int) -> None:
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or not 1 <= self.frames <= MAX_FRAMES:
            raise ParamError("frames", f"must be an integer in [1, {MAX_FRAMES}], got {self.frames!r}")
        if isinstance(self.fps, bool) or not isinstance(self.fps, int) or not 1 <= self.fps <= 60:
            raise ParamError("fps", f"must be an integer in [1, 60], got {self.fps!r}")
        context = self.context_length(module_frames)
        if not 1 <= context <= module_frames:
            raise ParamError("context", f"must be 1 to the motion module's {module_frames} frames, got {context}")
        if not -1 <= self.overlap < context:
            raise ParamError("overlap", f"must be -1 (a quarter of the context) or 0 to {context - 1}, got {self.overlap}")
        if not 1 <= self.stride <= 8:
            raise ParamError("stride", f"must be 1 to 8, got {self.stride}")

    def context_length(self, module_frames: int) -> int:
        return self.context if self.context is not None else min(16, module_frames)

    def overlap_frames(self, module_frames: int) -> int:
        return self.context_length(module_frames) // 4 if self.overlap == -1 else self.overlap


# -- attaching the motion module ------------------------------------------------------------------------

def motion_targets(unet: UNetModel, adapter: MotionAdapter) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(UNet layer, the motion module that follows it) pairs, as AnimateDiff places them."""
    n = adapter.cfg.per_down
    pairs = []

    def last_spatial(block) -> torch.nn.Module:
        return [layer for layer in block if not isinstance(layer, (Upsample, Downsample))][-1]

    for i, level in enumerate(adapter.down_blocks):
        for j, module in enumerate(level.motion_modules):
            pairs.append((last_spatial(unet.input_blocks[1 + i * (n + 1) + j]), module))
    if adapter.mid_block is not None:
        pairs.append((unet.middle_block[1], adapter.mid_block.motion_modules[0]))
    for i, level in enumerate(adapter.up_blocks):
        for j, module in enumerate(level.motion_modules):
            pairs.append((last_spatial(unet.output_blocks[i * (n + 1) + j]), module))
    return pairs


@contextmanager
def motion_attached(unet: UNetModel, adapter: MotionAdapter, frames: Callable[[], int]) -> Iterator[None]:
    """The adapter's modules run after their UNet layers while the context is open; ``frames()`` is
    the clip length of the current call (the batch is clips × frames, each clip's frames consecutive)."""
    handles = []
    try:
        for layer, module in motion_targets(unet, adapter):
            def hook(_m, _args, out, module=module):
                return module(out, frames()).to(out.dtype)

            handles.append(layer.register_forward_hook(hook))
        for name, kv in (adapter.text_kv or {}).items():   # the module's text key/value deltas, if it has them
            path = name.replace("__", ".")
            try:
                attn = unet.get_submodule(path)
                fits = (attn.to_k.in_features, attn.to_k.out_features, attn.to_v.out_features) == \
                    (kv.k_down.in_features, kv.k_up.out_features, kv.v_up.out_features)
            except AttributeError:
                fits = None
            if not fits:
                raise ParamError("motion_module", f"its text adapter steers {path}, which this UNet does not have"
                                 if fits is None else f"its text adapter does not fit {path}'s widths")
            for proj, delta in ((attn.to_k, kv.key), (attn.to_v, kv.value)):
                def text_hook(_m, args, out, delta=delta):
                    return out + delta(args[0].to(out.dtype)).to(out.dtype)

                handles.append(proj.register_forward_hook(text_hook))
        yield
    finally:
        for h in handles:
            h.remove()


# -- context windows ----------------------------------------------------------------------------------------

def ordered_halving(step: int) -> float:
    """The step's bits reversed, as a fraction in [0, 1): 0, 1/2, 1/4, 3/4, … (the extension's offsets)."""
    return int(f"{step:064b}"[::-1], 2) / (1 << 64)


def context_windows(step: int, frames: int, size: int, overlap: int, stride: int = 1,
                    closed_loop: bool = False) -> list[list[int]]:
    """The A1111 extension's "uniform" schedule: windows of ``size`` frames (every ``2^k``-th frame for
    the strides k), shifted by an ordered-halving offset that changes every step."""
    if frames <= size:
        return [list(range(frames))]
    windows = []
    stride = min(stride, int(np.ceil(np.log2(frames / size))) + 1)
    for step_size in 1 << np.arange(stride):
        pad = int(round(frames * ordered_halving(step)))
        start = int(ordered_halving(step) * step_size) + pad
        stop = frames + pad + (0 if closed_loop else -overlap)
        for j in range(start, stop, int(size * step_size - overlap)):
            windows.append([e % frames for e in range(j, j + size * int(step_size), int(step_size))])
    return windows


# -- prompt travel -------------------------------------------------------------------------------------------

def travel_prompts(prompt: str, frames: int) -> tuple[dict[int, str], str | None]:
    """Keyframe prompts {frame: full prompt} (or None for a plain prompt) and the plain prompt."""
    lines = prompt.splitlines()
    if len(lines) == 1 and re.match(r"^\s*\d+\s*:", prompt):   # one line: "0: a red circle, 8: a blue circle"
        lines = re.split(r",\s*(?=\d+\s*:)", prompt.strip())
    keys = [(i, m) for i, m in ((i, keyed_match(line)) for i, line in enumerate(lines)) if m]
    if not keys:
        return {}, prompt
    first, last = keys[0][0], keys[-1][0]
    for i in range(first, last + 1):
        if not keyed_match(lines[i]) and lines[i].strip():
            raise ParamError("prompt", f"prompt travel: line {i + 1} ({lines[i].strip()[:40]!r}) is not 'FRAME: text' "
                                       "between the keyframes")
    head = ", ".join(line.strip() for line in lines[:first] if line.strip())
    tail = ", ".join(line.strip() for line in lines[last + 1:] if line.strip())
    out: dict[int, str] = {}
    for _, m in keys:
        frame = int(m[1])
        if frame >= frames:
            raise ParamError("prompt", f"prompt travel: keyframe {frame} is past the clip's {frames} frames")
        if frame in out:
            raise ParamError("prompt", f"prompt travel: keyframe {frame} is given twice")
        out[frame] = ", ".join(part for part in (head, m[2].strip(), tail) if part)
    return dict(sorted(out.items())), None


def keyed_match(line: str):
    return re.match(r"^\s*(\d+)\s*:\s*(.*)$", line)


def frame_weights(keys: Sequence[int], frames: int, closed_loop: bool) -> list[list[tuple[int, float]]]:
    """For each frame, the keyframes (indices into the sorted ``keys``) it blends, with their weights."""
    out, n = [], len(keys)
    for f in range(frames):
        prev = max((i for i, k in enumerate(keys) if k <= f), default=None)
        nxt = min((i for i, k in enumerate(keys) if k > f), default=None)
        if n == 1 or (prev is not None and keys[prev] == f):
            out.append([(prev if prev is not None else 0, 1.0)])
            continue
        if prev is None:
            if not closed_loop:
                out.append([(0, 1.0)])
                continue
            prev, a = n - 1, keys[-1] - frames
        else:
            a = keys[prev]
        if nxt is None:
            if not closed_loop:
                out.append([(prev, 1.0)])
                continue
            nxt, b = 0, keys[0] + frames
        else:
            b = keys[nxt]
        t = (f - a) / (b - a)
        out.append([(prev, 1.0 - t), (nxt, t)])
    return out


def frame_conds(encode: Callable[[list[str]], Cond], prompt: str, frames: int, closed_loop: bool) -> Cond:
    """(frames) rows of conditioning for the prompt (travelling between keyframes when it has them)."""
    keyed, plain = travel_prompts(prompt, frames)
    if plain is not None:
        c = encode([plain])
        return Cond(c.context.repeat(frames, 1, 1), c.y.repeat(frames, 1) if c.y is not None else None)
    keys = list(keyed)
    encoded = encode([keyed[k] for k in keys])
    rows_c, rows_y = [], []
    for parts in frame_weights(keys, frames, closed_loop):
        rows_c.append(sum(w * encoded.context[i] for i, w in parts))
        if encoded.y is not None:
            rows_y.append(sum(w * encoded.y[i] for i, w in parts))
    return Cond(torch.stack(rows_c), torch.stack(rows_y) if rows_y else None)


# -- the run ----------------------------------------------------------------------------------------------------

def clip_noise(shape: tuple[int, int, int], seed: int, frames: int, rng: str = "cpu") -> ImageNoise:
    """The clip's noise streams: frame f's from seed + f (``initial()`` is (frames, C, h, w))."""
    return ImageNoise(shape, [seed + f for f in range(frames)], rng=rng)


def denoise_clip(engine, adapter: MotionAdapter, x: Tensor, sigmas: Tensor, cond: Cond, uncond: Cond,
                 cfg_scale: float, settings: AnimationSettings, sampler: str,
                 callback: Callable[[StepRecord], None] | None = None, image_cond: Tensor | None = None,
                 noise_sampler=None, control: ClipControl | None = None, clock: StepClock | None = None) -> Tensor:
    """Sample a clip's latents (frames, C, h, w) with the motion module attached, window by window
    (``control``: ControlNets steering each window with its frames' images; ``clock``: the step clock
    of the whole schedule when ``sigmas`` is its tail, for img2img)."""
    frames = x.shape[0]
    module_frames = adapter.cfg.max_frames
    size = settings.context_length(module_frames)
    overlap = settings.overlap_frames(module_frames)
    state = {"frames": frames}
    clock = clock if clock is not None else StepClock(sigmas)

    def guided(xw: Tensor, sw: Tensor, rows: list[int]) -> Tensor:
        # the window's unconditional clip, then its conditional clip: two UNet calls of len(rows)
        # frames each (half the activations of one call; the motion module sees each clip whole);
        # at CFG 1 the conditional clip only
        index = torch.tensor(rows)
        ic = image_cond[index] if image_cond is not None else None
        state["frames"] = len(rows)
        out = []
        for conds, is_uncond in ((uncond, True), (cond, False)):
            if is_uncond and cfg_scale == 1:
                continue
            denoiser = engine.denoiser if control is None else control.denoiser(rows, clock, is_uncond)
            out.append(denoiser(xw, sw, (conds.rows(index), ic)))
        if cfg_scale == 1:
            return out[0]
        u, c = out
        return u + cfg_scale * (c - u)

    def denoise(xc: Tensor, sigma: Tensor) -> Tensor:
        step = clock.step - clock.start   # the window schedule counts this pass's steps
        total = torch.zeros_like(xc)
        count = torch.zeros(frames, 1, 1, 1)
        for rows in context_windows(step, frames, size, overlap, settings.stride, settings.closed_loop):
            total[rows] += guided(xc[rows], sigma[rows], rows)
            count[rows] += 1
        return total / count

    with motion_attached(engine.model.unet, adapter, lambda: state["frames"]):
        if noise_sampler is not None:
            return get_sampler(sampler)(clock.wrap(denoise), x, sigmas, callback=callback, noise_sampler=noise_sampler)
        return get_sampler(sampler)(clock.wrap(denoise), x, sigmas, callback=callback)


class ClipControl:
    """A request's ControlNets over a clip: each unit's image is one for every frame or one per frame
    (``ControlSpec.image`` a list), preprocessed once at the clip's size; a window's denoiser steers
    its frames with their own images."""

    def __init__(self, engine, specs: Sequence, models: Sequence, width: int, height: int, frames: int):
        from dataclasses import replace as _replace

        from ..adapters.controlnet import hint_tensor
        from .control import control_image

        self.engine, self.specs, self.models, self.hints = engine, list(specs), list(models), []
        for i, (spec, model) in enumerate(zip(self.specs, self.models, strict=True)):
            images = list(spec.image) if isinstance(spec.image, (list, tuple)) else [spec.image]
            if len(images) not in (1, frames):
                raise ParamError(f"control[{i}].image", f"{len(images)} images for a clip of {frames} frames "
                                                        f"(give one, or one per frame)")
            device = next(model.parameters()).device
            try:
                self.hints.append(torch.cat([hint_tensor(control_image(_replace(spec, image=image), width, height,
                                                                       None, device)) for image in images]))
            except ParamError as e:
                raise ParamError(f"control[{i}].{e.field}", e.message) from None

    def denoiser(self, rows: list[int], clock: StepClock, uncond: bool):
        """The denoiser of the window ``rows``' unconditional clip (``uncond``) or conditional clip."""
        from ..adapters.controlnet import ControlUnit
        from .control import ControlledDenoiser

        units = []
        for i, (spec, model, hint) in enumerate(zip(self.specs, self.models, self.hints)):
            h = hint if hint.shape[0] == 1 else hint[rows]
            try:
                units.append(ControlUnit(model, h, spec.strength, spec.start, spec.end, spec.mode))
            except ParamError as e:
                raise ParamError(f"control[{i}].{e.field}", e.message) from None
        return ControlledDenoiser(self.engine, units, clock, uncond_rows=len(rows) if uncond else 0)


def check_fits(adapter: MotionAdapter, unet_cfg, family: str) -> None:
    from ..checkpoint.motion import motion_fits

    why = motion_fits(adapter.cfg, unet_cfg)
    if why is not None:
        raise ParamError("motion_module", f"the {adapter.cfg.version} motion module does not fit the {family} "
                                          f"model: {why}")


def sigmas_for(sampler: str, scheduler: str | None, schedule, steps: int,
               strength: float | None) -> tuple[Tensor, int]:
    """The σ schedule and the step the clip starts from (img2img: A1111's last t_enc steps)."""
    sigmas = sampler_sigmas(sampler, scheduler, schedule, steps)
    if strength is None:
        return sigmas, 0
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas, steps - t_enc - 1   # as pipeline.plan.img2img_sigmas (t_enc 0: the last step)


def frame_images(decode: Callable[[Tensor], list[Image.Image]], latents: Tensor) -> list[Image.Image]:
    """Decoded one frame at a time (bounded memory for long clips)."""
    return [decode(latents[f:f + 1])[0] for f in range(latents.shape[0])]


def duration_ms(fps: int) -> int:
    return int(math.floor(1000 / fps + 0.5))


def run_animation(engine, adapter: MotionAdapter, p, s: AnimationSettings,
                  callback: Callable[[StepRecord], None] | None = None,
                  controlnets: Sequence = ()) -> tuple[list[Image.Image], Tensor]:
    """A clip for request ``p`` (prompt, negative prompt, sampler, schedule, steps, CFG, seed, size;
    ``init_image`` / ``strength``: every frame starts from that image; ``control``: ControlNets, their
    loaded models ``controlnets``, each with one image or one per frame): its frames and latents.
    The prompt's LoRAs are the caller's patches."""
    from ..checkpoint.stream import resident
    from ..text.conditioner import SizeConditioning
    from .images import to_pil, to_tensor

    s.validate(adapter.cfg.max_frames)
    spec = engine.spec
    if spec.is_depth or spec.is_upscaler or spec.is_unclip or spec.unet.in_channels != spec.unet.out_channels:
        raise ParamError("motion_module", f"AnimateDiff animates text-to-image models, not {spec.family}")
    check_fits(adapter, spec.unet, spec.family)
    if p.batch_size != 1:
        raise ParamError("batch_size", "a clip is one batch of frames: give frames, not batch_size")
    for name, bad in (("mask", p.mask is not None), ("hires_scale", p.hires_scale > 1),
                      ("ip_adapters", bool(p.ip_adapters)), ("detail", bool(p.detail)), ("refiner", p.refiner)):
        if bad:
            raise ParamError(name, "is not supported with AnimateDiff yet")
    frames, (width, height) = s.frames, (p.width, p.height)
    size = SizeConditioning(original=(height, width), target=(height, width))

    def encode(texts: list[str]) -> Cond:
        return engine.conditioner(texts, clip_skip=p.clip_skip, size=size)

    with resident(*engine.model.text_encoders):
        loop = s.closed_loop if s.loop_prompts is None else s.loop_prompts
        cond = frame_conds(encode, p.prompt, frames, loop)
        uncond = frame_conds(encode, p.negative_prompt, frames, loop)
        if cond.tokens != uncond.tokens:
            empty = engine.conditioner.encode([""], clip_skip=p.clip_skip, size=size)[0]
            tokens = max(cond.tokens, uncond.tokens)
            cond, uncond = cond.pad_to(tokens, empty), uncond.pad_to(tokens, empty)
    adapter.to(engine.device, engine.dtype)
    noise = clip_noise((engine.latent_channels, height // engine.factor, width // engine.factor), p.seed, frames, p.rng)
    control = ClipControl(engine, p.control, controlnets, width, height, frames) if p.control else None
    schedule, start = sigmas_for(p.sampler, p.scheduler, engine.schedule, p.steps,
                                 p.strength if p.init_image is not None else None)
    sigmas = schedule[start:]
    x = noise.initial() * sigmas[0]
    if p.init_image is not None:
        init = p.init_image.convert("RGB").resize((width, height), Image.LANCZOS)
        x = engine.encode(to_tensor([init])) + x
    latents = denoise_clip(engine, adapter, x, sigmas, cond, uncond, p.cfg_scale, s, p.sampler, callback,
                           noise_sampler=noise.noise_sampler(), control=control, clock=StepClock(schedule, start))
    return frame_images(lambda z: to_pil(engine.decode(z)), latents), latents


def animation_infotext(base: str, adapter_name: str, adapter: MotionAdapter, s: AnimationSettings) -> str:
    """The still image's infotext with the A1111 AnimateDiff extension's entry appended."""
    module_frames = adapter.cfg.max_frames
    entry = (f'AnimateDiff: "model: {adapter_name}, video_length: {s.frames}, fps: {s.fps}, '
             f"closed_loop: {'R-P' if s.closed_loop else 'N'}, batch_size: {s.context_length(module_frames)}, "
             f'stride: {s.stride}, overlap: {s.overlap_frames(module_frames)}, version: {adapter.cfg.version}"')
    return f"{base}, {entry}"


def save_clip(images: list[Image.Image], path, fps: int, infotext: str, loops: int = 0) -> None:
    """GIF or WebP (Pillow, looping) or MP4 (PyAV, H.264), the parameters in the file's metadata
    (GIF comment, WebP XMP description, MP4 comment); ``loops``: plays (0: for ever); written to a
    temporary name, then renamed."""
    from pathlib import Path

    path = Path(path)
    suffix = path.suffix.lower()
    tmp = path.with_name(path.name + ".tmp")
    if suffix == ".gif":
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms(fps),
                       loop=loops, comment=infotext.encode("utf-8"))
    elif suffix == ".webp":
        images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], duration=duration_ms(fps),
                       loop=loops, lossless=True, xmp=_xmp(infotext))
    elif suffix == ".mp4":
        _save_mp4(images, tmp, fps, infotext)
    else:
        raise ParamError("output", f"an animation is written as .gif, .webp or .mp4, got {path.name}")
    tmp.replace(path)


def _xmp(text: str) -> bytes:
    from xml.sax.saxutils import escape

    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:description>'
            f"{escape(text)}</dc:description></rdf:Description></rdf:RDF></x:xmpmeta>").encode("utf-8")


def _save_mp4(images: list[Image.Image], path, fps: int, infotext: str) -> None:
    try:
        import av
    except ImportError:
        raise ParamError("output", "MP4 needs PyAV: pip install 'sfumato[video]' (or write .gif / .webp)") from None
    w, h = images[0].size
    with av.open(str(path), mode="w", format="mp4") as container:
        container.metadata["comment"] = infotext
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.asarray(image.convert("RGB"))[:stream.height, :stream.width],
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
