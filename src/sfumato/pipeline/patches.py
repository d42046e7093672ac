"""Patches: features attached to a model for part of a run and always detached after it.

A patch is a function that returns a context manager: entering attaches, leaving detaches, also when
the run fails half-way, so a failed run leaves the model exactly as it was. The run loop owns them
all: run-scoped patches (LoRA weights, hypernetwork hooks, attention-map hooks) are entered by
``Generator.run`` around the whole run, pass-scoped ones (``pass_patches``: ToMe, DeepCache, a
streamed UNet held in memory for the pass; ``image_prompts``: IP-Adapter hooks on the base model, which
read the pass's step clock) by ``RunLoop`` around each sampler run, in one ExitStack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from ..adapters.hypernetwork import Hypernetwork, hypernetworks_applied
from ..adapters.ip_adapter import ImagePrompt, image_prompts_applied
from ..adapters.lora import apply_loras, remove_loras
from ..adapters.tome import token_merging
from ..checkpoint.load import LoadedModel
from ..checkpoint.stream import resident
from ..diffusion.deepcache import deep_cache
from ..errors import CheckpointError, ParamError, SfumatoError
from .guidance import StepClock
from .params import GenerationParams

Patch = Callable[[], AbstractContextManager]


def loras(model: LoadedModel, files: Sequence[tuple[Path, float]], names: Sequence[str]) -> Patch:
    """The LoRA files merged into ``model``'s weights for the run; a file that cannot be applied is a
    ParamError naming the prompt (``names``: as the prompt's tags name them)."""

    @contextmanager
    def attach() -> Iterator[None]:
        try:
            try:
                apply_loras(model, list(files))
            except SfumatoError as e:
                raise file_error("LoRA", ", ".join(names), e) from None
            yield
        finally:
            remove_loras(model)

    return attach


def hypernetworks(model: LoadedModel, nets: Sequence[tuple[Hypernetwork, float]]) -> Patch:
    return lambda: hypernetworks_applied(model.unet, nets)


def image_prompts(model: LoadedModel, prompts: Sequence[ImagePrompt], clock: StepClock) -> Patch:
    """IP-Adapter image prompts in ``model``'s cross-attention for one sampler pass, each active over its
    span of the pass's step fractions (read from ``clock`` at every UNet call)."""
    return lambda: image_prompts_applied(model.unet, prompts, lambda: clock.fraction)


def pass_patches(model: LoadedModel, p: GenerationParams, clock: StepClock) -> list[Patch]:
    """The patches of one sampler pass on ``model``'s UNet: ToMe (ratio > 0), DeepCache (interval > 1,
    counting the clock's evaluations), and for by-stage loading the UNet held in memory for the pass."""
    unet = model.unet
    out: list[Patch] = [lambda: token_merging(unet, p.tome_ratio)]
    if p.deepcache_interval > 1:
        out.append(lambda: deep_cache(unet, p.deepcache_interval, evaluation=lambda: clock.evaluation))
    out.append(lambda: resident(unet) if model.by_stage else nullcontext())
    return out


def file_error(kind: str, name: str, e: SfumatoError) -> ParamError:
    """A file named in the prompt cannot be used: the whole message for the user at the keyboard; for a
    remote client (``public``) the reason without paths or what the file holds."""
    reason = e.public if isinstance(e, CheckpointError) else "it does not fit this model"
    return ParamError("prompt", f"{kind} {name!r}: {e}", public=f"{kind} {name!r}: {reason}")
