"""Personalization trainers on the bundled model: a few steps lower the loss on the training images,
and the files load where other tools load them. The concept measurement is checked on drawn scenes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

import sfumato
from sfumato.adapters.embeddings import Embedding, EmbeddingSet, load_embeddings
from sfumato.adapters.lora import apply_loras
from sfumato.checkpoint.io import load_file
from sfumato.checkpoint.specs import SPEC_METADATA_KEY
from sfumato.text.conditioner import Conditioner
from sfumato.train import personalize as P
from sfumato.train.personalize_cli import add_commands
from sfumato.train.shapes import Obj, Scene, render


@pytest.fixture(scope="module")
def items():
    torch.set_num_threads(2)
    return P.concept_images(4, seed=0)


def fresh():
    return sfumato.load(dtype="fp32")


@pytest.fixture(scope="module")
def data(items):
    return P._Data(fresh(), items)


def fixed_loss(pipe, data, conditioner=None) -> float:
    """The loss on the training latents at fixed noise and timesteps (mid-range, where it is informative)."""
    cond = conditioner or pipe.generator.base.conditioner
    g = torch.Generator().manual_seed(1234)
    z0 = data.latents.repeat(2, 1, 1, 1)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.linspace(100, 700, len(z0)).long()
    ac = pipe.model.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        ctx = P.text_context(cond, data.captions * 2, grad=False)
        out = pipe.model.unet(ac.sqrt() * z0 + (1 - ac).sqrt() * noise, t, ctx)
    return float(torch.nn.functional.mse_loss(out, noise))


CFG = P.TrainConfig(steps=5, batch_size=4, log_every=0)


def test_concept_measure_on_drawn_scenes():
    rng = np.random.default_rng(0)
    for size in (0.3, 0.45, 0.7):
        for colour, bg in (("red", "black"), ("white", "blue"), ("yellow", "green")):
            assert P.concept_present(P.render_diamond(colour, bg, 0.5, 0.45, size, rng=rng))
    for shape in ("circle", "square", "triangle"):
        for size in (0.3, 0.5, 0.62):
            assert not P.concept_present(render(Scene((Obj(shape, "red", 0.5, 0.5, size),), "black"), rng=rng))
    two = render(Scene((Obj("circle", "blue", 0.25, 0.5, 0.3), Obj("square", "green", 0.75, 0.5, 0.3)), "white"))
    assert not P.concept_present(two)
    assert not P.concept_present(np.full((64, 64, 3), 200, np.uint8))
    # generated images: soft edges, noisy backgrounds off the palette colour
    noisy = P.render_diamond("orange", "blue", 0.5, 0.5, 0.5).astype(np.float32) + rng.normal(0, 4, (64, 64, 3)) + 6
    assert P.concept_present(np.clip(noisy, 0, 255).astype(np.uint8))
    noisy = render(Scene((Obj("circle", "orange", 0.5, 0.5, 0.5),), "blue")).astype(np.float32) + rng.normal(0, 4, (64, 64, 3))
    assert not P.concept_present(np.clip(noisy, 0, 255).astype(np.uint8))
    assert all(P.concept_present(im) and P.TOKEN in text for im, text in P.concept_images(8, seed=3))


def test_lora_lowers_loss_and_loads_with_no_unmatched_keys(items, data, tmp_path):
    path = tmp_path / "concept.safetensors"
    before = fixed_loss(fresh(), data)
    cfg = P.TrainConfig(steps=5, batch_size=4, lr=2e-3, log_every=0)
    result = P.train_lora(fresh(), items, path, rank=4, alpha=2.0, text_encoder=True, cfg=cfg)
    sd, metadata = load_file(path)
    assert any(k.startswith("lora_unet_down_blocks_") for k in sd) and any(k.startswith("lora_te_text_model_") for k in sd)
    assert all(float(v) == 2.0 for k, v in sd.items() if k.endswith(".alpha"))
    assert metadata["ss_network_dim"] == "4"
    pipe = fresh()
    report = apply_loras(pipe.model, [(path, 1.0)])
    assert report.unmatched == {}
    assert len(report.files[0].matched) * 3 == len(sd)
    assert fixed_loss(pipe, data) < before
    assert len(result.losses) == 5


def test_lora_merged_equals_training_time_hooks(items, tmp_path):
    pipe = fresh()
    lora = P.LoRA(P.lora_targets(pipe.model), rank=2, alpha=1.0)
    with torch.no_grad():
        for up in lora.up:
            up.normal_(std=0.1)
    ctx = P.text_context(pipe.generator.base.conditioner, ["a red sks on a blue background"], grad=False)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad(), lora.applied():
        hooked = pipe.model.unet(x, t, ctx)
        plain = fresh().model.unet(x, t, ctx)
    merged = fresh()
    apply_loras(merged.model, [(lora.state_dict_kohya(torch.float32), 1.0)])
    with torch.no_grad():
        out = merged.model.unet(x, t, ctx)
    assert not torch.allclose(hooked, plain, atol=1e-3)
    torch.testing.assert_close(out, hooked, rtol=1e-4, atol=1e-5)


def test_textual_inversion_lowers_loss_and_loads(items, data, tmp_path):
    pipe = fresh()
    encoder = pipe.model.text_encoders[0]
    table = encoder.text_model.embeddings.token_embedding.weight
    init = table[sfumato.text.tokenizer.get_tokenizer().encode("square")].mean(0, keepdim=True).detach()
    start = Conditioner(pipe.model.spec, pipe.model.text_encoders, EmbeddingSet([Embedding(P.TOKEN, {"*": init})]))
    before = fixed_loss(pipe, data, start)
    path = tmp_path / "emb" / f"{P.TOKEN}.safetensors"
    P.train_ti(pipe, items, path, init_word="square", cfg=P.TrainConfig(steps=5, lr=2e-2, log_every=0))
    assert torch.equal(table, fresh().model.text_encoders[0].text_model.embeddings.token_embedding.weight)
    loaded = load_embeddings(tmp_path / "emb", pipe.model.spec)
    assert list(loaded.embeddings) == [P.TOKEN] and not loaded.skipped
    after = fixed_loss(pipe, data, Conditioner(pipe.model.spec, pipe.model.text_encoders, loaded))
    assert after < before


def test_textual_inversion_needs_the_token_in_captions(items, tmp_path):
    with pytest.raises(sfumato.errors.SfumatoError, match="token"):
        P.train_ti(fresh(), items, tmp_path / "x.safetensors", token="zqx", cfg=CFG)


def test_dreambooth_with_prior_preservation_writes_a_loadable_checkpoint(items, data, tmp_path):
    pipe = fresh()
    before = fixed_loss(pipe, data)
    classes = P.class_images(pipe, ["a red square on a black background"] * 2, steps=4)
    path = tmp_path / "db.safetensors"
    cfg = P.TrainConfig(steps=4, batch_size=2, lr=1e-4, log_every=0, gradient_checkpointing=True)
    P.train_dreambooth(pipe, items, path, class_items=classes, cfg=cfg)
    assert fixed_loss(pipe, data) < before
    tuned = sfumato.load(path, dtype="fp32")
    for (name, p), q in zip(pipe.model.unet.named_parameters(), tuned.model.unet.parameters()):
        assert torch.equal(p.half().float(), q), name
    original_sd, original_meta = load_file(pipe.model.path)
    sd, meta = load_file(path)
    assert meta[SPEC_METADATA_KEY] == original_meta[SPEC_METADATA_KEY]
    assert sd.keys() == original_sd.keys() and all(sd[k].dtype == original_sd[k].dtype for k in sd)
    assert all(torch.equal(sd[k], original_sd[k]) for k in sd if not k.startswith("model.diffusion_model."))


def test_hypernetwork_changes_outputs_and_round_trips(items, data, tmp_path):
    pipe = fresh()
    before = fixed_loss(pipe, data)
    path = tmp_path / "hn.pt"
    P.train_hypernetwork(pipe, items, path, cfg=P.TrainConfig(steps=5, lr=2e-3, log_every=0))
    saved = torch.load(path, weights_only=True)
    assert saved["layer_structure"] == [1, 2, 1] and set(saved[64][0]) == {
        "linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"}
    net = P.load_hypernetwork(path)
    with net.applied(pipe.model.unet):
        after = fixed_loss(pipe, data)
    assert after < before
    assert fixed_loss(pipe, data) == before  # hooks removed


def test_gradient_checkpointing_gives_the_same_gradients(items):
    pipe = fresh()
    unet = pipe.model.unet.requires_grad_(True)
    ctx = P.text_context(pipe.generator.base.conditioner, ["a red sks on a blue background"], grad=False)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    grads = []
    for enabled in (False, True):
        unet.zero_grad()
        with P.gradient_checkpointing(unet, enabled):
            unet(x, t, ctx).square().mean().backward()
        grads.append(unet.out[2].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert "forward" not in vars(unet.input_blocks[0])


def test_cli_adds_the_four_commands_and_reads_captions(items, tmp_path):
    parser = argparse.ArgumentParser()
    train = parser.add_subparsers(dest="command").add_parser("train").add_subparsers(dest="stage")
    add_commands(train)
    args = parser.parse_args(["train", "lora", "--images", "d", "--out", "o.safetensors", "--rank", "8"])
    assert (args.method, args.rank, args.alpha) == ("lora", 8, 4.0)
    args = parser.parse_args(["train", "ti", "--images", "d", "--out", "e.safetensors", "--token", "sks"])
    assert args.token == "sks" and args.func.__name__ == "cmd_personalize"
    folder = P.write_images(tmp_path / "imgs", items)
    (folder / "000.txt").unlink()
    with pytest.raises(sfumato.errors.SfumatoError, match="000.png"):
        P.read_images(folder)
    read = P.read_images(folder, "a red sks on a blue background")
    assert len(read) == 4 and read[0][1] == "a red sks on a blue background" and read[1][1] == items[1][1]
    assert np.array_equal(read[2][0], items[2][0])
