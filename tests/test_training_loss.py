"""The training loss is the denoiser's (issue 13): ``Denoiser.loss`` equals k-diffusion's
DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser loss on the same inputs, and every personalization
trainer (LoRA, DreamBooth, textual inversion, hypernetwork) runs on tiny SD 2.x-v and SDXL models —
with the v target and SDXL's ``y`` conditioning — and writes a file the pipeline loads and uses."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import sfumato
from conftest import TINY_SPEC, write_tiny_model
from golden_world import SDXL_BASE
from sfumato.adapters.lora import apply_loras
from sfumato.checkpoint.specs import TextSlot
from sfumato.diffusion.denoiser import Denoiser
from sfumato.diffusion.schedule import DiscreteSchedule, scaled_linear_alphas_cumprod
from sfumato.models.clip import TextEncoderConfig
from sfumato.models.unet import UNetModel
from sfumato.text.conditioner import Cond
from sfumato.train import personalize as P

SD2V = replace(TINY_SPEC, prediction="v", text=(
    TextSlot("cond_stage_model.model.", TextEncoderConfig("openclip", 32, 2, 2, activation="gelu", pad_id=0),
             layer=-2, final_norm=True),))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_loss_equals_k_diffusion(prediction):
    import k_diffusion as K

    torch.manual_seed(0)
    unet = UNetModel(replace(TINY_SPEC.unet)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ac = scaled_linear_alphas_cumprod()
    ours = Denoiser(lambda x, t, c: unet(x, t, c), DiscreteSchedule(ac), prediction)

    class Inner(torch.nn.Module):
        def forward(self, x, t, cond):
            return unet(x, t, cond)

    cls = K.external.DiscreteEpsDDPMDenoiser if prediction == "eps" else K.external.DiscreteVDDPMDenoiser
    ref = cls(Inner(), ac, quantize=False)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma = DiscreteSchedule(ac).sigmas[torch.tensor([0, 400, 999])]
    cond = torch.randn(3, 77, 32, generator=g)
    with torch.no_grad():
        got, want = ours.loss(x0, noise, sigma, cond), ref.loss(x0, noise, sigma, cond=cond)
    assert got.shape == (3,) and want.abs().min() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_trainers_loss_uses_the_models_own_target(tmp_path):
    """On a v-model the trainers' loss is k-diffusion's v loss, not ε's."""
    import k_diffusion as K

    pipe = sfumato.load(write_tiny_model(tmp_path / "v.safetensors", SD2V, seed=3), dtype="fp32")
    assert pipe.prediction == "v"
    engine = pipe.engine
    cond = P.text_conditions(engine.conditioner, ["a red circle"], None, grad=False)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = P.diffusion_loss(pipe, z0, cond, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)

        class Inner(torch.nn.Module):
            def forward(self, x, ts, context):
                return pipe.model.unet(x, ts, context)

        ref = K.external.DiscreteVDDPMDenoiser(Inner(), pipe.model.alphas_cumprod, quantize=False)
        want = ref.loss(z0, noise, engine.schedule.sigmas[t], context=cond.context)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _items(n: int = 2) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "a photo of sks") for _ in range(n)]


@pytest.fixture(scope="module", params=["sd2-v", "sdxl"])
def tiny(request, tmp_path_factory):
    spec = SD2V if request.param == "sd2-v" else SDXL_BASE
    return request.param, write_tiny_model(tmp_path_factory.mktemp(request.param) / "m.safetensors", spec, seed=4)


CFG = P.TrainConfig(steps=3, lr=1e-3, batch_size=1, bf16=False, log_every=0)


def _generates(pipe, prompt: str = "a photo of sks", **kw) -> np.ndarray:
    return np.asarray(pipe.txt2img(prompt, steps=2, seed=1, watermark=False, **kw).images[0])


def test_lora_trains_and_loads(tiny, tmp_path):
    _, path = tiny
    result = P.train_lora(sfumato.load(path, dtype="fp32"), _items(), tmp_path / "l.safetensors", cfg=CFG)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    pipe = sfumato.load(path, dtype="fp32")
    assert not apply_loras(pipe.model, [(result.path, 1.0)]).unmatched


def test_dreambooth_trains_and_loads(tiny, tmp_path):
    _, path = tiny
    base = sfumato.load(path, dtype="fp32")
    before = _generates(base)
    result = P.train_dreambooth(base, _items(), tmp_path / "db.safetensors", cfg=replace(CFG, lr=1e-2))
    assert all(np.isfinite(result.losses))
    assert not np.array_equal(_generates(sfumato.load(result.path, dtype="fp32")), before)


def test_textual_inversion_trains_every_text_encoder(tiny, tmp_path):
    family, path = tiny
    result = P.train_ti(sfumato.load(path, dtype="fp32"), _items(), tmp_path / "emb" / "sks.safetensors", cfg=CFG)
    assert all(np.isfinite(result.losses))
    pipe = sfumato.load(path, dtype="fp32", embeddings_dir=tmp_path / "emb")
    assert "sks" in pipe.embeddings.embeddings
    vectors = pipe.embeddings.embeddings["sks"].vectors
    assert sorted(vectors) == (["clip_g", "clip_l"] if family == "sdxl" else ["*"])
    assert not np.array_equal(_generates(pipe), _generates(sfumato.load(path, dtype="fp32")))


def test_hypernetwork_trains_and_loads(tiny, tmp_path):
    _, path = tiny
    result = P.train_hypernetwork(sfumato.load(path, dtype="fp32"), _items(), tmp_path / "h" / "net.pt",
                                  cfg=replace(CFG, lr=1e-1))
    assert all(np.isfinite(result.losses))
    pipe = sfumato.load(path, dtype="fp32", hypernet_dir=tmp_path / "h")
    assert not np.array_equal(_generates(pipe, "a photo of sks <hypernet:net:1>"), _generates(pipe))


def test_training_through_the_one_loop_is_deterministic(tmp_path):
    """Two runs with the same seed give the same losses (the loop's per-step generators)."""
    path = write_tiny_model(tmp_path / "m.safetensors", SD2V, seed=6)
    a = P.train_lora(sfumato.load(path, dtype="fp32"), _items(), tmp_path / "a.safetensors", cfg=CFG).losses
    b = P.train_lora(sfumato.load(path, dtype="fp32"), _items(), tmp_path / "b.safetensors", cfg=CFG).losses
    assert a == b


def test_cond_holds_sdxl_y(tmp_path):
    pipe = sfumato.load(write_tiny_model(tmp_path / "x.safetensors", SDXL_BASE, seed=7), dtype="fp32")
    data = P.TrainingData(pipe, _items(1))
    cond = P.text_conditions(pipe.engine.conditioner, ["a"], data.size, grad=False)
    assert isinstance(cond, Cond) and cond.y is not None and cond.y.shape[0] == 1
