"""Random A1111 and job-API requests (issue 15): whatever a client sends, the answer is never a 500,
no job ends in an internal error, and the server then serves a normal txt2img.

Requests are a valid base with fields added, removed or replaced by random values of random types
(huge, negative, non-finite, wrong types, odd Unicode, garbage images), sent to every generating
route and to the option, png-info and job routes. The limits are small, so the requests that
happen to be valid stay cheap to run.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import sfumato
from sfumato.server.app import ServerConfig, create_app
from sfumato.server.security import Limits

N_REQUESTS = 360
LIMITS = Limits(max_body=1 << 20, max_image_pixels=128 * 128, max_width=128, max_height=128, max_steps=3,
                max_batch_size=2, max_n_iter=2, max_total_pixels=2 * 128 * 128, max_prompt_length=2000,
                max_prompt_workload=8000)
GOOD = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 1}


def _png(rng: random.Random) -> str:
    buffer = io.BytesIO()
    size = (rng.choice([8, 16, 64, 72, 200]), rng.choice([8, 64, 96]))
    Image.new(rng.choice(["RGB", "RGBA", "L", "P"]), size, rng.randrange(256)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(16 if depth < 2 else 12)
    return [
        lambda: rng.randint(-3, 3),
        lambda: rng.choice([0, 1, 8, 63, 64, 65, 128, 129, 2**31, 2**63, -(2**63), 10**30]),
        lambda: rng.uniform(-2, 2),
        lambda: rng.choice([1e-300, 1e308, -0.0, 0.5, 7.0, 1e6]),
        lambda: rng.choice(["nan", "inf", "-inf", "NaN", "Infinity"]),
        lambda: "",
        lambda: rng.choice(["Euler", "euler_a", "LCM", "DPM++ 2M Karras", "Karras", "none", "Latent", "Lanczos",
                            "Automatic", "x" * 300, "../../etc/passwd", "/abs", "C:\\x", "a\x00b"]),
        lambda: "".join(rng.choice("ab (){}[]<>:|\\,.AND BREAK \u00e9\u4e2d\U0001f600\ud800\u202e\n")
                        for _ in range(rng.randrange(40))),
        lambda: rng.choice(["<lora:x:1>", "<lora:../x>", "<lora:a:nan>", "<hypernet:h>", "[a:b:0.5]", "[a|b]",
                            "(((x)))", "(x:1e309)", "a AND b :2", "<lora:x:1:2:3>"]),
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: _png(rng) if rng.random() < 0.5 else rng.choice(["data:image/png;base64,AAAA", "not base64!",
                                                                 base64.b64encode(b"GIF89a junk").decode()]),
        lambda: [_value(rng, depth + 1) for _ in range(rng.randrange(3))],
        lambda: {str(_value(rng, depth + 1))[:20]: _value(rng, depth + 1) for _ in range(rng.randrange(3))},
        lambda: [_png(rng)],
        lambda: {"sd_model_checkpoint": _value(rng, depth + 1), "CLIP_stop_at_last_layers": _value(rng, depth + 1)},
    ][kind]()


FIELDS = ["prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "sampler_name", "sampler_index",
          "scheduler", "batch_size", "n_iter", "steps", "cfg_scale", "width", "height", "denoising_strength",
          "styles", "restore_faces", "tiling", "eta", "s_noise", "override_settings", "disable_extra_networks",
          "script_name", "alwayson_scripts", "send_images", "enable_hr", "hr_scale", "hr_upscaler",
          "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "init_images", "mask", "mask_blur",
          "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
          "outpaint_left", "outpaint_right", "outpaint_up", "outpaint_down", "resize_mode", "no_such_field",
          "seed_resize_from_w", "refiner_checkpoint", "refiner_switch_at", "mode"]


def _request(rng: random.Random) -> tuple[str, str, object]:
    """(method, path, JSON body or raw bytes)."""
    route = rng.choice(["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/jobs", "/v1/jobs", "/sdapi/v1/options",
                        "/sdapi/v1/png-info", "raw"])
    if route == "raw":
        path = rng.choice(["/sdapi/v1/txt2img", "/v1/jobs", "/sdapi/v1/options"])
        body = rng.choice([b"{", b"[]", b"null", b"1e999999", b'{"prompt": NaN}', b'{"prompt": "\\ud800"}',
                           b'{"steps": 1e400}', b"\xff\xfe", b'{"a":' * 3000 + b"1" + b"}" * 3000])
        return "POST", path, body
    if route == "/sdapi/v1/png-info":
        return "POST", route, {"image": _value(rng)}
    if route == "/sdapi/v1/options":
        keys = ["sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "randn_source", "bogus"]
        return "POST", route, {rng.choice(keys): _value(rng) for _ in range(rng.randrange(1, 3))}
    body = dict(GOOD)
    if route != "/sdapi/v1/txt2img" and rng.random() < 0.7:
        body["init_images"] = [_png(rng)]
    if route == "/v1/jobs":
        body["mode"] = rng.choice(["txt2img", "img2img", "img2img", "other"])
    for _ in range(rng.randrange(0, 5)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.15:
            body.pop(field, None)
        else:
            body[field] = _value(rng)
    return "POST", route, body


@pytest.fixture(scope="module")
def client():
    app = create_app(ServerConfig(limits=LIMITS, max_queue=4), pipeline=sfumato.load())
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c


def test_random_requests_never_get_a_500(client):
    rng = random.Random(20261207)
    seen, jobs, failures = {}, [], []
    for n in range(N_REQUESTS):
        method, path, body = _request(rng)
        if isinstance(body, bytes):
            r = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = client.request(method, path, content=json.dumps(body, allow_nan=True).encode(),
                               headers={"Content-Type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            failures.append((n, path, str(body)[:300], r.text[:300]))
        elif r.status_code == 202:
            jobs.append(r.json()["id"])
        if r.status_code >= 400:
            detail = r.json()
            assert set(detail) == {"error", "field", "detail"}, detail
    deadline = time.monotonic() + 120
    for job_id in jobs:
        while True:
            status = client.get(f"/v1/jobs/{job_id}").json()
            if status.get("status") in ("done", "failed", "cancelled", "interrupted") or "error" in status \
                    and status.get("status") is None:
                break
            assert time.monotonic() < deadline, "a job never finished"
            time.sleep(0.05)
        if status.get("status") == "failed" and status["error"]["error"] == "internal_error":
            failures.append(("job", job_id, status["error"]))
    assert not failures, "\n".join(map(str, failures))
    assert sum(v for k, v in seen.items() if k == 200) >= 10, seen       # valid requests were among them
    assert sum(v for k, v in seen.items() if 400 <= k < 500) >= 150, seen
    r = client.post("/sdapi/v1/txt2img", json=GOOD)
    assert r.status_code == 200 and len(r.json()["images"]) == 1
