"""Devices and half precision (issue 14): ``--device`` on the commands that run a model (auto = CUDA when
present), a missing device is one line and exit 2, and a half-precision VAE decode that overflows is
redone in fp32 (A1111's NaN check) instead of returning a black image."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import sfumato
from sfumato.api import resolve_device
from sfumato.cli import main
from sfumato.errors import ParamError


def test_cpu_is_the_same_image_as_the_default(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the default is CUDA here")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["a red circle", "--steps", "2", "--seed", "3", "--no-watermark"]
    assert main(["txt2img", *common, "-o", str(a)]) == 0
    assert main(["txt2img", *common, "--device", "cpu", "-o", str(b)]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", "tpu", "cpu:1", "cuda:x"])
def test_a_device_that_is_not_there_is_one_line_and_exit_2(device, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available() and device != "cuda:x":
        pytest.skip("a GPU is here")
    for argv in (["txt2img", "x", "--device", device, "-o", str(tmp_path / "x.png")],
                 ["batch", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"), "--device", device],
                 ["serve", "--device", device],
                 ["eval", "shapes", "--device", device]):
        if argv[0] == "batch":
            (tmp_path / "none.jsonl").write_text('{"prompt": "x"}\n')
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "device" in err and "Traceback" not in err, err
    assert not (tmp_path / "x.png").exists()


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    mps = getattr(torch.backends, "mps", None)
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps is not None and mps.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == expected
    with pytest.raises(ParamError, match="device"):
        resolve_device("gpu")


def _overflowing(pipe):
    """The VAE's first decoder convolution scaled so that fp16 arithmetic overflows (fp32 does not)."""
    with torch.no_grad():
        pipe.model.vae.decoder.conv_in.weight.mul_(3000)
    return pipe


def test_a_half_precision_decode_that_overflows_is_redone_in_fp32(caplog):
    reference = _overflowing(sfumato.load(dtype="fp16")).txt2img("a red circle", steps=2, seed=1, watermark=False)
    pipe = _overflowing(sfumato.load(dtype="fp16"))
    vae = pipe.model.vae
    vae.dtype_override = torch.float16        # half arithmetic, as on a GPU
    with torch.no_grad():
        z = reference.latents / pipe.model.spec.vae.scale_factor
        assert not torch.isfinite(vae.decode(z)).all()     # it does overflow in fp16
    with caplog.at_level(logging.WARNING):
        result = pipe.txt2img("a red circle", steps=2, seed=1, watermark=False)
    assert any("decoding again in fp32" in r.getMessage() for r in caplog.records)
    assert vae.compute_dtype == torch.float32          # and stays fp32, as with --no-half-vae
    got, want = np.asarray(result.images[0]), np.asarray(reference.images[0])
    assert np.array_equal(got, want) and got.std() > 1


def test_no_half_vae_keeps_the_vae_in_fp32():
    pipe = sfumato.load(dtype="fp16", no_half_vae=True)
    assert pipe.model.vae.compute_dtype == torch.float32 and next(pipe.model.vae.parameters()).dtype == torch.float16


def test_the_gpu_bench_says_when_there_is_no_gpu(capsys):
    import importlib.util
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the bench would run")
    spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).parents[1] / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 2 and "no GPU" in capsys.readouterr().err
    assert module.main(["--device", "cuda:3"]) == 2 and "device" in capsys.readouterr().err
