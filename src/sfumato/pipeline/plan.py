"""A request becomes a plan: the stages the run loop (``pipeline.run``) carries out, decided from the
request and the models' specs and σ schedules alone — no weights are read, nothing is computed.

A :class:`Stage` makes latents at one size: it starts from noise (txt2img, the x4 upscaler), from
the init image's latents (img2img, inpainting, outpainting: a slice of the σ schedule) or from the
previous stage's latents grown (the hires pass), and samples its schedule in one or two
:class:`Pass` es — the base model, then a refiner on the schedule's tail. Extra UNet inputs (depth,
9-channel inpainting, the upscaler's low-res image), latent-mask blending and ControlNets are marked
on the stage; the loop builds them. Every check that needs the model (depth model ⇔ depth map,
upscaler ⇔ noise level, refiner present) is made here, so a request that plans will run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from ..checkpoint.specs import ModelSpec
from ..diffusion.brownian import sigma_span
from ..diffusion.samplers import sampler_sigmas
from ..diffusion.schedule import DiscreteSchedule
from .depth import check_depth_request
from .params import GenerationParams, ParamError
from .upscale import check_upscale_request


class Model(Protocol):
    """What planning needs of a model (an ``Engine`` has it; so does ``ModelInfo``, without weights)."""

    spec: ModelSpec
    schedule: DiscreteSchedule
    factor: int
    depth_estimator: bool   # an SD 2 depth checkpoint that carries its MiDaS


@dataclass(frozen=True)
class ModelInfo:
    """A model described by its spec alone (its training schedule): for planning without loading it."""

    spec: ModelSpec
    depth_estimator: bool = False

    @property
    def schedule(self) -> DiscreteSchedule:
        from ..diffusion.schedule import scaled_linear_alphas_cumprod

        return DiscreteSchedule(scaled_linear_alphas_cumprod(*self.spec.betas))

    @property
    def factor(self) -> int:
        return 2 ** (len(self.spec.vae.ch_mult) - 1)


@dataclass(frozen=True)
class Pass:
    """One sampler run over ``sigmas[start : stop + 1]`` of its stage, on the base model or the refiner.
    ``label`` is what progress reports ("base", "hires", "refiner")."""

    engine: str
    label: str
    start: int
    stop: int


@dataclass(frozen=True)
class Stage:
    """Latents at ``size`` (width, height) over the σ schedule ``sigmas``.

    ``kind``: "txt2img" (from noise), "img2img" (from the init image), "hires" (from the previous
    stage's latents grown by ``upscaler``), "upscale" (the x4 upscaler, from noise). ``inputs``: the
    base model's extra UNet input ("depth", "inpaint", "low_res" or None). ``blend``: keep the
    unmasked latents (a 4-channel model inpainting). ``control``: the request's ControlNets steer
    the base passes. ``noise_span``: the (smallest positive, largest) σ of the whole schedule that
    ``sigmas`` was cut from (img2img, hires), which A1111 spans the SDE samplers' Brownian tree over;
    None: ``sigmas``' own."""

    kind: str
    size: tuple[int, int]
    sigmas: Tensor | None
    passes: tuple[Pass, ...]
    inputs: str | None = None
    blend: bool = False
    control: bool = False
    upscaler: str | None = None
    noise_span: tuple[float, float] | None = None
    sampler: str | None = None           # the hires pass's own sampler (None: the request's)


@dataclass(frozen=True)
class Plan:
    """The stages in order, and the model whose VAE decodes ("base" or "refiner"; None: the init
    image is returned as it is, strength 0)."""

    stages: tuple[Stage, ...]
    decoder: str | None


def plan(p: GenerationParams, base: Model, refiner: Model | None = None, hires: Model | None = None) -> Plan:
    """The plan of the validated request ``p`` for ``base`` (and ``refiner``, and ``hires``: the model
    of the hires pass when the request names one, A1111's ``hr_checkpoint_name``)."""
    if p.refiner is not None and refiner is None:
        raise ParamError("refiner", "a refiner was named but none is loaded")
    if p.hires_checkpoint is not None:
        _check_hires_model(base, hires, refiner is not None)
    if base.spec.is_upscaler or p.noise_level is not None:
        check_upscale_request(base.spec, p, base.factor, refiner is not None)
        sigmas = sampler_sigmas(p.sampler, p.scheduler, base.schedule, p.steps)
        stage = Stage("upscale", (p.width, p.height), sigmas, (Pass("base", "base", 0, len(sigmas) - 1),),
                      inputs="low_res")
        return Plan((stage,), "base")
    check_depth_request(base.spec, p, base.depth_estimator)
    check_unclip_request(base.spec, p)
    decoder = "refiner" if refiner is not None else "base"
    depth = "depth" if base.spec.is_depth else None
    control = bool(p.control)
    if p.init_image is not None:
        if p.strength == 0:
            return Plan((), None)
        full = sampler_sigmas(p.sampler, p.scheduler, base.schedule, p.steps)
        sigmas = img2img_sigmas(full, p.steps, p.strength)
        inputs = "inpaint" if base.spec.unet.in_channels == 9 else depth
        stage = Stage("img2img", (p.width, p.height), sigmas, _passes(p, sigmas, refiner is not None),
                      inputs, blend=p.mask is not None and inputs is None, control=control, noise_span=sigma_span(full))
        return Plan((stage,), decoder)
    sigmas = sampler_sigmas(p.sampler, p.scheduler, base.schedule, p.steps)
    stages = [Stage("txt2img", (p.width, p.height), sigmas, _passes(p, sigmas, refiner is not None), depth,
                    control=control)]
    if p.hires_scale > 1:
        total, steps = p.hires_total_steps, p.hires_steps or p.steps
        # A1111: the second pass runs exactly `steps` steps of a schedule stretched by 1/denoise
        sampler = p.hires_sampler or p.sampler
        scheduler = p.hires_scheduler or p.scheduler    # A1111's "Use same scheduler"
        full = sampler_sigmas(sampler, scheduler, base.schedule, total) if total else None
        on = "hires" if p.hires_checkpoint is not None else "base"
        sigmas = full[total - steps:] if total else None
        passes = (Pass(on, "hires", 0, len(sigmas) - 1),) if sigmas is not None else ()
        stages.append(Stage("hires", (p.hires_width, p.hires_height), sigmas, passes, depth, control=control,
                            upscaler=p.hires_upscaler, noise_span=sigma_span(full) if total else None,
                            sampler=p.hires_sampler))
        decoder = on if passes else decoder   # the hires model decodes what it made
    return Plan(tuple(stages), decoder)


def check_unclip_request(spec, p: GenerationParams) -> None:
    """Image prompts need a Stable unCLIP model, and a noise level its augmentation schedule has."""
    embedder = spec.image_embedder
    if p.unclip_images and embedder is None:
        raise ParamError("unclip_images", f"the {spec.family} model takes no image embedding (a Stable unCLIP "
                                          "model does: sd2-unclip-l, sd2-unclip-h, bundled-unclip)")
    if embedder is not None and p.unclip_noise_level >= embedder.max_noise_level:
        raise ParamError("unclip_noise_level", f"must be 0 to {embedder.max_noise_level - 1} for this model, "
                                               f"got {p.unclip_noise_level}")


def _check_hires_model(base: Model, hires: Model | None, refiner: bool) -> None:
    """A hires pass on another model: it is loaded, takes the base model's latents, and no refiner."""
    if hires is None:
        raise ParamError("hires_checkpoint", "a hires checkpoint was named but none is loaded")
    if refiner:
        raise ParamError("hires_checkpoint", "a hires checkpoint and a refiner together are not supported")
    mine, theirs = base.spec, hires.spec
    if (mine.unet.in_channels, mine.vae.embed_dim, base.factor, mine.is_sdxl) != \
            (theirs.unet.in_channels, theirs.vae.embed_dim, hires.factor, theirs.is_sdxl):
        raise ParamError("hires_checkpoint", f"the {theirs.family} model cannot continue the {mine.family} model's "
                                             "latents (another latent space or UNet input)")


def img2img_sigmas(sigmas: Tensor, steps: int, strength: float) -> Tensor:
    """A1111's img2img slice: t_enc = ⌊min(strength, 0.999)·steps⌋ steps from the tail."""
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1:]


def _passes(p: GenerationParams, sigmas: Tensor, refiner: bool) -> tuple[Pass, ...]:
    """The base model's pass, and with a refiner (switch < 1) the refiner's on the schedule's tail."""
    last = len(sigmas) - 1
    if not refiner or p.refiner_switch >= 1:
        return (Pass("base", "base", 0, last),)
    switch = max(1, min(last, int(round(p.refiner_switch * last))))
    if switch == last:
        return (Pass("base", "base", 0, last),)
    return Pass("base", "base", 0, switch), Pass("refiner", "refiner", switch, last)
