"""The engine redesign (issue 13) keeps every image: the final latents of 19 scenarios × 5 samplers on
tiny fixtures are equal (``torch.equal``) to those main produced at df43b11, before the redesign
(``tests/data/golden_latents.safetensors``, written by ``python tests/golden_world.py`` in that
checkout). Scenarios: txt2img, img2img, inpainting with 4- and 9-channel models, only-masked,
outpainting, hires fix (latent and Lanczos), SDXL refiner, x4 upscaler, depth2img, two ControlNets
with start/end spans, ToMe, DeepCache, AND, prompt editing, guidance rescale, LoRA, hypernetwork."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from golden_world import run_all
from sfumato.checkpoint.io import load_file

GOLDEN = Path(__file__).parent / "data" / "golden_latents.safetensors"


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        return run_all(tmp_path_factory.mktemp("golden") / "world")
    finally:
        torch.set_num_threads(threads)


def test_fixtures_are_the_ones_the_goldens_were_made_from(computed):
    _, metadata = load_file(GOLDEN)
    assert computed[1] == metadata["fixtures_sha256"]


def test_final_latents_equal_main_before_the_redesign(computed):
    golden, _ = load_file(GOLDEN)
    latents, _ = computed
    assert sorted(latents) == sorted(golden) and len(golden) == 95
    different = [key for key in golden if not torch.equal(latents[key], golden[key])]
    assert not different, {k: float((latents[k] - golden[k]).abs().max()) for k in different}
