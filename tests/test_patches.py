"""One mechanism attaches every feature for a run and always detaches it (issue 13): a run with a
LoRA, a hypernetwork, ToMe, DeepCache and attention-map hooks that fails half-way leaves the model
exactly as it was — same weights, no hooks, its own forward — and the next run equals a fresh model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sfumato
from golden_world import build
from sfumato.errors import ParamError
from sfumato.pipeline.attention_maps import AttentionMaps, attention_hooks


class Boom(Exception):
    pass


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("patches") / "world")


def test_a_failed_run_leaves_the_model_as_it_was(world):
    root = Path(world["sd"]).parent
    pipe = sfumato.load(world["sd"], dtype="fp32", lora_dir=root / "loras", hypernet_dir=root / "hypernetworks")
    unet = pipe.model.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks = _hooks(unet)
    maps = AttentionMaps(1, pipe.embeddings)

    def fail(progress):
        if progress.index == 2:
            raise Boom

    with pytest.raises(Boom):
        pipe.txt2img("a red circle <lora:shiny:0.8> <hypernet:glow:0.7>", steps=4, seed=3, width=64, height=64,
                     tome_ratio=0.5, deepcache_interval=2, callback=fail,
                     patches=[lambda: attention_hooks(unet, maps)])
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _hooks(unet) == hooks
    assert "forward" not in vars(unet) and not any("forward" in vars(m) for m in unet.modules())
    kw = dict(steps=3, seed=4, width=64, height=64, watermark=False)
    fresh = sfumato.load(world["sd"], dtype="fp32")
    assert torch.equal(pipe.txt2img("a red circle", **kw).latents, fresh.txt2img("a red circle", **kw).latents)


def test_a_lora_that_fails_to_apply_leaves_nothing_applied(world, tmp_path):
    root = Path(world["sd"]).parent
    bad = tmp_path / "loras"
    bad.mkdir()
    (bad / "shiny.safetensors").write_bytes((root / "loras" / "shiny.safetensors").read_bytes())
    (bad / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    pipe = sfumato.load(world["sd"], dtype="fp32", lora_dir=bad)
    before = {k: v.clone() for k, v in pipe.model.unet.state_dict().items()}
    with pytest.raises(ParamError, match="prompt"):
        pipe.txt2img("x <lora:shiny:1> <lora:broken:1>", steps=2, width=64, height=64)
    assert all(torch.equal(before[k], v) for k, v in pipe.model.unet.state_dict().items())
