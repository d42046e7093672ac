"""The training loop and the bundled model's recipe, on tiny configurations."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from sfumato.checkpoint.specs import ModelSpec, TextSlot
from sfumato.models.clip import TextEncoderConfig
from sfumato.models.unet import UNetConfig
from sfumato.models.vae import VAEConfig
from sfumato.train.loop import LoopConfig, step_batch, train
from sfumato.train.recipes import Recipe, train_all
from sfumato.train.shapes import ShapesDataset
from sfumato.train.train_clip import CLIPTask, hard_negatives
from sfumato.train.train_unet import UNetTask
from sfumato.train.train_vae import VAETask, encode_moments, latent_scale

TINY = ModelSpec(
    "custom",
    UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1), num_heads=2,
               context_dim=32, use_linear_in_transformer=True, norm_groups=8),
    VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    (TextSlot("cond_stage_model.transformer.", TextEncoderConfig("hf", 32, 2, 2)),),
    resolution=32,
)
DATA = ShapesDataset(8, seed=0, size=32)


def _cfg(steps: int, batch: int = 8, lr: float = 2e-3, **kw) -> LoopConfig:
    return LoopConfig(steps, batch, lr, log_every=1, progress=False, **kw)


def _losses(folder, name: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def _unet_task(init_seed: int = 0) -> UNetTask:
    """A UNet task on fixed frozen parts; ``init_seed`` sets the UNet's initial weights."""
    from sfumato.models.clip import CLIPTextModel
    from sfumato.models.vae import AutoencoderKL

    torch.manual_seed(0)
    vae, text = AutoencoderKL(TINY.vae).eval(), CLIPTextModel(TINY.text[0].config).eval()
    moments, captions = encode_moments(vae, DATA)
    torch.manual_seed(init_seed)
    return UNetTask(TINY, text, moments, captions, latent_scale(moments))


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_data_order_is_a_pure_function_of_seed_and_step():
    a = step_batch(3, 7, 8, 20)
    assert a == step_batch(3, 7, 8, 20)
    halves = [step_batch(3, 7, 8, 20, rank, 2) for rank in (0, 1)]
    assert halves[0].indices + halves[1].indices == a.indices  # disjoint shards of the same batch
    assert halves[0].seeds + halves[1].seeds == a.seeds
    epoch = [i for s in range(5) for i in step_batch(3, s, 4, 20).indices]
    assert sorted(epoch) == list(range(20))  # one epoch visits every item once


def test_hard_negatives_swap_order_and_binding():
    text = "a red circle to the left of a blue square on a white background"
    negs = hard_negatives(text)
    assert "a blue square to the left of a red circle on a white background" in negs  # order
    assert "a blue circle to the left of a red square on a white background" in negs  # colours
    assert "a red square to the left of a blue circle on a white background" in negs  # shapes
    assert text not in negs
    assert "a blue circle on a red background" in hard_negatives("a red circle on a blue background")


@pytest.mark.parametrize("stage", ["vae", "clip", "unet"])
def test_each_stage_lowers_its_loss(stage, tmp_path):
    torch.manual_seed(0)
    if stage == "vae":
        task, cfg = VAETask(TINY.vae, DATA), _cfg(12)
    elif stage == "clip":
        task, cfg = CLIPTask(TINY.text[0].config, DATA, embed_dim=16), _cfg(12, lr=1e-3)
    else:
        task, cfg = _unet_task(), _cfg(12, ema_decay=0.9)
    train(task, cfg, tmp_path, stage)
    losses = _losses(tmp_path, stage)
    assert len(losses) == 12
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


class _Killed(Exception):
    pass


def test_resume_after_a_kill_is_bit_exact(tmp_path):
    cfg = _cfg(6, batch=4, ema_decay=0.9, checkpoint_every=2)
    whole, whole_ema = train(_unet_task(), cfg, tmp_path / "whole", "unet")

    task = _unet_task()
    forward = task.forward

    def dies_in_step_6(batch):  # after step 5 was logged, before the next checkpoint
        if batch.step == 5:
            raise _Killed
        return forward(batch)

    task.forward = dies_in_step_6
    with pytest.raises(_Killed):
        train(task, cfg, tmp_path / "resumed", "unet")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert len(_losses(tmp_path / "resumed", "unet")) == 5
    resumed, resumed_ema = train(_unet_task(init_seed=1), cfg, tmp_path / "resumed", "unet")  # other init: must not matter

    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    for k, v in whole_ema.shadow.items():
        assert torch.equal(v, resumed_ema.shadow[k]), k
    assert _losses(tmp_path / "whole", "unet") == _losses(tmp_path / "resumed", "unet")


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        train(VAETask(TINY.vae, DATA), _cfg(8), folder, "vae")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_gloo_match_one(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    torch.manual_seed(0)
    train(VAETask(TINY.vae, DATA), _cfg(8), tmp_path / "one", "vae")

    ddp_losses, one_losses = _losses(tmp_path / "ddp", "vae"), _losses(tmp_path / "one", "vae")
    assert ddp_losses[-1] < 0.8 * ddp_losses[0]
    # same samples and noise on either side; only the summation order differs, which Adam amplifies
    # a little over the steps
    assert ddp_losses[0] == pytest.approx(one_losses[0], rel=1e-5)
    assert ddp_losses == pytest.approx(one_losses, rel=1e-2)


def test_recipe_exports_a_model_that_loads_as_bundled(tmp_path):
    import sfumato
    from sfumato.checkpoint.io import read_metadata
    from sfumato.checkpoint.specs import SPEC_METADATA_KEY, spec_from_json

    tiny = _cfg(2, batch=4)
    recipe = Recipe(spec=TINY, dataset_size=8, vae=tiny, clip=tiny, unet=replace(tiny, ema_decay=0.9))
    path = train_all(recipe, tmp_path, tmp_path / "model.safetensors")
    spec = spec_from_json(read_metadata(path)[SPEC_METADATA_KEY])
    assert spec.family == "bundled" and spec.resolution == 32
    assert spec.vae.scale_factor == json.loads(json.dumps(spec.vae.scale_factor)) and spec.vae.scale_factor > 0
    pipe = sfumato.load(path)
    assert pipe.family == "bundled"
    assert pipe.model.storage_dtypes == {"unet": "float16", "vae": "float16", "text0": "float16"}
    assert train_all(recipe, tmp_path, tmp_path / "again.safetensors").stat().st_size == path.stat().st_size


def test_bundled_spec_fits_the_size_budget():
    from sfumato.models.clip import build_text_encoder
    from sfumato.models.unet import UNetModel
    from sfumato.models.vae import AutoencoderKL
    from sfumato.train.bundled import BUNDLED_SPEC

    with torch.device("meta"):
        modules = [UNetModel(BUNDLED_SPEC.unet), AutoencoderKL(BUNDLED_SPEC.vae),
                   build_text_encoder(BUNDLED_SPEC.text[0].config)]
    fp16_bytes = 2 * sum(p.numel() for m in modules for p in m.parameters())
    assert fp16_bytes < 16_000_000 - 100_000  # room for the header


def test_cosine_tail_of_the_learning_rate():
    from sfumato.train.loop import learning_rate

    cfg = LoopConfig(steps=1000, batch_size=1, lr=1.0, warmup=10, decay_start=600, final_lr=0.1)
    lrs = [learning_rate(cfg, s) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0        # linear warm-up
    assert lrs[10:601] == [1.0] * 591                              # constant until the tail starts
    assert lrs[800] == pytest.approx(0.55)                         # half-way down: the mean of 1 and 0.1
    assert lrs[999] == pytest.approx(0.1, abs=1e-4)                # ends at lr · final_lr
    assert all(a >= b for a, b in zip(lrs[600:], lrs[601:]))       # never rises
