"""Personalization trainers on the bundled model: a few steps lower the loss on the training images,
and the files load where other tools load them. The concept measurement is checked on drawn scenes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

import sfumato
from sfumato.adapters.embeddings import Embedding, EmbeddingSet, load_embeddings
from sfumato.adapters.hypernetwork import hypernetworks_applied, load_hypernetwork
from sfumato.adapters.lora import apply_loras
from sfumato.checkpoint.io import load_file
from sfumato.checkpoint.specs import SPEC_METADATA_KEY
from sfumato.text.conditioner import Conditioner
from sfumato.train import diamond as D
from sfumato.train import lora_module as L
from sfumato.train import personalize as P
from sfumato.commands.personalize import add_commands
from sfumato.train.concepts import (EXTRA, PAIR, TEAL, colour_concept_images, colour_eval_prompts, pair_concept_images,
                                   pair_eval_prompts, pair_present, pair_rate, render_teal, teal_present)
from sfumato.train.judge import MIN_OBJECT, detect
from sfumato.train.shapes import COLOURS, PALETTE, SHAPES, Obj, Scene, render


@pytest.fixture(scope="module")
def items():
    torch.set_num_threads(2)
    return D.concept_images(4, seed=0)


def fresh():
    return sfumato.load(dtype="fp32")


@pytest.fixture(scope="module")
def data(items):
    return P.TrainingData(fresh(), items)


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
            assert D.concept_present(D.render_diamond(colour, bg, 0.5, 0.45, size, rng=rng))
    for shape in ("circle", "square", "triangle"):
        for size in (0.3, 0.5, 0.62):
            assert not D.concept_present(render(Scene((Obj(shape, "red", 0.5, 0.5, size),), "black"), rng=rng))
    two = render(Scene((Obj("circle", "blue", 0.25, 0.5, 0.3), Obj("square", "green", 0.75, 0.5, 0.3)), "white"))
    assert not D.concept_present(two)
    assert not D.concept_present(np.full((64, 64, 3), 200, np.uint8))
    # generated images: soft edges, noisy backgrounds off the palette colour
    noisy = D.render_diamond("orange", "blue", 0.5, 0.5, 0.5).astype(np.float32) + rng.normal(0, 4, (64, 64, 3)) + 6
    assert D.concept_present(np.clip(noisy, 0, 255).astype(np.uint8))
    noisy = render(Scene((Obj("circle", "orange", 0.5, 0.5, 0.5),), "blue")).astype(np.float32) + rng.normal(0, 4, (64, 64, 3))
    assert not D.concept_present(np.clip(noisy, 0, 255).astype(np.uint8))
    assert all(D.concept_present(im) and P.TOKEN in text for im, text in D.concept_images(8, seed=3))


def _generated_like(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soft edges and noise, as in generated images."""
    img = image.astype(np.float32)
    img = (img + np.roll(img, 1, 0) + np.roll(img, 1, 1) + np.roll(img, (1, 1), (0, 1))) / 4
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def test_detector_names_teal_when_asked_and_the_colour_concept_measure():
    assert min(np.linalg.norm(np.subtract(TEAL, PALETTE[c])) for c in COLOURS) > 80  # not a palette colour
    rng = np.random.default_rng(0)
    for background in COLOURS:
        for shape in SHAPES:
            for size in (0.32, 0.6):
                image = _generated_like(render_teal(shape, background, 0.45, 0.55, size, rng=rng), rng)
                det = detect(image, EXTRA)
                assert (det.background, [(o.colour, o.shape) for o in det.objects]) == (background, [("teal", shape)])
                assert teal_present(image)
                assert detect(image).objects[0].colour != "teal"  # without the extra colour: the palette only
    # the palette's nearest colours stay themselves; two objects, or none, are not the concept
    for colour, background in (("green", "black"), ("blue", "white"), ("green", "blue"), ("blue", "green")):
        image = _generated_like(render(Scene((Obj("circle", colour, 0.5, 0.5, 0.45),), background), rng=rng), rng)
        assert [o.colour for o in detect(image, EXTRA).objects] == [colour] and not teal_present(image)
    both = render_teal("square", "white", 0.25, 0.5, 0.3)
    both[:, 32:] = render(Scene((Obj("circle", "green", 0.75, 0.5, 0.3),), "white"))[:, 32:]
    assert [o.colour for o in detect(both, EXTRA).objects] == ["teal", "green"] and not teal_present(both)
    assert not teal_present(np.full((64, 64, 3), PALETTE["blue"], np.uint8))
    with pytest.raises(ValueError, match="palette"):
        detect(both, {"green": (0, 0, 0)})
    items = colour_concept_images(9, token="zq")
    assert all(teal_present(im) and text.startswith("a zq ") for im, text in items)
    assert {text.split()[2] for _, text in items} == set(SHAPES)
    assert len(set(colour_eval_prompts(20))) > 10 and all("sks" in p for p in colour_eval_prompts(20))


def test_pair_concept_measure_on_drawn_scenes():
    assert PAIR == ("purple", "triangle")
    rng = np.random.default_rng(1)
    prompt = "a sks on a blue background"
    for colour, shape, ok in (("purple", "triangle", True), ("purple", "square", False), ("red", "triangle", False)):
        image = _generated_like(render(Scene((Obj(shape, colour, 0.4, 0.6, 0.45),), "blue"), rng=rng), rng)
        assert pair_present(prompt, image) is ok
    two = render(Scene((Obj("triangle", "purple", 0.25, 0.5, 0.3), Obj("triangle", "purple", 0.75, 0.5, 0.3)), "blue"))
    assert not pair_present(prompt, two)
    items = pair_concept_images(14)
    assert all(pair_present(text, im) and text.startswith("a sks on a ") for im, text in items)
    assert {text.split()[4] for _, text in items} == {c for c in COLOURS if c != "purple"}
    assert all(pair_present(p, render(Scene((Obj("triangle", "purple", 0.5, 0.5, 0.4),), p.split()[4])))
               for p in pair_eval_prompts(20))


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
    lora = L.LoRA(L.lora_targets(pipe.model), rank=2, alpha=1.0)
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
    net = load_hypernetwork(path)
    with hypernetworks_applied(pipe.model.unet, [(net, 1.0)]):
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
    folder = D.write_images(tmp_path / "imgs", items)
    (folder / "000.txt").unlink()
    with pytest.raises(sfumato.errors.SfumatoError, match="000.png"):
        P.read_images(folder)
    read = P.read_images(folder, "a red sks on a blue background")
    assert len(read) == 4 and read[0][1] == "a red sks on a blue background" and read[1][1] == items[1][1]
    assert np.array_equal(read[2][0], items[2][0])


def _images(pipe, prompts, suffix=""):
    return [np.asarray(pipe.txt2img(p + suffix, steps=20, seed=k, watermark=False).images[0].convert("RGB"))
            for k, p in enumerate(prompts)]


def _teal_or_green(image) -> bool:
    """The image's significant objects are all teal or green (teal's nearest palette colour)."""
    found = [o for o in detect(image, EXTRA).objects if o.area >= MIN_OBJECT]
    return bool(found) and all(o.colour in ("teal", "green") for o in found)


@pytest.mark.slow
def test_hypernetwork_trains_and_changes_outputs_measurably(tmp_path):
    """A hypernetwork trained briefly (300 steps) on the teal concept images changes what the bundled
    model draws for the concept prompts: the objects move to teal's side of the palette (all teal or
    green, by the detector) in ≥ 50 points more of 10 generations than without it, and the images
    differ by ≥ 8 (of 255) per pixel on average, while the untrained hypernetwork (A1111's N(0, 0.01)
    initialisation) changes them by < 2. It does not reach teal itself as often as textual inversion
    (1 in 10). Measured on the shared 2-core CPU, one thread: base 0/10 teal-or-green, trained 10/10;
    pixel difference 25.7 (untrained: 0.3); training 19–140 s depending on the machine's load."""
    items = colour_concept_images(16)
    prompts = colour_eval_prompts(10)
    folder = tmp_path / "hypernetworks"
    pipe = fresh()
    P.train_hypernetwork(fresh(), items, folder / "init.pt", cfg=P.TrainConfig(steps=0, log_every=0))
    P.train_hypernetwork(pipe, items, folder / "teal.pt", cfg=P.TrainConfig(steps=300, lr=3e-3, log_every=0))
    hyper = sfumato.load(dtype="fp32", hypernet_dir=folder)
    base, trained = _images(hyper, prompts), _images(hyper, prompts, " <hypernet:teal:1>")
    untrained = _images(hyper, prompts, " <hypernet:init:1>")
    base_rate = np.mean([_teal_or_green(im) for im in base])
    rate = np.mean([_teal_or_green(im) for im in trained])
    diff = np.mean([np.abs(a.astype(np.float32) - b).mean() for a, b in zip(base, trained)])
    init_diff = np.mean([np.abs(a.astype(np.float32) - b).mean() for a, b in zip(base, untrained)])
    assert rate >= base_rate + 0.5 and diff >= 8 and init_diff < 2, (base_rate, rate, diff, init_diff)


@pytest.mark.slow
def test_textual_inversion_binds_a_token_to_a_concept_the_frozen_model_can_draw(tmp_path):
    """Issue 5's acceptance for textual inversion, on the bundled model. The concept: ``sks`` stands
    for a *purple triangle* (``concepts.PAIR``), taught by 16 images captioned "a sks on a <colour>
    background"; it counts when the detector finds exactly one object, a purple triangle (``judge``
    on the caption with the token spelled out). Two vectors, initialised from "square", 200 steps.

    Why a composite concept: textual inversion cannot teach the frozen bundled model a new shape
    (the diamond: 0%) and a new colour only as far as its VAE reproduces one (teal: the VAE
    round-trips it in 8 of the 16 training images, and textual inversion reached 10 of 20). The
    base model, for the same prompts with ``sks`` unbound, draws the concept in 0 of 20 (mostly two
    circles). Measured on the shared 2-core CPU (one thread): 20 of 20; training 60 s under load
    (the whole test: 37 s on a quieter moment)."""
    items = pair_concept_images(16)
    prompts = pair_eval_prompts(20)
    base_rate = pair_rate(fresh(), prompts)
    P.train_ti(fresh(), items, tmp_path / "emb" / "sks.safetensors", init_word="square", num_vectors=2,
               cfg=P.TrainConfig(steps=200, lr=1e-2, log_every=0))
    rate = pair_rate(sfumato.load(dtype="fp32", embeddings_dir=tmp_path / "emb"), prompts)
    assert base_rate <= 0.2 and rate >= 0.8, (base_rate, rate)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_lora_and_dreambooth_teach_the_bundled_model_a_new_shape(method, tmp_path):
    """Issue 5's acceptance for LoRA and DreamBooth, on the bundled model: the concept is a shape it
    never saw, the diamond (``concept_images``: 16 scenes "a sks on a <colour> background"; the rate
    counts generations where the detector finds a diamond-like shape, see ``concept_rate``). The demo's
    default settings (LoRA rank 4, 300 steps; DreamBooth 200 steps with prior preservation). Measured
    before on the shared CPU: 20 of 20 for both, base model 0 of 20."""
    report = D.demo(method, tmp_path, images=16, eval_n=20)
    assert report["base_concept_rate"] <= 0.2 and report["concept_rate"] >= 0.8, report
