"""A1111 hypernetworks: files in A1111's layout (written here by hand) load, and applying them equals
A1111's formula written out independently (each attention's key/value input ``c`` becomes
``c + mlp(c) · strength``, per input width, chained over several files); prompt tags, infotext, errors."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SPEC

import sfumato
from sfumato.adapters.hypernetwork import (Hypernetwork, find_hypernetwork, hypernetworks_applied,
                                           load_hypernetwork, parse_hypernet_prompt)
from sfumato.errors import SfumatoError
from sfumato.models.unet import UNetModel
from sfumato.pipeline.infotext import parse_infotext
from sfumato.pipeline.params import ParamError

W = TINY_SPEC.unet.context_dim  # 32: also the tiny UNet's first-level feature width (self-attention)


def _randn(*shape, g):
    return torch.randn(*shape, generator=g) * 0.3


def norm_relu_file(path, g) -> dict:
    """A1111 settings: structure (1, 2, 1), relu, layer norm, dropout 0.1 after the first layer. Its
    ``linear`` Sequential: 0 Linear, 1 ReLU, 2 LayerNorm, 3 Dropout, 4 Linear, 5 LayerNorm (no
    activation after the last Linear without activate_output)."""
    def mlp(w=W):
        return {"linear.0.weight": _randn(2 * w, w, g=g), "linear.0.bias": _randn(2 * w, g=g),
                "linear.2.weight": 1 + _randn(2 * w, g=g), "linear.2.bias": _randn(2 * w, g=g),
                "linear.4.weight": _randn(w, 2 * w, g=g), "linear.4.bias": _randn(w, g=g),
                "linear.5.weight": 1 + _randn(w, g=g), "linear.5.bias": _randn(w, g=g)}

    data = {W: [mlp(), mlp()], 24: [mlp(24), mlp(24)], "name": "nr", "step": 10, "layer_structure": [1, 2, 1],
            "activation_func": "relu", "is_layer_norm": True, "weight_initialization": "Normal",
            "use_dropout": True, "dropout_structure": [0, 0.1, 0], "activate_output": False,
            "last_layer_dropout": False, "sd_checkpoint": None, "sd_checkpoint_name": None}
    torch.save(data, path)
    return data


def linear_file(path, g) -> dict:
    """An older-style file: structure (1, 1.5, 1), linear activation, no norm, no dropout keys."""
    h = int(W * 1.5)
    data = {W: [{"linear.0.weight": _randn(h, W, g=g), "linear.0.bias": _randn(h, g=g),
                 "linear.1.weight": _randn(W, h, g=g), "linear.1.bias": _randn(W, g=g)} for _ in range(2)],
            "layer_structure": [1, 1.5, 1], "activation_func": "linear", "is_layer_norm": False}
    torch.save(data, path)
    return data


def ref_mlp(state: dict, x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "nr":
        h = F.layer_norm(F.relu(F.linear(x, state["linear.0.weight"], state["linear.0.bias"])), (2 * W,),
                         state["linear.2.weight"], state["linear.2.bias"])
        return F.layer_norm(F.linear(h, state["linear.4.weight"], state["linear.4.bias"]), (W,),
                            state["linear.5.weight"], state["linear.5.bias"])
    h = F.linear(x, state["linear.0.weight"], state["linear.0.bias"])
    return F.linear(h, state["linear.1.weight"], state["linear.1.bias"])


def ref_attention(files: list[tuple[dict, str, float]]):
    """A1111's attention with hypernetworks: ``context = x`` for self-attention; for each file with
    a layer of ``context.shape[2]``, ``k_in = k_in + mlp_k(k_in)·s`` and ``v_in = v_in + mlp_v(v_in)·s``."""
    def forward(self, x, context=None):
        context = x if context is None else context
        k_in, v_in = context, context
        for data, kind, s in files:
            layers = data.get(context.shape[2])
            if layers is not None:
                k_in, v_in = k_in + ref_mlp(layers[0], k_in, kind) * s, v_in + ref_mlp(layers[1], v_in, kind) * s
        b, n, h = x.shape[0], x.shape[1], self.heads
        q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).permute(0, 2, 1, 3)
                   for t in (F.linear(x, self.to_q.weight), F.linear(k_in, self.to_k.weight),
                             F.linear(v_in, self.to_v.weight)))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (weights @ v).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)
    return forward


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hypernetworks")
    g = torch.Generator().manual_seed(0)
    (folder / "sub").mkdir()
    nr = norm_relu_file(folder / "nr.pt", g)
    lin = linear_file(folder / "sub" / "lin.pt", g)
    return folder, nr, lin


def test_application_equals_a1111_formula_on_self_and_cross_attention(files):
    folder, nr, lin = files
    torch.manual_seed(0)
    unet = UNetModel(TINY_SPEC.unet).eval()
    attns = [m for n, m in unet.named_modules() if n.endswith((".attn1", ".attn2"))]
    # width W: self- and cross-attention at the first level; 2W (the middle block): no file covers it
    assert {m.to_k.in_features for m in attns} == {W, 2 * W}
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, W, generator=g)
    nets = [(load_hypernetwork(folder / "nr.pt"), 0.7), (load_hypernetwork(folder / "sub" / "lin.pt"), 1.3)]
    with torch.no_grad():
        plain = unet(x, t, ctx)
        with hypernetworks_applied(unet, nets):
            ours = unet(x, t, ctx)
        after = unet(x, t, ctx)
        for m in attns:
            m.forward = types.MethodType(ref_attention([(nr, "nr", 0.7), (lin, "lin", 1.3)]), m)
        ref = unet(x, t, ctx)
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, plain)  # the hooks are gone


def test_strength_zero_equals_no_hypernetwork_and_round_trip(files, tmp_path):
    folder, *_ = files
    torch.manual_seed(0)
    unet = UNetModel(TINY_SPEC.unet).eval()
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]), torch.randn(1, 77, W, generator=g)
    net = load_hypernetwork(folder / "nr.pt")
    with torch.no_grad():
        plain = unet(x, t, ctx)
        with hypernetworks_applied(unet, [(net, 0.0)]):
            zero = unet(x, t, ctx)
    assert torch.equal(zero, plain)
    # what we write is A1111's layout: the same keys, and it loads back to the same function
    torch.save(net.a1111_dict(step=5), tmp_path / "copy.pt")
    saved = torch.load(tmp_path / "copy.pt", weights_only=True)
    original = torch.load(folder / "nr.pt", weights_only=True)
    assert set(saved[W][0]) == set(original[W][0]) and saved["layer_structure"] == [1, 2, 1]
    assert saved["activation_func"] == "relu" and saved["is_layer_norm"] is True and saved["step"] == 5
    copy = load_hypernetwork(tmp_path / "copy.pt")
    with torch.no_grad(), hypernetworks_applied(unet, [(net, 1.0)]):
        a = unet(x, t, ctx)
    with torch.no_grad(), hypernetworks_applied(unet, [(copy, 1.0)]):
        b = unet(x, t, ctx)
    assert torch.equal(a, b)


def test_trainer_layout_is_a1111s(tmp_path):
    net = Hypernetwork([64])
    state = net.a1111_dict(step=1)
    assert set(state[64][0]) == {"linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"}
    assert state[64][0]["linear.0.weight"].shape == (128, 64)


def test_layout_mismatch_and_unknown_activation_are_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = linear_file(tmp_path / "a.pt", g)
    data["is_layer_norm"] = True  # the file's tensors no longer fit its settings
    torch.save(data, tmp_path / "b.pt")
    with pytest.raises(SfumatoError, match="does not fit"):
        load_hypernetwork(tmp_path / "b.pt")
    data["is_layer_norm"], data["activation_func"] = False, "nosuch"
    torch.save(data, tmp_path / "c.pt")
    with pytest.raises(SfumatoError, match="nosuch"):
        load_hypernetwork(tmp_path / "c.pt")


def test_prompt_tags():
    assert parse_hypernet_prompt("a cat <hypernet:anime:0.5>, <hypernet:x> <lora:y:1>") == (
        "a cat ,  <lora:y:1>", [("anime", 0.5), ("x", 1.0)])
    for bad in ("<hypernet:>", "<hypernet:a:b>", "<hypernet:a:1:2>", "<hypernet:a:nan>"):
        with pytest.raises(SfumatoError, match="prompt tag"):
            parse_hypernet_prompt(bad)


def test_find_hypernetwork(files):
    folder, *_ = files
    assert find_hypernetwork("lin", folder) == folder / "sub" / "lin.pt"
    assert find_hypernetwork("nr.pt", folder) == folder / "nr.pt"
    for bad in ("../nr", "/etc/passwd"):
        with pytest.raises(SfumatoError, match="plain name"):
            find_hypernetwork(bad, folder)


@pytest.fixture(scope="module")
def tiny(tiny_model, files):
    return sfumato.load(tiny_model, hypernet_dir=files[0])


def test_pipeline_tags_strength_zero_infotext_and_errors(tiny, tiny_model):
    def run(prompt):
        out = tiny.txt2img(prompt, steps=3, seed=4, watermark=False)
        return np.asarray(out.images[0]), out.items[0].infotext

    plain, plain_text = run("a red circle")
    zero, zero_text = run("a red circle <hypernet:nr:0>")
    full, full_text = run("a red circle <hypernet:nr:1.5>")
    assert np.array_equal(zero, plain) and not np.array_equal(full, plain)
    info = parse_infotext(full_text)
    assert info["Hypernet"] == "nr" and info["Hypernet strength"] == "1.5"
    assert info["Prompt"] == "a red circle <hypernet:nr:1.5>" and "Hypernet" not in parse_infotext(plain_text)
    with pytest.raises(ParamError, match="hypernetwork 'nosuch' not found") as e:
        run("a red circle <hypernet:nosuch:1>")
    assert e.value.field == "prompt"
    with pytest.raises(ParamError, match="--hypernet-dir"):
        sfumato.load(tiny_model).txt2img("x <hypernet:nr>", steps=2)


def test_cli_hypernet_dir(tiny_model, files, tmp_path):
    from PIL import Image

    from sfumato.cli import main

    out = tmp_path / "a.png"
    assert main(["txt2img", "a red circle <hypernet:lin:0.5>", "--model", str(tiny_model), "--hypernet-dir",
                 str(files[0]), "--steps", "2", "-o", str(out)]) == 0
    info = parse_infotext(Image.open(out).info["parameters"])
    assert (info["Hypernet"], info["Hypernet strength"]) == ("lin", "0.5")
