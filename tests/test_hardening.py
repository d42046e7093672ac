"""Hardening (issue 15): one test per defect found on main at df43b11, each reproducing it as reported.

1 LoRA names escaping --models-dir; 2 error details leaking contents and paths; 3 outpaint sizes;
4 crafted nesting; 5 pickle expansion; 6 500s for bad requests; 7 CLI tracebacks; 8 silent black
images; 9 prompt cost; 10 file permissions and silent refusals; 11 Host check with --listen and
jobs of clients that hung up.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import socket
import struct
import time
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import sfumato
from sfumato.checkpoint.io import load_file, save_file
from sfumato.cli import main
from sfumato import errors
from sfumato.errors import CheckpointError
from sfumato.pipeline.params import ParamError
from sfumato.pipeline.images import save_image
from sfumato.pipeline.infotext import parse_infotext
from sfumato.server.app import ServerConfig, create_app
from sfumato.train.bundled import BUNDLED_PATH

GOOD = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 1}
TARGET = "input_blocks.3.1.transformer_blocks.0.attn2.to_k"   # a cross-attention projection of the bundled UNet


# -- crafted files (shared with test_hostile_files) ----------------------------------------------

def lora_file(path: Path, seed: int) -> Path:
    """A kohya LoRA for the bundled model (one cross-attention projection)."""
    g = torch.Generator().manual_seed(seed)
    name = "lora_unet_" + TARGET.replace(".", "_")
    save_file({f"{name}.lora_down.weight": torch.randn(4, 64, generator=g),
               f"{name}.lora_up.weight": torch.randn(96, 4, generator=g), f"{name}.alpha": torch.tensor(2.0)}, path)
    return path


def zip_pickle(path: Path, pkl: bytes) -> Path:
    """A torch.save zip file whose ``data.pkl`` is ``pkl``."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as out:
        for name in source.namelist():
            out.writestr(name, pkl if name.endswith("data.pkl") else source.read(name))
    return path


def deep_pickle(depth: int) -> bytes:
    """``{"a": [[[…]]]}`` nested ``depth`` lists deep (protocol 2, opcodes torch's safe unpickler takes)."""
    return b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01" + b"]" * depth + b"a" * (depth - 1) + b"s."


def shared_checkpoint(path: Path, levels: int) -> Path:
    """``{"a": node}`` where ``node = [node′, node′]`` ``levels`` times over ``[tensor]``: a file of
    about 2 KB (the pickle memo keeps one copy of each level) with 2**levels tensor paths."""
    node: list = [torch.zeros(1)]
    for _ in range(levels):
        node = [node, node]
    torch.save({"a": node}, path)
    return path


def deep_safetensors(path: Path, depth: int = 100_000) -> Path:
    header = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def png_bytes(size=(64, 64), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side² pixels (a few KB on disk)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * side
    idat = zlib.compress(row * 64, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# -- a server over a models folder with links leading out ---------------------------------------

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    models, outside = root / "models", root / "outside"
    for folder in (models / "Lora" / "sub", models / "VAE", models / "embeddings", outside):
        folder.mkdir(parents=True)
    lora_file(outside / "secret.safetensors", seed=1)
    lora_file(models / "Lora" / "sub" / "escape.safetensors", seed=2)
    lora_file(models / "Lora" / "good.safetensors", seed=3)
    os.symlink(outside / "secret.safetensors", models / "Lora" / "escape.safetensors")
    os.symlink(outside / "secret.safetensors", models / "Lora" / "only_link.safetensors")
    os.symlink(outside, models / "Lora" / "linkdir")
    (models / "Lora" / "notalora.safetensors").write_bytes(b"SECRET-TOKEN-123 and more text")
    (outside / "notamodel.safetensors").write_bytes(b"SECRET-TOKEN-123 and more text")
    os.symlink(outside / "notamodel.safetensors", models / "linked.safetensors")
    zip_pickle(models / "unsafe.ckpt", b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    (models / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    (models / "VAE" / "broken.safetensors").write_bytes(b"SECRET-TOKEN-123 and more text")
    deep_safetensors(models / "embeddings" / "deep.safetensors")
    return root


@pytest.fixture(scope="module")
def client(tree):
    app = create_app(ServerConfig(models_dir=tree / "models"))   # as `sfumato serve` starts: embeddings loaded
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def infotext(response) -> str:
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])["infotexts"][0]


def job_result(client, body: dict) -> dict:
    r = client.post("/v1/jobs", json={"mode": "txt2img", **body})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    for _ in range(600):
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["status"] in ("done", "failed", "cancelled", "interrupted"):
            return status
        time.sleep(0.05)
    raise AssertionError("job did not finish")


# -- 1 -------------------------------------------------------------------------------------------

def test_1_lora_tag_loads_the_file_the_catalog_lists_not_a_link_out(client, tree):
    text = infotext(client.post("/sdapi/v1/txt2img", json={**GOOD, "prompt": "x <lora:escape:1>"}))
    hashes = parse_infotext(text)["Lora hashes"]
    assert sha12(tree / "models/Lora/sub/escape.safetensors") in hashes
    assert sha12(tree / "outside/secret.safetensors") not in text


@pytest.mark.parametrize("tag", ["<lora:only_link:1>", "<lora:linkdir/secret:1>"])
def test_1_disable_extra_networks_turns_the_tags_off(client, tree, tag):
    body = {**GOOD, "prompt": f"x {tag}", "disable_extra_networks": True}
    text = infotext(client.post("/sdapi/v1/txt2img", json=body))
    assert "Lora hashes" not in text and tag not in text
    status = job_result(client, body)
    assert status["status"] == "done", status
    assert "Lora hashes" not in status["result"]["info"]
    # with the tags on, the same names are unknown: the links lead out of the folder
    r = client.post("/sdapi/v1/txt2img", json={**GOOD, "prompt": f"x {tag}"})
    assert r.status_code == 422 and r.json()["field"] == "prompt", r.text


def test_1_cli_lora_dir_refuses_links_out(tree, tmp_path, capsys):
    code = main(["txt2img", "x <lora:only_link:1>", "--lora-dir", str(tree / "models/Lora"), "--steps", "1",
                 "-o", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.png").exists()


# -- 2 -------------------------------------------------------------------------------------------

def test_2_errors_hold_no_file_content_or_server_paths(client, tree):
    bodies = [
        {**GOOD, "prompt": "x <lora:notalora:1>"},
        {**GOOD, "override_settings": {"sd_model_checkpoint": "corrupt.safetensors"}},
        {**GOOD, "override_settings": {"sd_vae": "broken.safetensors"}},
    ]
    for body in bodies:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422, r.text
        for leak in ("SECRET", str(tree), "/tmp", "site-packages"):
            assert leak not in r.text, (body, r.text)
    # a name leading outside answers as a name that does not exist: nothing tells what is there
    answers = []
    for name in ("../outside/notamodel.safetensors", "../outside/nothing.safetensors", "linked.safetensors",
                 "nothing.safetensors"):
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert r.status_code == 422, r.text
        answers.append(r.json()["detail"].replace(name, "NAME"))
    assert answers[0] == answers[1] and answers[2] == answers[3], answers


# -- 3 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"width": 64, "height": 64}])
def test_3_outpaint_is_bounded_before_the_canvas_is_built(client, extra):
    body = {**GOOD, "init_images": [b64(png_bytes())], "outpaint_left": 100000, **extra}
    start = time.monotonic()
    r = client.post("/sdapi/v1/img2img", json=body)
    assert time.monotonic() - start < 2
    assert r.status_code == 422 and r.json()["field"] == "outpaint_left", r.text
    # a canvas inside the limits still works
    r = client.post("/sdapi/v1/img2img", json={**body, "outpaint_left": 64})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size[0] <= 2048


# -- 4, 5 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", ["deep_header", "deep_pickle", "shared_pickle"])
def test_4_5_crafted_structures_are_refused_fast(tmp_path, make, capsys):
    path = {"deep_header": lambda: deep_safetensors(tmp_path / "x.safetensors"),
            "deep_pickle": lambda: zip_pickle(tmp_path / "x.ckpt", deep_pickle(100_000)),
            "shared_pickle": lambda: shared_checkpoint(tmp_path / "x.ckpt", 22)}[make]()
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_file(path)
    assert time.monotonic() - start < 2
    assert "\n" not in str(info.value)
    assert main(["info", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_4_a_crafted_embedding_does_not_stop_the_server(client):
    skipped = client.get("/sdapi/v1/embeddings").json()["skipped"]
    assert "deep" in skipped


def test_5_shared_reference_lora_is_refused_by_the_worker_quickly(client, tree):
    shared_checkpoint(tree / "models/Lora/expand.ckpt", 22)
    client.post("/sdapi/v1/refresh-checkpoints")
    start = time.monotonic()
    r = client.post("/sdapi/v1/txt2img", json={**GOOD, "prompt": "x <lora:expand:1>"})
    assert time.monotonic() - start < 5
    assert r.status_code == 422 and r.json()["field"] == "prompt", r.text
    assert client.post("/sdapi/v1/txt2img", json=GOOD).status_code == 200


# -- 6 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, field", [
    ('{"prompt": "x", "steps": 1, "width": 64, "height": 64, "enable_hr": true, "hr_scale": Infinity}', "hr_scale"),
    ('{"prompt": "x", "width": 64, "height": 64, "sampler_name": "LCM", "steps": 60}', "steps"),
    ('{"prompt": "x \\ud800", "steps": 1, "width": 64, "height": 64}', "prompt"),
    ('{"prompt": "x <lora:good:nan>", "steps": 1, "width": 64, "height": 64}', "prompt"),
    ('{"prompt": "x <lora:good:1e309>", "steps": 1, "width": 64, "height": 64}', "prompt"),
    ('{"prompt": "x", "steps": 1, "width": 64, "height": 64, '
     '"override_settings": {"sd_model_checkpoint": "unsafe.ckpt"}}', "override_settings.sd_model_checkpoint"),
    ('{"prompt": "x", "steps": 1, "width": 64, "height": 64, '
     '"override_settings": {"sd_model_checkpoint": "corrupt.safetensors"}}', "override_settings.sd_model_checkpoint"),
])
def test_6_bad_requests_are_4xx_naming_the_field(client, raw, field):
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["field"] == field, r.text
    assert client.post("/sdapi/v1/txt2img", json=GOOD).status_code == 200


@pytest.mark.parametrize("options, field", [({"sd_model_checkpoint": "unsafe.ckpt"}, "sd_model_checkpoint"),
                                            ({"sd_vae": "broken.safetensors"}, "sd_vae")])
def test_6_unloadable_models_set_through_options_are_4xx(client, options, field):
    r = client.post("/sdapi/v1/options", json=options)
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert client.post("/sdapi/v1/txt2img", json=GOOD).status_code == 200


# -- 7 -------------------------------------------------------------------------------------------

def _one_line_exit_2(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_7_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    out = str(tmp_path / "o.png")
    bomb = bomb_png(tmp_path / "bomb.png")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    crafted = zip_pickle(tmp_path / "crafted.ckpt", deep_pickle(100_000))
    cases = [
        ["txt2img", "x", "--sampler", "LCM", "--steps", "60", "-o", out],
        ["txt2img", "x \udcff", "--steps", "1", "-o", out],      # an undecodable byte in argv
        ["img2img", "x", "--init-image", str(bomb), "--steps", "1", "-o", out],
        ["txt2img", "--from-png", str(tmp_path / "missing.png"), "-o", out],
        ["txt2img", "--from-png", str(text), "-o", out],
        ["png-info", str(text)],
        ["png-info", str(bomb)],
        ["serve", "--model", str(crafted)],
    ]
    for argv in cases:
        _one_line_exit_2(capsys, argv)
    assert not Path(out).exists()


def test_7_corrupt_training_resume_state_is_one_line(tmp_path, capsys):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "checkpoint.pt").write_bytes(b"\x80\x02garbage that is no pickle")
    err = _one_line_exit_2(capsys, ["train", "vae", "--out", str(tmp_path), "--steps", "1", "--threads", "1"])
    assert "checkpoint.pt" in err


def test_7_internal_errors_say_how_to_see_the_traceback(monkeypatch, capsys):
    import sfumato.commands.info as info

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(info, "cmd_info", broken)
    assert main(["info", "x"]) == 1
    err = capsys.readouterr().err
    assert "rerun with -v" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- 8 -------------------------------------------------------------------------------------------

def _poisoned(tmp_path: Path, prefix: str, value: float) -> Path:
    sd, metadata = load_file(BUNDLED_PATH)
    key = next(k for k in sd if k.startswith(prefix) and sd[k].is_floating_point() and sd[k].numel() > 1)
    sd = {k: v.clone() for k, v in sd.items()}
    sd[key].view(-1)[0] = value
    path = tmp_path / f"poisoned-{prefix.split('.')[0]}.safetensors"
    save_file(sd, path, metadata)
    return path


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "first_stage_model.", "cond_stage_model."])
def test_8_nonfinite_weights_are_refused_at_load(tmp_path, prefix, capsys):
    path = _poisoned(tmp_path, prefix, float("nan"))
    with pytest.raises(errors.NonFiniteWeightsError):
        sfumato.load(path)
    err = _one_line_exit_2(capsys, ["txt2img", "x", "--model", str(path), "--steps", "1",
                                    "-o", str(tmp_path / "o.png")])
    assert "NaN" in err
    assert not (tmp_path / "o.png").exists()


def test_8_nonfinite_lora_and_embedding_are_refused(tmp_path, capsys):
    loras = tmp_path / "loras"
    loras.mkdir()
    path = lora_file(loras / "bad.safetensors", 0)
    sd, _ = load_file(path)
    sd = {k: v.clone() for k, v in sd.items()}
    next(v for k, v in sd.items() if k.endswith("up.weight"))[0, 0] = float("inf")
    save_file(sd, path)
    err = _one_line_exit_2(capsys, ["txt2img", "x <lora:bad:1>", "--lora-dir", str(loras), "--steps", "1",
                                    "-o", str(tmp_path / "o.png")])
    assert "NaN or infinite" in err
    embeddings = tmp_path / "emb"
    embeddings.mkdir()
    save_file({"emb_params": torch.full((1, 64), float("nan"))}, embeddings / "nanword.safetensors")
    pipe = sfumato.load(embeddings_dir=embeddings)
    assert "nanword" in pipe.embeddings.skipped and "NaN" in pipe.embeddings.skipped["nanword"]


def test_8_nested_emphasis_overflow_is_a_prompt_error(capsys, tmp_path):
    prompt = "(" * 5000 + "red circle" + ")" * 5000
    with pytest.raises(ParamError, match="prompt"):
        sfumato.load().txt2img(prompt, steps=1)
    _one_line_exit_2(capsys, ["txt2img", prompt, "--steps", "1", "-o", str(tmp_path / "o.png")])


def test_8_a_model_that_outputs_inf_is_an_error_not_a_black_image(tmp_path):
    sd, metadata = load_file(BUNDLED_PATH)
    sd = {k: v.float() for k, v in sd.items()}
    sd["model.diffusion_model.out.2.bias"].fill_(3e38)   # finite weights, infinite output
    path = tmp_path / "overflow.safetensors"
    save_file(sd, path, metadata)
    with pytest.raises(errors.NonFiniteOutputError, match="UNet of overflow.safetensors"):
        sfumato.load(path, dtype="fp32").txt2img("x", steps=2, seed=1)


# -- 9 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["a" * (1 << 20), "red " + " AND red" * 1000])
def test_9_prompt_cost_is_bounded_before_work(client, prompt):
    start = time.monotonic()
    r = client.post("/sdapi/v1/txt2img", json={**GOOD, "prompt": prompt, "steps": 2})
    assert time.monotonic() - start < 3
    assert r.status_code in (413, 422) and r.json()["field"] in ("prompt", "body"), r.text[:300]


# -- 10 ------------------------------------------------------------------------------------------

def test_10_outputs_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_image(Image.new("RGB", (8, 8)), tmp_path / "x.png", "p")
        assert path.stat().st_mode & 0o777 == 0o644
        manifest = tmp_path / "m.txt"
        manifest.write_text("x")
        assert path.stat().st_mode & 0o777 == manifest.stat().st_mode & 0o777
    finally:
        os.umask(old)


def test_10_refused_embeddings_are_logged_with_the_reason(tmp_path, caplog):
    zip_pickle(tmp_path / "evil.pt", b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with caplog.at_level(logging.WARNING):
        found = sfumato.load(embeddings_dir=tmp_path).embeddings
    assert "evil" in found.skipped
    assert any("evil" in r.getMessage() and "os.system" in r.getMessage() for r in caplog.records)


# -- 11 ------------------------------------------------------------------------------------------

def test_11_listen_without_auth_keeps_a_host_allow_list():
    app = create_app(ServerConfig(listen=True), pipeline=sfumato.load())
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        assert c.get("/sdapi/v1/options").status_code == 200
        assert c.get("/sdapi/v1/options", headers={"Host": f"{socket.gethostname()}:7860"}).status_code == 200
        r = c.get("/sdapi/v1/options", headers={"Host": "attacker.example:7860"})
        assert r.status_code == 421 and r.json()["field"] == "host"
    app = create_app(ServerConfig(listen=True, allowed_hosts=("sd.example",)), pipeline=sfumato.load())
    with TestClient(app, base_url="http://sd.example") as c:
        assert c.get("/sdapi/v1/options").status_code == 200
        assert c.get("/sdapi/v1/options", headers={"Host": "attacker.example"}).status_code == 421


def test_11_a_client_that_hangs_up_cancels_its_job():
    from conftest import live_server

    app = create_app(ServerConfig(), pipeline=sfumato.load())
    state = app.state.sfumato
    with live_server(app) as port:
        body = json.dumps({**GOOD, "steps": 150, "batch_size": 8, "n_iter": 32}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 20
        while state.queue.running is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        job = state.queue.running
        sock.close()
        while not job.done:
            assert time.monotonic() < deadline, "the job kept running after its client hung up"
            time.sleep(0.05)
        assert job.status == "cancelled"


def test_6_a_vae_of_another_model_is_a_422_naming_sd_vae(tmp_path, tiny_model):
    """The VAE file reads fine on its own but does not fit the model: the load fails after the model in
    use was let go, and the answer still names the field that chose the VAE."""
    models = tmp_path / "models"
    (models / "VAE").mkdir(parents=True)
    sd, _ = load_file(tiny_model)
    save_file({k: v for k, v in sd.items() if k.startswith("first_stage_model.")}, models / "VAE" / "other.safetensors")
    app = create_app(ServerConfig(models_dir=models))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.post("/sdapi/v1/txt2img", json={**GOOD, "override_settings": {"sd_vae": "other.safetensors"}})
        assert r.status_code == 422 and r.json()["field"] == "override_settings.sd_vae", r.text
        assert c.post("/sdapi/v1/txt2img", json=GOOD).status_code == 200
