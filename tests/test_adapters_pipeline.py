"""Adapters in generation. LoRAs: ``<lora:name:w>`` prompt tags (looked up in the LoRA folder,
applied for one run, then removed) equal a LoRA merged at load time, and are recorded as A1111's
``Lora hashes``. Textual inversion: embeddings are used by name and recorded as ``TI hashes``."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import sfumato
from sfumato.checkpoint.io import save_file
from sfumato.cli import main
from sfumato.pipeline.infotext import parse_infotext
from sfumato.pipeline.params import ParamError

TARGET = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"   # a cross-attention projection of the tiny UNet


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model):
    unet = sfumato.load(tiny_model).model.unet
    out_f, in_f = unet.get_parameter(TARGET + ".weight").shape
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_" + TARGET.replace(".", "_")
    sd = {f"{name}.lora_down.weight": torch.randn(4, in_f, generator=g),
          f"{name}.lora_up.weight": torch.randn(out_f, 4, generator=g), f"{name}.alpha": torch.tensor(2.0)}
    folder = tmp_path_factory.mktemp("loras")
    save_file(sd, folder / "shiny.safetensors")
    return folder


def _pixels(result):
    return np.asarray(result.images[0])


def test_prompt_tag_equals_lora_merged_at_load(tiny_model, lora_dir):
    kw = dict(steps=3, seed=7, width=64, height=64, watermark=False)
    pipe = sfumato.load(tiny_model, lora_dir=lora_dir)
    before = pipe.model.unet.get_parameter(TARGET + ".weight").clone()
    tagged = pipe.txt2img("a red circle <lora:shiny:0.8>", **kw)
    assert torch.equal(pipe.model.unet.get_parameter(TARGET + ".weight"), before)    # removed after the run
    merged_pipe = sfumato.load(tiny_model, loras=[(lora_dir / "shiny.safetensors", 0.8)], lora_dir=lora_dir)
    merged = merged_pipe.txt2img("a red circle", **kw)
    baked = merged_pipe.model.unet.get_parameter(TARGET + ".weight").clone()
    assert not torch.equal(baked, before)
    merged_pipe.txt2img("a red circle <lora:shiny:0.3>", **kw)      # a tag on top of a load-time LoRA
    assert torch.equal(merged_pipe.model.unet.get_parameter(TARGET + ".weight"), baked)   # back to the merged weights
    plain = pipe.txt2img("a red circle", **kw)
    assert np.array_equal(_pixels(tagged), _pixels(merged))
    assert not np.array_equal(_pixels(tagged), _pixels(plain))

    info = parse_infotext(tagged.items[0].infotext)
    assert info["Prompt"] == "a red circle <lora:shiny:0.8>"
    digest = hashlib.sha256((lora_dir / "shiny.safetensors").read_bytes()).hexdigest()[:12]
    assert info["Lora hashes"] == f"shiny: {digest}"


def test_prompt_tag_needs_a_lora_folder_and_a_file(tiny_model, lora_dir):
    with pytest.raises(ParamError, match="prompt"):
        sfumato.load(tiny_model).txt2img("x <lora:shiny>", steps=1, width=64, height=64)
    with pytest.raises(ParamError, match="prompt: .*not found"):
        sfumato.load(tiny_model, lora_dir=lora_dir).txt2img("x <lora:missing>", steps=1, width=64, height=64)
    with pytest.raises(ParamError, match="inside the LoRA folder"):
        sfumato.load(tiny_model, lora_dir=lora_dir).txt2img("x <lora:../shiny>", steps=1, width=64, height=64)


def test_cli_lora_flag_and_tag(tiny_model, lora_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model), "--steps", "2", "--seed", "3", "--width", "64", "--height", "64",
              "--no-watermark"]
    assert main(["txt2img", "x", "--lora", f"{lora_dir / 'shiny.safetensors'}:0.5", "-o", str(tmp_path / "a.png"),
                 *common]) == 0
    assert main(["txt2img", "x <lora:shiny:0.5>", "--lora-dir", str(lora_dir), "-o", str(tmp_path / "b.png"),
                 *common]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert main(["txt2img", "x", "--lora", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "c.png"),
                 *common]) == 2
    assert "--lora" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_embeddings_by_name_in_prompts_and_ti_hashes(tiny_model, tmp_path):
    from sfumato.adapters.embeddings import save_embedding

    folder = tmp_path / "embeddings"
    folder.mkdir()
    path = save_embedding(folder / "glowy.safetensors", "glowy", {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))})
    kw = dict(steps=2, seed=4, width=64, height=64, watermark=False)
    with_ti = sfumato.load(tiny_model, embeddings_dir=folder)
    assert set(with_ti.embeddings.embeddings) == {"glowy"}
    used = with_ti.txt2img("a glowy circle", "", **kw)
    plain = sfumato.load(tiny_model).txt2img("a glowy circle", "", **kw)   # "glowy" as ordinary words
    assert not np.array_equal(_pixels(used), _pixels(plain))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert parse_infotext(used.items[0].infotext)["TI hashes"] == f"glowy: {digest}"
    negative = with_ti.txt2img("a circle", "glowy", **kw)
    assert parse_infotext(negative.items[0].infotext)["TI hashes"] == f"glowy: {digest}"
    assert "TI hashes" not in parse_infotext(with_ti.txt2img("a circle", **kw).items[0].infotext)
