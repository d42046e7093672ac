"""The golden-latent world: tiny models of every kind the generation loop serves, and the scenarios
whose final latents were saved from main at df43b11 (before the engine redesign of issue 13) into
``tests/data/golden_latents.safetensors``; ``test_golden`` requires them equal.

Everything here is deterministic: the models come from seeded random weights through sfumato's own
modules (``conftest.write_tiny_model``), and every scenario runs in fp32 on the CPU. It uses only the
public API (``sfumato.load``, the Pipeline's methods, ``ControlSpec``) so the same file runs against
the code of either side of the redesign: ``python tests/golden_world.py OUT.safetensors`` in a
checkout writes the latents of that checkout.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_SPEC, write_tiny_model  # noqa: E402

import sfumato  # noqa: E402
from sfumato.checkpoint.io import save_file  # noqa: E402
from sfumato.checkpoint.specs import NoiseAugmentation  # noqa: E402
from sfumato.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402
from sfumato.models.vae import VAEConfig  # noqa: E402

SAMPLERS = ("euler", "euler_a", "heun", "dpmpp_2m", "unipc")
STEPS = 4
SIZE = 64

# the SDXL pair of the refiner tests (base with two text encoders, refiner with its aesthetic score)
from test_refiner import BASE as SDXL_BASE  # noqa: E402
from test_refiner import REFINER as SDXL_REFINER  # noqa: E402

INPAINT9 = replace(TINY_SPEC, unet=replace(TINY_SPEC.unet, in_channels=9))
DEPTH = replace(TINY_SPEC, unet=replace(TINY_SPEC.unet, in_channels=5))
X4 = replace(TINY_SPEC, unet=replace(TINY_SPEC.unet, in_channels=7, num_classes=1000), prediction="v",
             vae=VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, scale_factor=0.08333),
             betas=(0.0001, 0.02), low_res=NoiseAugmentation())
LORA_TARGET = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"


def build(root: Path) -> dict[str, Path]:
    """Every model file of the world under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "sd": write_tiny_model(root / "sd.safetensors", TINY_SPEC, seed=0),
        "inpaint9": write_tiny_model(root / "inpaint9.safetensors", INPAINT9, seed=1),
        "depth": write_tiny_model(root / "depth.safetensors", DEPTH, seed=2),
        "x4": write_tiny_model(root / "x4.safetensors", X4, seed=3),
        "sdxl": write_tiny_model(root / "sdxl.safetensors", SDXL_BASE, seed=4),
        "refiner": write_tiny_model(root / "refiner.safetensors", SDXL_REFINER, seed=5),
    }
    for i, seed in enumerate((6, 7)):
        torch.manual_seed(seed)
        cn = ControlNet(ControlNetConfig(TINY_SPEC.unet, hint_widths=(16, 16, 32, 32)))
        with torch.no_grad():
            for p in cn.parameters():   # zero convolutions would make it a no-op: shake them up
                p.add_(torch.randn_like(p) * 0.05)
        files[f"control{i}"] = root / f"control{i}.safetensors"
        save_file({"control_model." + k: v.contiguous() for k, v in cn.state_dict().items()}, files[f"control{i}"])
    g = torch.Generator().manual_seed(8)
    name = "lora_unet_" + LORA_TARGET.replace(".", "_")
    (root / "loras").mkdir(exist_ok=True)
    files["lora"] = root / "loras" / "shiny.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{name}.lora_up.weight": torch.randn(32, 4, generator=g), f"{name}.alpha": torch.tensor(2.0)},
              files["lora"])
    (root / "hypernetworks").mkdir(exist_ok=True)
    files["hypernetwork"] = root / "hypernetworks" / "glow.pt"
    g = torch.Generator().manual_seed(9)
    mlp = [{"linear.0.weight": torch.randn(64, 32, generator=g) * 0.3, "linear.0.bias": torch.randn(64, generator=g) * 0.3,
            "linear.1.weight": torch.randn(32, 64, generator=g) * 0.3, "linear.1.bias": torch.randn(32, generator=g) * 0.3}
           for _ in range(2)]
    torch.save({32: mlp, "layer_structure": [1, 2, 1], "activation_func": "linear", "is_layer_norm": False},
               files["hypernetwork"])
    return files


def digest(files: dict[str, Path]) -> str:
    """One hash over every file of the world (a mismatch means the fixtures changed, not the loop)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + files[name].read_bytes())
    return h.hexdigest()


def image(seed: int, size: tuple[int, int] = (SIZE, SIZE), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BICUBIC).convert(mode)


def mask(size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[size[1] // 4: size[1] * 3 // 4, size[0] // 4: size[0] * 5 // 8] = 255
    return Image.fromarray(m)


def scenarios(files: dict[str, Path]):
    """name → (model key, function(pipe, sampler) → the pipeline call's result)."""
    kw = dict(steps=STEPS, seed=11, cfg_scale=6.0, watermark=False)
    sd = dict(width=SIZE, height=SIZE, **kw)
    init, depth_map = image(1), image(2, mode="L")
    spec = sfumato.ControlSpec if hasattr(sfumato, "ControlSpec") else None
    if spec is None:
        from sfumato.pipeline.params import ControlSpec as spec
    controls = [spec(files["control0"], image(3), strength=0.9, start=0.0, end=0.5),
                spec(files["control1"], image(4), strength=0.6, start=0.25, end=1.0)]
    prompt, negative = "a red circle", "a blue square"
    return {
        "txt2img": ("sd", lambda p, s: p.txt2img(prompt, negative, sampler=s, batch_size=2, **sd)),
        "img2img": ("sd", lambda p, s: p.img2img(prompt, init, negative, sampler=s, strength=0.6, **kw)),
        "inpaint": ("sd", lambda p, s: p.inpaint(prompt, init, mask(), negative, sampler=s, strength=0.8, **kw)),
        "inpaint9": ("inpaint9", lambda p, s: p.inpaint(prompt, init, mask(), negative, sampler=s, strength=1.0, **kw)),
        "only_masked": ("sd", lambda p, s: p.inpaint(prompt, init, mask(), negative, sampler=s, only_masked=True,
                                                     only_masked_padding=8, **kw)),
        "outpaint": ("sd", lambda p, s: p.outpaint(prompt, image(5, (48, 64)), negative, sampler=s, left=16, **kw)),
        "hires_latent": ("sd", lambda p, s: p.txt2img(prompt, negative, sampler=s, hires_scale=1.5, hires_steps=2,
                                                      hires_denoise=0.6, **sd)),
        "hires_lanczos": ("sd", lambda p, s: p.txt2img(prompt, negative, sampler=s, hires_scale=1.5, hires_steps=2,
                                                       hires_upscaler="lanczos", hires_denoise=0.6, **sd)),
        "refiner": ("sdxl+refiner", lambda p, s: p.txt2img(prompt, negative, sampler=s, refiner_switch=0.5, **sd)),
        "upscale": ("x4", lambda p, s: p.upscale(image(6, (16, 16)), prompt, negative, sampler=s, noise_level=20,
                                                 **kw)),
        "depth2img": ("depth", lambda p, s: p.img2img(prompt, init, negative, sampler=s, strength=0.7,
                                                      depth_map=depth_map, **kw)),
        "controlnets": ("sd", lambda p, s: p.txt2img(prompt, negative, sampler=s, control=controls, **sd)),
        "tome": ("sd", lambda p, s: p.txt2img(prompt, negative, sampler=s, tome_ratio=0.5, **sd)),
        "deepcache": ("sd", lambda p, s: p.txt2img(prompt, negative, sampler=s, deepcache_interval=2, **sd)),
        "and": ("sd", lambda p, s: p.txt2img("a red circle AND a green triangle :0.7", negative, sampler=s, **sd)),
        "prompt_editing": ("sd", lambda p, s: p.txt2img("a [red:blue:0.5] circle", negative, sampler=s, **sd)),
        "guidance_rescale": ("sd", lambda p, s: p.txt2img(prompt, negative, sampler=s, guidance_rescale=0.7, **sd)),
        "lora": ("sd", lambda p, s: p.txt2img(prompt + " <lora:shiny:0.8>", negative, sampler=s, **sd)),
        "hypernetwork": ("sd", lambda p, s: p.txt2img(prompt + " <hypernet:glow:0.7>", negative, sampler=s, **sd)),
    }


def load_pipes(files: dict[str, Path]) -> dict[str, object]:
    root = files["sd"].parent
    kw = dict(dtype="fp32")
    return {
        "sd": sfumato.load(files["sd"], lora_dir=root / "loras", hypernet_dir=root / "hypernetworks", **kw),
        "inpaint9": sfumato.load(files["inpaint9"], **kw),
        "depth": sfumato.load(files["depth"], **kw),
        "x4": sfumato.load(files["x4"], **kw),
        "sdxl+refiner": sfumato.load(files["sdxl"], refiner=files["refiner"], **kw),
    }


def final_latents(pipe, call) -> torch.Tensor:
    """The latents the call's sampling ended with (before decoding): ``result.latents`` where the
    result has them, else caught on their way out of the generator (main at df43b11)."""
    caught = []
    generator = getattr(pipe, "generator", None)
    original = getattr(generator, "run", None)
    if original is not None:
        def run(*args, **kwargs):
            out = original(*args, **kwargs)
            caught.append(out.latents)
            return out

        generator.run = run
    try:
        result = call()
    finally:
        if original is not None:
            del generator.run
    latents = getattr(result, "latents", None)
    return (latents if latents is not None else caught[-1]).detach().float().contiguous()


def run_all(root: Path) -> tuple[dict[str, torch.Tensor], str]:
    torch.set_num_threads(1)     # results depend on GEMM blocking: one thread, as in the saved run
    files = build(root)
    pipes = load_pipes(files)
    out = {}
    for name, (model, call) in scenarios(files).items():
        for sampler in SAMPLERS:
            out[f"{name}/{sampler}"] = final_latents(pipes[model], lambda: call(pipes[model], sampler))
    return out, digest(files)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        latents, fixtures = run_all(Path(tmp) / "world")
    save_file(latents, sys.argv[1], {"fixtures_sha256": fixtures, "source": sys.argv[2] if len(sys.argv) > 2 else ""})
    print(f"{len(latents)} latents, fixtures {fixtures[:12]}")
