"""The server's defences: auth on every route, CSRF, names resolved only inside their folders,
body and image size limits, bounds on parameters — and after each refusal the next good request
is served."""

from __future__ import annotations

import base64
import io
import os
import shutil
import struct
import zlib

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image
from starlette.routing import Mount, Route

import sfumato
from sfumato.server.app import ServerConfig, create_app
from sfumato.cli import main as serve_main
from sfumato.server.security import ApiError, Limits, decode_image
from sfumato.train.bundled import BUNDLED_PATH

USER, PASSWORD = "ann", "s3cret-pw"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
LIMITS = Limits(max_body=1 << 20, max_image_pixels=256 * 256, max_width=256, max_height=256, max_steps=50,
                max_batch_size=4, max_n_iter=4, max_total_pixels=4 * 256 * 256)
GOOD = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 1}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A models folder with one real extra checkpoint, dummies of each kind, and links leading out."""
    root = tmp_path_factory.mktemp("srv")
    models, outside = root / "models", root / "outside"
    for folder in (models / "VAE", models / "Lora", models / "embeddings", outside):
        folder.mkdir(parents=True)
    shutil.copy(BUNDLED_PATH, models / "other.safetensors")
    for path in (models / "VAE/v.safetensors", models / "Lora/style.safetensors", models / "embeddings/emb.pt",
                 outside / "secret.safetensors", outside / "secret.pt"):
        path.write_bytes(b"not a model")
    os.symlink(outside / "secret.safetensors", models / "escape.safetensors")
    os.symlink(outside / "secret.safetensors", models / "VAE/escape.safetensors")
    os.symlink(outside / "secret.safetensors", models / "Lora/escape.safetensors")
    os.symlink(outside / "secret.pt", models / "embeddings/escape.pt")
    os.symlink(outside, models / "linkdir")
    return root


@pytest.fixture(scope="module")
def app(dirs):
    config = ServerConfig(models_dir=dirs / "models", listen=True, api_auth=(USER, PASSWORD), max_queue=4,
                          limits=LIMITS)
    return create_app(config, pipeline=sfumato.load())


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, headers={"Authorization": AUTH}) as c:
        yield c


@pytest.fixture(scope="module")
def anonymous(app, client):
    with TestClient(app) as c:
        yield c


def assert_still_serving(client):
    r = client.post("/sdapi/v1/txt2img", json=GOOD)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1


def all_requests(app):
    """(method, path) for every route of the app, the static UI files, and an unknown path."""
    out = []
    for route in app.routes:
        if isinstance(route, (APIRoute, Route)):
            path = route.path.replace("{job_id}", "0" * 32)
            out += [(method, path) for method in sorted(route.methods or ["GET"]) if method != "HEAD"]
        elif isinstance(route, Mount):
            out += [("GET", "/"), ("GET", "/index.html"), ("GET", "/app.js"), ("GET", "/style.css")]
    return out + [("GET", "/no/such/path"), ("POST", "/no/such/path")]


def test_every_route_refuses_unauthenticated_access(app, anonymous):
    requests = all_requests(app)
    paths = {path for _, path in requests}
    assert {"/docs", "/openapi.json", "/sdapi/v1/txt2img", "/v1/jobs/{}/events".format("0" * 32), "/"} <= paths
    wrong = "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()
    for method, path in requests:
        for headers in ({}, {"Authorization": wrong}, {"Authorization": "Bearer " + PASSWORD}):
            kwargs = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
            r = anonymous.request(method, path, headers=headers, **kwargs)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"].startswith("Basic")
            assert r.json()["error"] == "unauthorized"


def test_authenticated_responses_hold_no_secrets_or_paths(app, client, dirs):
    assert client.get("/").status_code == 200
    for method, path in all_requests(app):
        if method != "GET" or "{" in path or path.endswith("/events"):
            continue
        text = client.get(path).text
        for secret in (PASSWORD, str(dirs), str(BUNDLED_PATH.parent), "site-packages"):
            assert secret not in text, (path, secret)


@pytest.mark.parametrize("headers, status", [
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Origin": "http://testserver.evil.example"}, 403),
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Sec-Fetch-Site": "same-site"}, 403),
    ({"Content-Type": "text/plain"}, 415),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
    ({"Origin": "http://testserver"}, 200),                          # same origin
    ({"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}, 200),
    ({}, 200),                                                       # a non-browser client
])
def test_csrf_header_matrix(client, headers, status):
    body = b'{"CLIP_stop_at_last_layers": 2}'
    r = client.post("/sdapi/v1/options", content=body, headers={"Content-Type": "application/json", **headers})
    assert r.status_code == status, r.text
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == (2 if status == 200 else 1)
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200
    r = client.post("/sdapi/v1/interrupt", headers=headers)          # a POST without a body
    assert r.status_code == status


def test_loopback_server_answers_loopback_host_names_only():
    app = create_app(ServerConfig(), pipeline=sfumato.load())
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        assert c.get("/sdapi/v1/options").status_code == 200
        assert c.get("/sdapi/v1/options", headers={"Host": "localhost:7860"}).status_code == 200
        assert c.get("/sdapi/v1/options", headers={"Host": "[::1]:7860"}).status_code == 200
        r = c.get("/sdapi/v1/options", headers={"Host": "evil.example:7860"})   # DNS rebinding
        assert r.status_code == 421 and r.json()["field"] == "host"


TRAVERSAL = ["../outside/secret.safetensors", "../../etc/passwd", "/etc/passwd", "..\\outside\\secret.safetensors",
             "C:\\Windows\\win.ini", "VAE/../../outside/secret.safetensors", "./other.safetensors",
             "escape.safetensors", "escape", "linkdir/secret.safetensors", "other\x00.safetensors", ""]


@pytest.mark.parametrize("name", TRAVERSAL)
def test_names_resolve_only_inside_their_folders(app, client, dirs, name):
    absolute = str(dirs / "outside" / "secret.safetensors")
    for value in (name, absolute):
        cases = [
            ("/sdapi/v1/options", {"sd_model_checkpoint": value}, "sd_model_checkpoint"),
            ("/sdapi/v1/options", {"sd_vae": value}, "sd_vae"),
            ("/sdapi/v1/txt2img", {**GOOD, "override_settings": {"sd_model_checkpoint": value}},
             "override_settings.sd_model_checkpoint"),
            ("/sdapi/v1/txt2img", {**GOOD, "override_settings": {"sd_vae": value}}, "override_settings.sd_vae"),
            ("/sdapi/v1/txt2img", {**GOOD, "prompt": f"a circle <lora:{value}:0.8>"}, "prompt"),
        ]
        for path, body, field in cases:
            r = client.post(path, json=body)
            assert r.status_code == 422 and r.json()["field"] == field, (path, body, r.text)
        catalog = app.state.sfumato.catalog
        for kind in ("checkpoint", "vae", "lora", "embedding"):
            with pytest.raises(ApiError) as e:
                catalog.find(kind, value, kind)
            assert e.value.status == 422
    assert_still_serving(client)


def test_listings_skip_links_that_leave_the_folder(client):
    models = [m["filename"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert models == ["bundled.safetensors", "bundled-unclip.safetensors", "other.safetensors"]
    assert [v["filename"] for v in client.get("/sdapi/v1/sd-vae").json()] == ["v.safetensors"]
    assert [lora["name"] for lora in client.get("/sdapi/v1/loras").json()] == ["style"]
    listed = client.get("/sdapi/v1/embeddings").json()
    assert set(listed) == {"loaded", "skipped"} and "escape" not in {**listed["loaded"], **listed["skipped"]}


def test_names_inside_the_folders_resolve(app, client):
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("other.safetensors [")
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "bundled"}).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={**GOOD, "prompt": "a circle <lora:style:0.8>"})
    assert r.status_code == 422 and r.json()["field"] == "prompt" and "style" in r.json()["detail"]  # a dummy file
    assert app.state.sfumato.catalog.find("embedding", "emb", "embedding").name == "emb.pt"
    assert_still_serving(client)


def test_oversized_bodies_are_refused_before_parsing(client):
    big = b'{"prompt": "' + b"x" * (LIMITS.max_body + 1) + b'"}'
    r = client.post("/sdapi/v1/txt2img", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"

    def chunks():                                    # no Content-Length: counted as it streams in
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert_still_serving(client)


def png_claiming(width: int, height: int) -> str:
    """A tiny PNG file whose header claims ``width`` × ``height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    assert len(data) < 200
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("width, height", [(1000, 1000), (30000, 30000), (1, 2**31 - 1)])
def test_decompression_bombs_are_refused(client, width, height):
    bomb = png_claiming(width, height)
    r = client.post("/sdapi/v1/png-info", json={"image": bomb})
    assert r.status_code == 413 and r.json()["field"] == "image", r.text
    r = client.post("/sdapi/v1/img2img", json={**GOOD, "init_images": [bomb]})
    assert r.status_code == 413 and r.json()["field"] == "init_images", r.text
    assert_still_serving(client)


def test_base64_size_is_checked_before_decoding():
    with pytest.raises(ApiError) as e:
        decode_image("!" * 101, "image", Limits(max_body=100))     # invalid base64, but too long first
    assert e.value.status == 413
    with pytest.raises(ApiError) as e:
        decode_image("!" * 100, "image", Limits(max_body=100))
    assert e.value.status == 422


def _png(size=(64, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("path, body, field", [
    ("/sdapi/v1/txt2img", {"width": 100}, "width"),
    ("/sdapi/v1/txt2img", {"height": 1024}, "height"),
    ("/sdapi/v1/txt2img", {"steps": 0}, "steps"),
    ("/sdapi/v1/txt2img", {"steps": 10_000}, "steps"),
    ("/sdapi/v1/txt2img", {"sampler_name": "Euler b"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"scheduler": "zigzag"}, "scheduler"),
    ("/sdapi/v1/txt2img", {"denoising_strength": 2}, "denoising_strength"),
    ("/sdapi/v1/txt2img", {"batch_size": 1000}, "batch_size"),
    ("/sdapi/v1/txt2img", {"n_iter": 1000}, "n_iter"),
    ("/sdapi/v1/txt2img", {"width": 256, "height": 256, "batch_size": 4, "n_iter": 4}, "batch_size"),
    ("/sdapi/v1/txt2img", {"cfg_scale": "high"}, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"seed": 2**40}, "seed"),
    ("/sdapi/v1/txt2img", {"restore_faces": True}, "restore_faces"),
    ("/sdapi/v1/txt2img", {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ("/sdapi/v1/txt2img", {"override_settings": {"outdir_samples": "/tmp"}}, "override_settings.outdir_samples"),
    ("/sdapi/v1/img2img", {"init_images": ["<png>"], "denoising_strength": 2}, "denoising_strength"),
    ("/sdapi/v1/img2img", {"init_images": ["<png>"], "mask": "<png>", "inpainting_fill": 7}, "inpainting_fill"),
    ("/sdapi/v1/img2img", {"init_images": ["not base64!"]}, "init_images"),
    ("/sdapi/v1/img2img", {}, "init_images"),
    ("/sdapi/v1/options", {"outdir_samples": "/tmp"}, "outdir_samples"),
    ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 99}, "CLIP_stop_at_last_layers"),
    ("/v1/jobs", {"mode": "txt2img", "width": 100}, "width"),
    ("/v1/jobs", {"mode": "paint"}, "mode"),
])
def test_bad_parameters_are_422_naming_the_field(client, path, body, field):
    body = {k: [_png() if x == "<png>" else x for x in v] if k == "init_images" else v for k, v in body.items()}
    if body.get("mask") == "<png>":
        body["mask"] = _png()
    if path != "/sdapi/v1/options":
        body = {**GOOD, **body}
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text[:300]
    assert r.json()["field"] == field and r.json()["detail"].startswith(field)
    assert_still_serving(client)


def test_serve_refuses_unsafe_command_lines(capsys):
    assert serve_main(["serve", "--host", "0.0.0.0"]) == 2           # not loopback, and no --listen
    assert "--listen" in capsys.readouterr().err
    assert serve_main(["serve", "--api-auth", "nopassword"]) == 2
    assert serve_main(["serve", "--api-auth", ":pw"]) == 2
