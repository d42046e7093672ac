"""Few-step models: the sampler, schedule, steps and CFG their model cards give.

Distilled models and LoRAs (SD-Turbo / SDXL-Turbo, SDXL-Lightning, Hyper-SD, LCM and LCM-LoRA) have
the same tensors as the models they come from: nothing in the weights says "sample me in 4 steps at
CFG 1". So the preset is chosen by name — ``load(few_step="turbo")``, ``--few-step turbo`` — or, with
``few_step="auto"``, guessed from the checkpoint's file name and the names of the LoRAs merged at load
or tagged in the prompt, and logged. A preset only fills the settings a request leaves out: a
request that gives steps, CFG, sampler or scheduler keeps them.

=========  ===========================================================  =========================
preset     what the model cards use                                     here
=========  ===========================================================  =========================
turbo      EulerAncestralDiscreteScheduler, trailing, 1 step, no CFG    euler_a, trailing, 1, CFG 1
lightning  EulerDiscreteScheduler, trailing, N steps (2/4/8), no CFG    euler, trailing, N, CFG 1
hyper      DDIMScheduler, trailing, N steps (1–8), no CFG (its "CFG"    ddim, trailing, N, CFG 1
           LoRAs: guidance 5–8)                                         (CFG LoRAs: 5)
lcm        LCMScheduler, 4–8 steps, CFG 1–2                             lcm, its own spacing, 4, CFG 1
=========  ===========================================================  =========================

CFG 1 means no classifier-free guidance: the run loop then skips the unconditional rows (half the
UNet work), as diffusers does for ``guidance_scale ≤ 1``. The number of steps in a name
("sdxl_lightning_4step", "Hyper-SD15-8steps") is the preset's step count.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ParamError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewStep:
    name: str
    sampler: str
    scheduler: str | None
    steps: int
    cfg_scale: float = 1.0

    def settings(self) -> dict:
        return {"sampler": self.sampler, "scheduler": self.scheduler, "steps": self.steps, "cfg_scale": self.cfg_scale}


PRESETS: dict[str, FewStep] = {
    "turbo": FewStep("turbo", "euler_a", "trailing", 1),
    "lightning": FewStep("lightning", "euler", "trailing", 4),
    "hyper": FewStep("hyper", "ddim", "trailing", 8),
    "lcm": FewStep("lcm", "lcm", None, 4),
}
CHOICES = ("auto", "none", *PRESETS)

# name patterns, most specific first (a "Hyper-SD" LoRA for an "LCM" base is Hyper-SD's). A checkpoint's
# name may say just "turbo" or "lightning"; a LoRA's must name a few-step LoRA (a style LoRA called
# "lightning_bolts" is not SDXL-Lightning)
_PATTERNS = (("hyper", r"hyper[-_ ]?sd"), ("lightning", r"lightning"), ("turbo", r"turbo"),
             ("lcm", r"(^|[^a-z])lcm([^a-z]|$)"))
_LORA_PATTERNS = (("hyper", r"hyper[-_ ]?sd"), ("lightning", r"lightning.*\d+[-_ ]?steps?(?![a-z])"),
                  ("lcm", r"(^|[^a-z])lcm[-_ ]?lora|lora[-_ ]?lcm([^a-z]|$)"))
_STEPS = re.compile(r"(\d+)[-_ ]?steps?(?![a-z])")


def guess(names: Iterable[str], lora: bool = False) -> tuple[FewStep, str] | None:
    """The preset a model name (``lora``: a LoRA's name) implies and the name that implied it (None: a
    plain model)."""
    for name in names:
        low = name.lower()
        for preset, pattern in _LORA_PATTERNS if lora else _PATTERNS:
            if re.search(pattern, low):
                base = PRESETS[preset]
                m = _STEPS.search(low)
                steps = int(m[1]) if m and 1 <= int(m[1]) <= 50 and preset != "turbo" else base.steps
                cfg = 5.0 if preset == "hyper" and re.search(r"(^|[^a-z])cfg([^a-z]|$)", low) else base.cfg_scale
                return FewStep(base.name, base.sampler, base.scheduler, steps, cfg), name
    return None


def resolve(choice: str | None, names: Iterable[str], loras: Iterable[str] = ()) -> FewStep | None:
    """``choice`` (a preset name, "none", or "auto": guessed from the model ``names`` and the ``loras``'
    names, logged) → the preset."""
    choice = "auto" if choice is None else str(choice).lower()
    if choice not in CHOICES:
        raise ParamError("few_step", f"must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "none":
        return None
    if choice != "auto":
        return PRESETS[choice]
    found = guess(names) or guess(loras, lora=True)
    if found is None:
        return None
    preset, name = found
    log.info("few-step defaults %r (guessed from the name %r): sampler %s, scheduler %s, %d steps, CFG %g; "
             "give them to override, or few_step='none'", preset.name, name, preset.sampler, preset.scheduler,
             preset.steps, preset.cfg_scale)
    return preset
