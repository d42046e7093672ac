"""The detail pass (ADetailer): a YOLO-format ONNX detector through onnxruntime (letterbox, confidence,
non-maximum suppression, boxes back in the image's pixels), the mask steps in ADetailer's order, and a
pass on the bundled model equal to inpainting each region by hand; the CLI flag and the A1111
ADetailer extension's ``alwayson_scripts`` give the same image."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

import sfumato
from sfumato.cli import main
from sfumato.errors import ParamError
from sfumato.pipeline.detail import DetailSpec, region_masks, yolo_boxes

# YOLOv8 rows in the 64×64 input: cx, cy, w, h, then two class scores
DETECTIONS = [
    (20, 28, 16, 12, 0.9, 0.1),    # kept: → (12, 14, 28, 26) in a 64×48 image (8 px of letterbox above)
    (21, 28, 16, 12, 0.1, 0.8),    # the same object, lower score: suppressed (IoU > 0.7)
    (48, 40, 8, 8, 0.0, 0.2),      # below the confidence: dropped
    (44, 36, 20, 24, 0.6, 0.0),    # kept: → (34, 16, 54, 40)
]


def yolo_onnx(path, rows=DETECTIONS, size=64):
    """An ONNX graph with YOLOv8's interface whose output is ``rows`` whatever the image (plus 0 × its mean)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.array(rows, dtype=np.float32).T[None]          # (1, 4 + classes, N)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
         helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
         helper.make_node("Add", ["table", "nothing"], ["output0"])],
        "yolo", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(table.shape))],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_yolo_boxes_letterbox_confidence_and_nms(tmp_path):
    path = yolo_onnx(tmp_path / "face_yolov8n.onnx")
    image = Image.new("RGB", (64, 48), (90, 120, 200))
    boxes = yolo_boxes(path, image, confidence=0.3)
    assert np.allclose(boxes, [(12, 14, 28, 26), (34, 16, 54, 40)])
    assert np.allclose(yolo_boxes(path, image, confidence=0.7), [(12, 14, 28, 26)])
    # a 128×96 image: gain 0.5, so the same rows are twice as far apart
    assert np.allclose(yolo_boxes(path, image.resize((128, 96)), confidence=0.3), [(24, 28, 56, 52), (68, 32, 108, 80)])


def test_mask_steps_in_adetailers_order(tmp_path):
    path = yolo_onnx(tmp_path / "face_yolov8n.onnx")
    image = Image.new("RGB", (64, 48))
    plain = region_masks(DetailSpec(path, dilate=0), image)
    assert [m.sum() for m in plain] == [16 * 12, 20 * 24]
    assert plain[0][14:26, 12:28].all() and not plain[0][13, 12] and not plain[0][14, 28]
    largest = region_masks(DetailSpec(path, dilate=0, k_largest=1), image)
    assert len(largest) == 1 and largest[0].sum() == 20 * 24
    ratio = region_masks(DetailSpec(path, dilate=0, max_ratio=0.1), image)   # 192 / 3072 = 0.0625 kept, 0.156 not
    assert [m.sum() for m in ratio] == [192]
    grown = region_masks(DetailSpec(path, dilate=4), image)
    import cv2

    want = cv2.dilate(plain[0].astype(np.uint8), np.ones((4, 4), np.uint8)) > 0
    assert np.array_equal(grown[0], want)
    shrunk = region_masks(DetailSpec(path, dilate=-4), image)
    assert np.array_equal(shrunk[0], cv2.erode(plain[0].astype(np.uint8), np.ones((4, 4), np.uint8)) > 0)
    merged = region_masks(DetailSpec(path, dilate=0, merge="merge and invert"), image)
    assert len(merged) == 1 and np.array_equal(merged[0], ~(plain[0] | plain[1]))


@pytest.fixture(scope="module")
def pipe():
    return sfumato.load(None, dtype="fp32", device="cpu")


SETTINGS = dict(steps=3, seed=11, width=64, height=64, watermark=False)


def test_a_pass_equals_inpainting_each_region_by_hand(pipe):
    import cv2

    spec = DetailSpec("box", boxes=[(8, 8, 30, 30), (36, 30, 60, 58)], prompt="a blue square", strength=0.6)
    got = pipe.txt2img("a red circle on a green background", detail=[spec], **SETTINGS)
    image = pipe.txt2img("a red circle on a green background", **SETTINGS).images[0]
    for j, (x0, y0, x1, y1) in enumerate(spec.boxes):
        m = np.zeros((64, 64), np.uint8)
        m[y0:y1, x0:x1] = 1
        m = (cv2.dilate(m, np.ones((4, 4), np.uint8)) > 0).astype(np.uint8) * 255
        image = pipe.inpaint("a blue square", image, Image.fromarray(m), "", strength=0.6, only_masked=True,
                             only_masked_padding=32, mask_blur=4, steps=3, seed=11 + j, width=64, height=64,
                             watermark=False).images[0]
    assert np.array_equal(np.asarray(got.images[0]), np.asarray(image))
    plain = pipe.txt2img("a red circle on a green background", **SETTINGS).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(image))
    text = got.items[0].infotext
    assert "ADetailer model: box" in text and "ADetailer prompt: a blue square" in text
    assert "ADetailer denoising strength: 0.6" in text


@pytest.mark.parametrize("spec, field", [
    (DetailSpec("box"), "detail[0].boxes"),
    (DetailSpec("box", boxes=[(5, 5, 2, 9)]), "detail[0].boxes[0]"),
    (DetailSpec("mask"), "detail[0].mask"),
    (DetailSpec("mask", mask=Image.new("L", (64, 64))), "detail[0].mask"),
    (DetailSpec("face.pt"), "detail[0].detector"),
    (DetailSpec("missing.onnx"), "detail[0].detector"),
    (DetailSpec("box", boxes=[(1, 1, 9, 9)], strength=2), "detail[0].strength"),
    (DetailSpec("box", boxes=[(1, 1, 9, 9)], merge="all"), "detail[0].merge"),
    (DetailSpec("box", boxes=[(1, 1, 9, 9)], prompt="<lora:x:1> a face"), "detail[0].prompt"),
])
def test_bad_specs_name_the_field(pipe, spec, field):
    with pytest.raises(ParamError) as e:
        pipe.txt2img("x", detail=[spec], steps=1, width=64, height=64)
    assert e.value.field == field


def test_cli_detail_flag(pipe, tmp_path, capsys):
    out = tmp_path / "d.png"
    args = ["txt2img", "a red circle on a green background", "--steps", "3", "--seed", "11", "--dtype", "fp32",
            "--no-watermark", "-o", str(out)]
    assert main(args + ["--detail", "box=8,8,30,30;36,30,60,58:a blue square:0.6"]) == 0
    spec = DetailSpec("box", boxes=[(8, 8, 30, 30), (36, 30, 60, 58)], prompt="a blue square", strength=0.6)
    want = pipe.txt2img("a red circle on a green background", detail=[spec], **SETTINGS).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    capsys.readouterr()
    for bad, message in (("box=1,2,3:x:0.5", "--detail"), ("nothing.onnx:x:0.5", "detail[0].detector"),
                         ("box=1,1,9,9:x:1.5", "detail[0].strength")):
        assert main(args + ["--detail", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# -- the A1111 ADetailer extension's API ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import live_server
    from sfumato.server.app import ServerConfig, create_app

    models = tmp_path_factory.mktemp("adetailer") / "models"
    (models / "adetailer").mkdir(parents=True)
    yolo_onnx(models / "adetailer" / "face_yolov8n.onnx")
    with live_server(create_app(ServerConfig(models_dir=models, watermark=False, dtype="fp32"))) as port:
        yield f"http://127.0.0.1:{port}", models


def _unb64(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def test_adetailer_args_give_the_library_image(server, pipe):
    import requests

    url, models = server
    assert requests.get(f"{url}/adetailer/v1/ad_model", timeout=30).json() == {"ad_model": ["face_yolov8n.onnx"]}
    tab = {"ad_model": "face_yolov8n.onnx", "ad_prompt": "a blue square", "ad_denoising_strength": 0.5,
           "ad_confidence": 0.3, "ad_dilate_erode": 4, "ad_mask_blur": 4, "ad_inpaint_only_masked": True,
           "ad_inpaint_only_masked_padding": 32}
    body = {"prompt": "a red circle on a green background", "steps": 3, "seed": 11, "width": 64, "height": 64,
            "alwayson_scripts": {"ADetailer": {"args": [True, False, tab]}}}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    spec = DetailSpec(models / "adetailer" / "face_yolov8n.onnx", prompt="a blue square", strength=0.5)
    want = pipe.txt2img("a red circle on a green background", detail=[spec], **SETTINGS)
    assert np.array_equal(_unb64(r.json()["images"][0]), np.asarray(want.images[0]))
    assert "ADetailer model: face_yolov8n.onnx" in r.json()["info"]
    off = dict(body, alwayson_scripts={"ADetailer": {"args": [False, False, tab]}})
    plain = requests.post(f"{url}/sdapi/v1/txt2img", json=off, timeout=120).json()["images"][0]
    assert not np.array_equal(_unb64(plain), _unb64(r.json()["images"][0]))


@pytest.mark.parametrize("tab, field", [
    ({"ad_model": "hand_yolov8n.pt"}, "alwayson_scripts.ADetailer.args[1].ad_model"),
    ({"ad_model": "../face_yolov8n.onnx"}, "alwayson_scripts.ADetailer.args[1].ad_model"),
    ({"ad_model": "face_yolov8n.onnx", "ad_denoising_strength": 3}, "alwayson_scripts.ADetailer.args[1].ad_denoising_strength"),
    ({"ad_model": "face_yolov8n.onnx", "ad_x_offset": 5}, "alwayson_scripts.ADetailer.args[1].ad_x_offset"),
    ({"ad_model": "face_yolov8n.onnx", "ad_use_checkpoint": True}, "alwayson_scripts.ADetailer.args[1].ad_use_checkpoint"),
    ({"ad_model": "face_yolov8n.onnx", "ad_inpaint_only_masked": False},
     "alwayson_scripts.ADetailer.args[1].ad_inpaint_only_masked"),
])
def test_bad_adetailer_args_name_the_field(server, tab, field):
    import requests

    url, _ = server
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64,
            "alwayson_scripts": {"ADetailer": {"args": [True, tab]}}}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == field, r.text
