"""Segment Anything against the reference: the ``segment-anything`` package's ``SamPredictor`` on the
same random weights (a small ViT with windowed and global blocks, SAM's prompt encoder and mask
decoder at a reduced width), from the published checkpoint layout and from a transformers
``SamModel`` folder. Same masks (IoU ≥ 0.99) and scores (≤ 1e-4); the full-size layouts of ViT-B/L/H
load from their shapes alone."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from reference import randomize_
from sfumato.checkpoint.io import save_file
from sfumato.checkpoint.sam import load_sam, sam_config_from_state
from sfumato.cli import main
from sfumato.errors import CheckpointError
from sfumato.models.sam import SAM_PRESETS
from sfumato.pipeline.params import ParamError
from sfumato.pipeline.segment import Segmenter

TINY = dict(width=64, depth=4, heads=4, global_blocks=(1, 3), image_size=256, window=6, prompt_dim=32,
            mask_in_chans=8, decoder_mlp=64, decoder_heads=8, iou_hidden=32)   # 8 heads: as published (not in the shapes)


def reference_sam(seed: int = 0):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    t = TINY
    grid = t["image_size"] // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=t["depth"], embed_dim=t["width"], img_size=t["image_size"], mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=t["heads"],
                                      patch_size=16, qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=t["global_blocks"], window_size=t["window"],
                                      out_chans=t["prompt_dim"]),
        prompt_encoder=PromptEncoder(embed_dim=t["prompt_dim"], image_embedding_size=(grid, grid),
                                     input_image_size=(t["image_size"], t["image_size"]),
                                     mask_in_chans=t["mask_in_chans"]),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=t["prompt_dim"],
                                                               mlp_dim=t["decoder_mlp"], num_heads=t["decoder_heads"]),
                                 transformer_dim=t["prompt_dim"], iou_head_depth=3, iou_head_hidden_dim=t["iou_hidden"]),
    )
    randomize_(sam, seed)
    with torch.no_grad():   # LayerNorm2d gains near 1 keep the random net's logits well scaled
        for name, p in sam.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.mul_(0.1)
    return sam.eval()


def scene(seed: int, size=(200, 150)) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1] // 10, size[0] // 10, 3)).astype(np.uint8)
    return Image.fromarray(a).resize(size, Image.BICUBIC)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam")
    ref = reference_sam()
    torch.save(ref.state_dict(), root / "sam_tiny.pth")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, root / "sam_tiny.safetensors")
    return dict(root=root, ref=ref, pth=root / "sam_tiny.pth", st=root / "sam_tiny.safetensors")


PROMPTS = [
    dict(points=[(60, 40, 1)]),
    dict(points=[(60, 40, 1), (150, 100, 0)]),
    dict(box=(20, 10, 120, 90)),
    dict(points=[(70, 50, 1)], box=(20, 10, 120, 90)),
]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


@pytest.mark.parametrize("source", ["pth", "st"])
@pytest.mark.parametrize("multimask", [True, False])
def test_masks_and_scores_equal_the_reference_predictor(world, source, multimask):
    from segment_anything import SamPredictor

    predictor = SamPredictor(world["ref"])
    ours = Segmenter(load_sam(world[source]))
    for k, image in enumerate((scene(1), scene(2, (160, 200)))):
        predictor.set_image(np.asarray(image))
        ours.set_image(image)
        assert torch.allclose(ours.embedding, predictor.features, atol=1e-5, rtol=1e-4)
        for prompt in PROMPTS:
            pts = prompt.get("points")
            ref_masks, ref_scores, ref_logits = predictor.predict(
                point_coords=np.array([p[:2] for p in pts], dtype=float) if pts else None,
                point_labels=np.array([p[2] for p in pts]) if pts else None,
                box=np.array(prompt["box"]) if "box" in prompt else None, multimask_output=multimask)
            got = ours.predict(pts, prompt.get("box"), multimask=multimask)
            assert got.masks.shape == ref_masks.shape
            assert np.abs(got.scores - ref_scores).max() <= 1e-4, (k, prompt)
            ious = [_iou(a, b) for a, b in zip(got.masks, ref_masks)]
            assert min(ious) >= 0.99, (k, prompt, ious)
            assert 0.01 < ref_masks.mean() < 0.99   # a mask, not an empty or full frame
            # a mask prompt (the previous low-res logits) as the reference takes it
            again = ours.predict(pts, prompt.get("box"), mask_logits=got.logits[int(got.scores.argmax())],
                                 multimask=False)
            ref_again = predictor.predict(
                point_coords=np.array([p[:2] for p in pts], dtype=float) if pts else None,
                point_labels=np.array([p[2] for p in pts]) if pts else None,
                box=np.array(prompt["box"]) if "box" in prompt else None,
                mask_input=ref_logits[int(ref_scores.argmax())][None], multimask_output=False)
            assert np.abs(again.scores - ref_again[1]).max() <= 1e-4


def test_transformers_folder_equals_the_original_layout(world, tmp_path):
    """A transformers SamModel with the same weights (its own conversion of the original keys) loads to
    the same model."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    t = TINY
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=t["width"], num_hidden_layers=t["depth"], num_attention_heads=t["heads"],
                                      output_channels=t["prompt_dim"], image_size=t["image_size"], patch_size=16,
                                      window_size=t["window"], global_attn_indexes=list(t["global_blocks"]),
                                      mlp_dim=4 * t["width"], num_pos_feats=t["prompt_dim"] // 2),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=t["prompt_dim"], image_size=t["image_size"],
                                                     patch_size=16, mask_input_channels=t["mask_in_chans"]),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=t["prompt_dim"], num_hidden_layers=2,
                                                 num_attention_heads=t["decoder_heads"], mlp_dim=t["decoder_mlp"],
                                                 iou_head_hidden_dim=t["iou_hidden"]))
    hf = SamModel(config)
    ours = load_sam(world["st"])
    from sfumato.checkpoint.sam import hf_sam_to_ours

    # write our weights into the HF model key by key through our map, then load its folder back
    renamed = hf_sam_to_ours(dict(hf.state_dict()))
    assert set(renamed) == set(ours.state_dict()), sorted(set(renamed) ^ set(ours.state_dict()))[:5]
    keys = list(hf.state_dict())
    ours_sd = ours.state_dict()
    tagged = hf_sam_to_ours({k: torch.tensor(i) for i, k in enumerate(keys)})
    new = {keys[int(tag)]: ours_sd[our_key] for our_key, tag in tagged.items()}
    new["prompt_encoder.shared_embedding.positional_embedding"] = \
        ours_sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    hf.load_state_dict(new)
    hf.save_pretrained(tmp_path / "hf-sam")
    again = load_sam(tmp_path / "hf-sam")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    seg = Segmenter(again)
    seg.set_image(scene(3))
    got = seg.predict([(50, 50, 1)])
    ref = Segmenter(ours)
    ref.set_image(scene(3))
    assert np.array_equal(got.masks, ref.predict([(50, 50, 1)]).masks)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_full_size_layouts_are_read_from_their_shapes(name):
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ref = sam_model_registry[name]()
    cfg = sam_config_from_state(ref.state_dict())
    assert cfg == SAM_PRESETS[name]
    from sfumato.models.sam import SAM

    with torch.device("meta"):
        ours = SAM(cfg)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_bad_input_names_the_field(world, tmp_path, capsys):
    seg = Segmenter(load_sam(world["st"]))
    seg.set_image(scene(1))
    with pytest.raises(ParamError, match=r"points\[0\].*outside"):
        seg.predict([(250, 10, 1)])
    with pytest.raises(ParamError, match="box"):
        seg.predict(box=(50, 50, 40, 60))
    with pytest.raises(ParamError, match="points"):
        seg.predict()
    save_file({"x": torch.zeros(3)}, tmp_path / "not-sam.safetensors")
    with pytest.raises(CheckpointError, match="Segment Anything"):
        load_sam(tmp_path / "not-sam.safetensors")
    image = tmp_path / "x.png"
    scene(1).save(image)
    out = tmp_path / "m.png"
    assert main(["segment", "--image", str(image), "--point", "60,40", "--point", "150,100:neg",
                 "--sam", str(world["pth"]), "-o", str(out)]) == 0
    from segment_anything import SamPredictor

    predictor = SamPredictor(world["ref"])
    predictor.set_image(np.asarray(scene(1)))
    masks, scores, _ = predictor.predict(point_coords=np.array([[60.0, 40.0], [150.0, 100.0]]),
                                         point_labels=np.array([1, 0]))
    written = np.asarray(Image.open(out)) > 127
    assert _iou(written, masks[int(scores.argmax())]) >= 0.99
    capsys.readouterr()
    for args, field in ((["--point", "500,10"], "points[0]"), (["--point", "1,2,3"], "--point"),
                        (["--box", "5,5,1"], "--box"), ([], "--point")):
        code = main(["segment", "--image", str(image), "--sam", str(world["st"]), "-o", str(out), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and field in err and len(err.splitlines()) == 1, err


# -- the A1111 Segment Anything extension's API ------------------------------------------------------

@pytest.fixture(scope="module")
def server(world):
    import shutil

    from conftest import live_server
    from sfumato.server.app import ServerConfig, create_app

    models = world["root"] / "models"
    (models / "sam").mkdir(parents=True)
    shutil.copy(world["pth"], models / "sam" / "sam_tiny.pth")
    with live_server(create_app(ServerConfig(models_dir=models, watermark=False, dtype="fp32"))) as port:
        yield f"http://127.0.0.1:{port}"


def _b64(image: Image.Image) -> str:
    import base64
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def _unb64(text: str) -> Image.Image:
    import base64
    import io

    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_sam_predict_equals_the_library(server, world):
    import requests

    assert requests.get(f"{server}/sam/heartbeat", timeout=30).json() == {"msg": "Success!"}
    assert requests.get(f"{server}/sam/sam-model", timeout=30).json() == ["sam_tiny.pth"]
    image = scene(4)
    r = requests.post(f"{server}/sam/sam-predict", timeout=60, json=dict(
        sam_model_name="sam_tiny.pth", input_image=_b64(image), sam_positive_points=[[60, 40]],
        sam_negative_points=[[150, 100]]))
    assert r.status_code == 200, r.text
    body = r.json()
    seg = Segmenter(load_sam(world["pth"]))
    seg.set_image(image)
    want = seg.predict([(60, 40, 1), (150, 100, 0)])
    assert len(body["masks"]) == 3 and np.allclose(body["scores"], want.scores, atol=1e-5)
    for k in range(3):
        assert np.array_equal(np.asarray(_unb64(body["masks"][k])) > 127, want.masks[k])
        masked = np.asarray(_unb64(body["masked_images"][k]))
        assert masked.shape[-1] == 4 and np.array_equal(masked[..., 3] > 0, want.masks[k])
    blended = np.asarray(_unb64(body["blended_images"][0]).convert("RGB"))
    outside = ~want.masks[0]
    assert np.array_equal(blended[outside], np.asarray(image)[outside])


@pytest.mark.parametrize("extra, field", [
    (dict(sam_positive_points=[[500, 10]]), "sam_positive_points[0]"),
    (dict(sam_positive_points=[[5, 5]], sam_negative_points=[[1, 2, 3]]), "sam_negative_points[0]"),
    (dict(sam_positive_points=[]), "sam_positive_points"),
    (dict(sam_positive_points=[[5, 5]], dino_enabled=True), "dino_enabled"),
    (dict(sam_positive_points=[[5, 5]], sam_model_name="../sam_tiny.pth"), "sam_model_name"),
    (dict(sam_positive_points=[[5, 5]], sam_model_name="missing.pth"), "sam_model_name"),
    (dict(sam_box=[50, 50, 10, 10]), "sam_box"),
])
def test_sam_predict_bad_input_is_422(server, extra, field):
    import requests

    body = {"sam_model_name": "sam_tiny.pth", "input_image": _b64(scene(4)), **extra}
    r = requests.post(f"{server}/sam/sam-predict", json=body, timeout=60)
    assert r.status_code == 422 and field in r.text, r.text


@pytest.mark.parametrize("amount", [1, 4, 7])
def test_dilate_mask_equals_opencv(server, amount):
    import cv2
    import requests

    rng = np.random.default_rng(amount)
    mask = np.zeros((60, 80), np.uint8)
    mask[rng.integers(0, 60, 12), rng.integers(0, 80, 12)] = 255
    mask[20:30, 30:45] = 255
    image = scene(5, (80, 60))
    r = requests.post(f"{server}/sam/dilate-mask", timeout=60,
                      json=dict(input_image=_b64(image), mask=_b64(Image.fromarray(mask)), dilate_amount=amount))
    assert r.status_code == 200, r.text
    want = cv2.dilate(mask, np.ones((amount, amount), np.uint8)) > 127
    assert np.array_equal(np.asarray(_unb64(r.json()["mask"])) > 127, want)


def test_inpaint_anything_from_the_command_line(world, tmp_path, capsys):
    """``inpaint --sam``: the mask is the best Segment Anything mask of the point, grown; the image equals
    the library's inpainting with that mask."""
    from sfumato.api import load
    from sfumato.pipeline.masks import dilate

    init = scene(6, (64, 64))
    src = tmp_path / "init.png"
    init.save(src)
    out = tmp_path / "out.png"
    args = ["inpaint", "a red circle on a blue background", "--init-image", str(src), "--sam", str(world["st"]),
            "--sam-point", "30,30", "--sam-grow", "3", "--steps", "3", "--seed", "2", "--no-watermark", "-o", str(out)]
    assert main(args) == 0
    seg = Segmenter(load_sam(world["st"]))
    seg.set_image(init)
    mask = dilate(seg.predict([(30, 30, 1)]).best, 3)
    assert 0 < mask.mean() < 1
    want = load(None, dtype=None, device="cpu").inpaint("a red circle on a blue background", init,
                                                        Image.fromarray((mask * 255).astype(np.uint8)), steps=3,
                                                        seed=2, watermark=False)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))
    capsys.readouterr()
    for extra in (["--sam-point", "99,5"], [], ["--mask", str(src)]):
        base = [a for a in args if a not in ("--sam-point", "30,30")]
        code = main(base + extra)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err


def test_inpaint_anything_remove_from_the_command_line(world, tmp_path):
    """``inpaint --remove``: no prompt needed; the object's mask is filled from its surroundings (masked
    content "fill") and repainted, as the library's inpainting with those settings."""
    from sfumato.api import load
    from sfumato.pipeline.masks import dilate

    init = scene(7, (64, 64))
    src = tmp_path / "init.png"
    init.save(src)
    out = tmp_path / "out.png"
    assert main(["inpaint", "--init-image", str(src), "--sam", str(world["st"]), "--sam-point", "30,30", "--remove",
                 "--steps", "3", "--seed", "4", "--no-watermark", "-o", str(out)]) == 0
    seg = Segmenter(load_sam(world["st"]))
    seg.set_image(init)
    mask = Image.fromarray((dilate(seg.predict([(30, 30, 1)]).best, 8) * 255).astype(np.uint8))
    pipe = load(None, dtype=None, device="cpu")
    want = pipe.inpaint("", init, mask, masked_content="fill", steps=3, seed=4, watermark=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    original = pipe.inpaint("", init, mask, steps=3, seed=4, watermark=False).images[0]
    assert not np.array_equal(np.asarray(original), np.asarray(want))   # the fill is what differs
    assert main(["inpaint", "--init-image", str(src), "--sam", str(world["st"]), "--sam-point", "30,30", "--remove",
                 "--masked-content", "original", "-o", str(out)]) == 2


def test_inpaint_anything_in_one_api_call(server, world):
    """img2img with ``sam_model_name`` and points: the mask is Segment Anything's best, grown by
    ``sam_dilation``; the image equals the same request with that mask sent by hand."""
    import requests

    from sfumato.pipeline.masks import dilate

    init = scene(8, (64, 64))
    base = dict(prompt="a red circle on a blue background", init_images=[_b64(init)], steps=3, seed=5,
                denoising_strength=0.8, inpainting_fill=0, width=64, height=64)
    r = requests.post(f"{server}/sdapi/v1/img2img", timeout=120, json=dict(
        base, sam_model_name="sam_tiny.pth", sam_positive_points=[[30, 30]], sam_dilation=4))
    assert r.status_code == 200, r.text
    seg = Segmenter(load_sam(world["pth"]))
    seg.set_image(init)
    mask = Image.fromarray((dilate(seg.predict([(30, 30, 1)]).best, 4) * 255).astype(np.uint8))
    by_hand = requests.post(f"{server}/sdapi/v1/img2img", timeout=120, json=dict(base, mask=_b64(mask)))
    assert by_hand.status_code == 200, by_hand.text
    assert np.array_equal(np.asarray(_unb64(r.json()["images"][0])), np.asarray(_unb64(by_hand.json()["images"][0])))
    for extra, field in ((dict(sam_model_name="sam_tiny.pth", sam_positive_points=[[500, 5]]), "sam_positive_points[0]"),
                         (dict(sam_model_name="sam_tiny.pth", sam_positive_points=[[5, 5]], mask=_b64(mask)), "mask"),
                         (dict(sam_positive_points=[[5, 5]]), "sam_model_name"),
                         (dict(sam_model_name="missing.pth", sam_positive_points=[[5, 5]]), "sam_model_name"),
                         (dict(sam_model_name="sam_tiny.pth"), "sam_positive_points"),
                         (dict(sam_model_name="sam_tiny.pth", sam_positive_points=[[5, 5]], sam_dilation=-1),
                          "sam_dilation")):
        r = requests.post(f"{server}/sdapi/v1/img2img", timeout=60, json=dict(base, **extra))
        assert r.status_code == 422 and r.json()["field"] == field, (extra, r.text)


def test_detail_pass_refines_boxes_with_sam(world):
    """A detail pass's boxes given a SAM file become the objects' masks (the box as the prompt,
    the single-mask output) instead of rectangles."""
    from sfumato.pipeline.detail import DetailSpec, region_masks

    image = scene(9, (96, 64))
    masks = region_masks(DetailSpec("box", boxes=[(10, 8, 50, 40)], sam=world["st"], dilate=0), image)
    seg = Segmenter(load_sam(world["st"]))
    seg.set_image(image)
    want = seg.predict([], (10, 8, 50, 40), multimask=False).best
    assert want.any() and len(masks) == 1 and np.array_equal(masks[0], want)
    rect = region_masks(DetailSpec("box", boxes=[(10, 8, 50, 40)], dilate=0), image)[0]
    assert rect.sum() == 40 * 32 and not np.array_equal(rect, want)


def test_the_shapes_world_sam_trains_and_loads(tmp_path):
    """``sfumato train sam`` (2 steps here): a file ``load_sam`` reads back at the demonstration's
    configuration, the true masks are the objects' own pixels, and ``eval sam`` scores it."""
    from sfumato.train.loop import LoopConfig
    from sfumato.train.sam import SHAPES_SAM, SamRecipe, evaluate_sam, object_mask, train_sam
    from sfumato.train.shapes import Obj, Scene

    scene = Scene((Obj("square", "red", 0.25, 0.5, 0.25), Obj("circle", "blue", 0.75, 0.5, 0.25)), "white")
    left = object_mask(scene, 0)
    assert left.sum() == 16 * 16 and not left[:, 32:].any()
    path = train_sam(SamRecipe(loop=LoopConfig(steps=2, batch_size=4, lr=1e-3, progress=False)), tmp_path)
    model = load_sam(path)
    assert model.cfg == SHAPES_SAM
    report = evaluate_sam(path, n=3)
    assert report["n"] == 3 and 0 <= report["mean_iou"] <= 1
