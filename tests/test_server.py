"""The server under load and at its edges: 50 jobs from 5 concurrent clients, a full queue, cancels
of queued and running jobs, the worker surviving failures, and A1111's response shapes."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import sfumato
from sfumato.server.app import ServerConfig, create_app

SMALL = {"prompt": "a red circle on a blue background", "steps": 1, "width": 64, "height": 64}
LONG = {**SMALL, "steps": 150, "batch_size": 4}      # seconds on a CPU: long enough to catch running


@pytest.fixture(scope="module")
def pipe():
    return sfumato.load()


@pytest.fixture(scope="module")
def client(pipe):
    app = create_app(ServerConfig(max_queue=3), pipeline=pipe)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def wait_for(client, job_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job["status"]
        time.sleep(0.02)


def wait_running(client, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["step"] >= 1:
            return job
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job["status"]
        time.sleep(0.02)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_fifty_jobs_from_five_clients_all_complete(pipe):
    app = create_app(ServerConfig(max_queue=64), pipeline=pipe)
    results: dict[int, int] = {}
    errors: list[str] = []

    def client_loop(c: TestClient, k: int) -> None:
        try:
            pending = {}
            for i in range(10):
                seed = 1000 + 10 * k + i
                body = {**SMALL, "seed": seed, "steps": 1 + i % 2}
                if i % 2:                             # half through the job API, half through A1111's
                    r = c.post("/v1/jobs", json={"mode": "txt2img", **body})
                    assert r.status_code == 202, r.text
                    pending[r.json()["id"]] = seed
                else:
                    r = c.post("/sdapi/v1/txt2img", json=body)
                    assert r.status_code == 200, r.text
                    results[seed] = json.loads(r.json()["info"])["all_seeds"][0]
            for job_id, seed in pending.items():
                job = wait_for(c, job_id, ("done", "failed", "cancelled"))
                assert job["status"] == "done", job
                assert len(job["result"]["images"]) == 1
                results[seed] = json.loads(job["result"]["info"])["all_seeds"][0]
        except Exception as e:  # noqa: BLE001 — reported below, from the main thread
            errors.append(repr(e))

    with TestClient(app, base_url="http://127.0.0.1") as c:
        threads = [threading.Thread(target=client_loop, args=(c, k)) for k in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors
    assert len(results) == 50 and all(seed == got for seed, got in results.items())   # none lost or mixed up


def test_a_full_queue_answers_429_and_cancels_work(client):
    running = client.post("/v1/jobs", json={"mode": "txt2img", **LONG}).json()["id"]
    wait_running(client, running)
    queued = [client.post("/v1/jobs", json={"mode": "txt2img", **SMALL, "seed": i}) for i in range(3)]
    assert [r.status_code for r in queued] == [202, 202, 202]
    assert [r.json()["position"] for r in queued] == [0, 1, 2]
    r = client.post("/v1/jobs", json={"mode": "txt2img", **SMALL})
    assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"] == "queue_full"
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 429

    middle = queued[1].json()["id"]
    assert client.delete(f"/v1/jobs/{middle}").json()["status"] == "cancelled"        # a queued job
    assert client.get(f"/v1/jobs/{queued[2].json()['id']}").json()["position"] == 1
    assert client.delete(f"/v1/jobs/{middle}").status_code == 409
    r = client.delete(f"/v1/jobs/{running}")                                          # a running job
    assert r.status_code == 200
    job = wait_for(client, running, ("cancelled", "done"), timeout=10)
    assert job["status"] == "cancelled" and job["result"] is None
    for r in (queued[0], queued[2]):                                                   # the rest go on
        assert wait_for(client, r.json()["id"], ("done",))["result"]["images"]
    assert client.delete("/v1/jobs/" + "0" * 32).status_code == 404


def test_a1111_interrupt_never_stops_a_job_api_job(client):
    job_id = client.post("/v1/jobs", json={"mode": "txt2img", **SMALL, "steps": 25}).json()["id"]
    wait_running(client, job_id)
    assert client.post("/sdapi/v1/interrupt").json() == {}
    assert client.post("/sdapi/v1/skip").json() == {}
    job = wait_for(client, job_id, ("done", "interrupted", "cancelled"))
    assert job["status"] == "done" and job["progress"]["step"] == 25


def test_progress_events_stream_until_the_result(client):
    job_id = client.post("/v1/jobs", json={"mode": "txt2img", **SMALL, "steps": 6}).json()["id"]
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    assert events[-1][0] == "end" and events[-1][1]["status"] == "done"
    assert len(events[-1][1]["result"]["images"]) == 1
    steps = [data["progress"]["step"] for name, data in events if name == "progress" and data["status"] == "running"]
    assert steps == sorted(steps) and steps[-1] >= 1


@pytest.mark.parametrize("error", [MemoryError("no memory"), torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("/secret/path/model.safetensors is broken")])
def test_the_worker_survives_failing_jobs(client, pipe, monkeypatch, error):
    real_run = pipe.run

    def failing_run(p, *args, **kwargs):
        if p.prompt == "fail":
            raise error
        return real_run(p, *args, **kwargs)

    monkeypatch.setattr(pipe, "run", failing_run)
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "fail"})
    oom = type(error) is not RuntimeError
    assert r.status_code == (507 if oom else 500)
    assert r.json()["error"] == ("out_of_memory" if oom else "internal_error")
    assert "/secret" not in r.text
    job_id = client.post("/v1/jobs", json={"mode": "txt2img", **SMALL, "prompt": "fail"}).json()["id"]
    assert wait_for(client, job_id, ("failed",))["error"]["error"] == ("out_of_memory" if oom else "internal_error")
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200


# A1111's request fields (StableDiffusionProcessingTxt2Img/Img2Img and the API's additions)
A1111_COMMON = {"prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
                "seed_resize_from_w", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps",
                "cfg_scale", "width", "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid",
                "eta", "denoising_strength", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise",
                "override_settings", "override_settings_restore_afterwards", "refiner_checkpoint",
                "refiner_switch_at", "disable_extra_networks", "comments", "script_name", "script_args",
                "send_images", "save_images", "alwayson_scripts"}
A1111_TXT2IMG = {"enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
                 "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
                 "hr_scheduler", "hr_prompt", "hr_negative_prompt"}
A1111_IMG2IMG = {"init_images", "resize_mode", "image_cfg_scale", "mask", "mask_blur_x", "mask_blur_y", "mask_blur",
                 "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
                 "initial_noise_multiplier", "latent_mask"}
A1111_INFO = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
              "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
              "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
              "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
              "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
              "is_using_inpainting_conditioning", "version"}


def test_txt2img_response_shape(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 7, "batch_size": 2, "n_iter": 2,
                                               "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert A1111_COMMON | A1111_TXT2IMG <= set(body["parameters"])
    assert body["parameters"]["n_iter"] == 2 and body["parameters"]["sampler_name"] == "DPM++ 2M"
    assert isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert A1111_INFO <= set(info)
    assert info["all_seeds"] == [7, 8, 9, 10] and len(info["infotexts"]) == 4     # image i gets seed + i
    assert info["sampler_name"] == "DPM++ 2M"
    images = [decode(b) for b in body["images"]]
    assert [im.format for im in images] == ["PNG"] * 4 and images[0].size == (64, 64)
    assert [im.info["parameters"] for im in images] == info["infotexts"]
    assert "Seed: 9" in info["infotexts"][2] and "Schedule type: Karras" in info["infotexts"][2]  # as asked
    # the second iteration's first image is the one a request for seed 9 gives
    alone = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 9, "sampler_name": "DPM++ 2M"}).json()
    assert np.array_equal(np.asarray(decode(alone["images"][0])), np.asarray(images[2]))

    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "send_images": False})
    assert r.json()["images"] == [] and json.loads(r.json()["info"])["all_seeds"]
    hires = client.post("/sdapi/v1/txt2img",
                        json={**SMALL, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5})
    assert decode(hires.json()["images"][0]).size == (128, 128)
    assert "Hires upscale: 2" in json.loads(hires.json()["info"])["infotexts"][0]


def test_img2img_and_outpaint_response_shape(client):
    init = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 3}).json()["images"][0]
    body = {**SMALL, "init_images": [init], "denoising_strength": 0.5}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200
    assert A1111_COMMON | A1111_IMG2IMG <= set(r.json()["parameters"])
    assert r.json()["parameters"]["init_images"] is None
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
    r = client.post("/sdapi/v1/img2img", json={**body, "include_init_images": True})
    assert r.json()["parameters"]["init_images"] == [init]
    job_id = client.post("/v1/jobs", json={"mode": "img2img", **{k: v for k, v in body.items() if k != "width"},
                                           "outpaint_left": 16}).json()["id"]
    job = wait_for(client, job_id, ("done", "failed"))
    out = decode(job["result"]["images"][0])
    assert out.size == (80, 64)


def test_other_a1111_endpoints(client):
    idle = client.get("/sdapi/v1/progress").json()
    assert set(idle) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert {"job_count", "sampling_step", "sampling_steps", "interrupted", "skipped"} <= set(idle["state"])
    samplers = client.get("/sdapi/v1/samplers").json()
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    scheduler = client.get("/sdapi/v1/schedulers").json()[0]
    assert set(scheduler) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    model = client.get("/sdapi/v1/sd-models").json()[0]
    assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert model["title"] == f"{model['filename']} [{model['hash']}]" and model["sha256"].startswith(model["hash"])
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == model["title"]
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.get("/sdapi/v1/loras").json() == [] and client.get("/sdapi/v1/sd-vae").json() == []
    assert client.post("/sdapi/v1/refresh-checkpoints").json() is None
    memory = client.get("/sdapi/v1/memory").json()
    assert set(memory) == {"ram", "cuda"} and memory["ram"]["total"] > 0
    assert client.get("/openapi.json").json()["paths"]["/sdapi/v1/txt2img"]


def test_interrupting_a_job_keeps_the_images_it_made(client):
    """POST /v1/jobs/{id}/interrupt (the web UI's Interrupt): the finished iterations and the current
    one's latest image come back, as A1111's Interrupt keeps them; DELETE still cancels outright."""
    body = {**SMALL, "mode": "txt2img", "steps": 150, "n_iter": 4, "seed": 3}
    job = client.post("/v1/jobs", json=body).json()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = client.post(f"/v1/jobs/{job['id']}/interrupt")
    assert r.status_code == 200, r.text
    done = wait_for(client, job["id"], ("interrupted",))
    assert 1 <= len(done["result"]["images"]) < 4
    assert client.post(f"/v1/jobs/{job['id']}/interrupt").status_code == 409
