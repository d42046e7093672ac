"""Annotators and poses over HTTP: annotator modules are listed when their file is in the models
folder's ``annotators/`` (and refused by name when not), a ControlNet unit with one gives the command
line's image, ``/controlnet/detect`` returns the map (and OpenPose's ``poses``), and
``/v1/pose/render`` draws a pose JSON exactly as ``sfumato pose render``."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from conftest import live_server
from golden_world import build, image
from sfumato.cli import main
from sfumato.models.hed import HEDNet
from sfumato.models.openpose import BodyPoseNet, KeypointNet
from sfumato.pipeline.annotate import hed_edges
from sfumato.pipeline.pose import Pose, default_person, pose_json, render_pose
from sfumato.server.app import ServerConfig, create_app


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    files = build(tmp_path_factory.mktemp("annot-api") / "world")
    models = files["sd"].parent / "models"
    (models / "ControlNet").mkdir(parents=True)
    (models / "annotators" / "openpose").mkdir(parents=True)
    shutil.copy(files["sd"], models / "tiny.safetensors")
    shutil.copy(files["control0"], models / "ControlNet" / "control_tiny.safetensors")
    torch.manual_seed(0)
    hed = HEDNet().eval()
    with torch.no_grad():
        for p in hed.parameters():
            p.mul_(0.5)
    torch.save(hed.state_dict(), models / "annotators" / "ControlNetHED.pth")
    body = BodyPoseNet()
    with torch.no_grad():   # all zero: no keypoint clears the threshold, so no people (and no slow search)
        for p in body.parameters():
            p.zero_()
    torch.save(body.state_dict(), models / "annotators" / "openpose" / "body_pose_model.pth")
    hand = KeypointNet(22)   # the hand model beside it (no face model): openpose_hand is offered, _face is not
    torch.save(hand.state_dict(), models / "annotators" / "hand_pose_model.pth")
    app = create_app(ServerConfig(models_dir=models, model=models / "tiny.safetensors", watermark=False))
    with live_server(app) as port:
        yield files, models, hed, webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=3)


def _decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def test_modules_listed_by_their_files(world):
    *_, api = world
    modules = api.controlnet_module_list()
    assert {"openpose", "openpose_hand", "softedge_hed", "softedge_hedsafe", "scribble_hed", "hed"} <= set(modules)
    assert not {"lineart_realistic", "depth_midas", "depth", "openpose_face", "openpose_full"} & set(modules)


def test_detect_hed_and_openpose(world):
    *_, hed, api = world
    picture = image(3, (64, 96))
    r = api.session.post(f"{api.baseurl.rsplit('/sdapi', 1)[0]}/controlnet/detect", json={
        "controlnet_module": "softedge_hed", "controlnet_input_images": [_b64(picture)], "controlnet_processor_res": 64})
    assert r.status_code == 200, r.text
    assert np.array_equal(_decode(r.json()["images"][0]), hed_edges(hed, picture))
    assert "poses" not in r.json()
    r = api.session.post(f"{api.baseurl.rsplit('/sdapi', 1)[0]}/controlnet/detect", json={
        "controlnet_module": "openpose", "controlnet_input_images": [_b64(picture)], "controlnet_processor_res": 64})
    assert r.status_code == 200, r.text
    assert r.json()["poses"] == [{"people": [], "canvas_width": 64, "canvas_height": 96}]
    assert not _decode(r.json()["images"][0]).any()
    r = api.session.post(f"{api.baseurl.rsplit('/sdapi', 1)[0]}/controlnet/detect", json={
        "controlnet_module": "openpose_hand", "controlnet_input_images": [_b64(picture)], "controlnet_processor_res": 64})
    assert r.status_code == 200, r.text
    assert r.json()["poses"] == [{"people": [], "canvas_width": 64, "canvas_height": 96}]
    r = api.session.post(f"{api.baseurl.rsplit('/sdapi', 1)[0]}/controlnet/detect", json={
        "controlnet_module": "openpose_full", "controlnet_input_images": [_b64(picture)]})
    assert r.status_code == 422 and r.json()["field"] == "controlnet_module"
    assert "body_pose_model and hand_pose_model and facenet" in r.text
    r = api.session.post(f"{api.baseurl.rsplit('/sdapi', 1)[0]}/controlnet/detect", json={
        "controlnet_module": "lineart_realistic", "controlnet_input_images": [_b64(picture)]})
    assert r.status_code == 422 and r.json()["field"] == "controlnet_module"
    assert "sk_model (.pth" in r.text and "annotators/" in r.text


def _b64(im: Image.Image) -> str:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_an_annotator_unit_gives_the_command_lines_image(world, tmp_path):
    files, models, _, api = world
    control = image(4, (64, 64))
    control.save(tmp_path / "control.png")
    unit = webuiapi.ControlNetUnit(image=control, module="softedge_hed", model=api.controlnet_model_list()[0],
                                   weight=0.9, resize_mode="Just Resize")
    served = api.txt2img(prompt="a red circle", seed=4, width=64, height=64, controlnet_units=[unit]).image
    assert 'ControlNet 0: "Module: softedge_hed, Model: control_tiny, Weight: 0.9' in served.info["parameters"]
    out = tmp_path / "cli.png"
    assert main(["txt2img", "a red circle", "--model", str(models / "tiny.safetensors"), "--seed", "4", "--steps", "3",
                 "--sampler", "Euler", "--no-watermark", "--control-model",
                 str(models / "ControlNet" / "control_tiny.safetensors"), "--control-image", str(tmp_path / "control.png"),
                 "--control-preprocessor", "softedge_hed", "--control-annotator",
                 str(models / "annotators" / "ControlNetHED.pth"), "--control-strength", "0.9", "-o", str(out)]) == 0
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(Image.open(out).convert("RGB")))
    r = api.session.post(f"{api.baseurl}/txt2img", json={
        "prompt": "x", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"ControlNet": {"args": [
            {"model": "control_tiny", "module": "depth", "image": _b64(control)}]}}})
    assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.ControlNet.args[0].module"
    assert "dpt_hybrid-midas-501f0c75 or dpt_large-midas-2f21e586" in r.text
    # a module of two networks (body and hand files): the unit runs them (no people here: a black map)
    r = api.session.post(f"{api.baseurl}/txt2img", json={
        "prompt": "x", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"ControlNet": {"args": [
            {"model": "control_tiny", "module": "openpose_hand", "image": _b64(control)}]}}})
    assert r.status_code == 200, r.text
    assert "Module: openpose_hand" in r.json()["info"]


def test_pose_render_route_matches_the_cli(world, tmp_path):
    *_, api = world
    root = api.baseurl.rsplit("/sdapi", 1)[0]
    pose = Pose(384, 512, (default_person(384, 512),))
    r = api.session.post(f"{root}/v1/pose/render", json={"pose": pose_json(pose)})
    assert r.status_code == 200, r.text
    (tmp_path / "pose.json").write_text(json.dumps(pose_json(pose)))
    assert main(["pose", "render", str(tmp_path / "pose.json"), "-o", str(tmp_path / "pose.png")]) == 0
    cli = np.asarray(Image.open(tmp_path / "pose.png").convert("RGB"))
    assert np.array_equal(_decode(r.json()["image"]), cli) and cli.any()
    assert np.array_equal(cli, render_pose(pose))
    r = api.session.post(f"{root}/v1/pose/render", json={"pose": "{broken"})
    assert r.status_code == 422 and r.json()["field"] == "pose"
    r = api.session.post(f"{root}/v1/pose/render", json={"pose": {"canvas_width": 64, "canvas_height": 64, "people": [
        {"pose_keypoints_2d": [1, 2, 1]}]}})
    assert r.status_code == 422 and r.json()["field"] == "pose.people[0].pose_keypoints_2d"
