"""OpenPose hands and face against controlnet_aux 0.0.10 on the same random weights: the hand
(``hand_pose_model.pth``) and face (``facenet.pth``) networks, the hand and face boxes placed from a
body, the keypoint search in them, and the control images of ``openpose_hand`` / ``_face`` /
``_faceonly`` / ``_full`` (pixel-identical, through controlnet_aux's own detector call); hands and
faces in the pose JSON, drawn as ``draw_poses`` draws them on 20 random poses; the files told apart
by their keys and found in a folder, and what is missing named."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato.checkpoint.annotators import load_annotator
from sfumato.cli import main
from sfumato.errors import CheckpointError, ParamError
from sfumato.models.hed import HEDNet
from sfumato.models.openpose import BodyPoseNet, KeypointNet, OpenPoseNets
from sfumato.pipeline.annotate import ANNOTATORS, annotator_network, detect_poses
from sfumato.pipeline.pose import BODY_PARTS, parse_pose, pose_json, render_pose
from test_annotators import PEOPLE, FakePoseNet, photo, scaled_

warnings.filterwarnings("ignore", module="controlnet_aux")
warnings.filterwarnings("ignore", module="timm")


def reference_nets(hand: KeypointNet, face: KeypointNet):
    from controlnet_aux.open_pose import util
    from controlnet_aux.open_pose.face import Face, FaceNet
    from controlnet_aux.open_pose.hand import Hand
    from controlnet_aux.open_pose.model import handpose_model

    ref_hand = handpose_model().eval()
    ref_hand.load_state_dict(util.transfer(ref_hand, hand.state_dict()))   # the file's flat keys → its blocks
    ref_face = FaceNet().eval()
    ref_face.load_state_dict(face.state_dict())
    h, f = Hand.__new__(Hand), Face.__new__(Face)   # their constructors read a file; the weights are set here
    h.model, f.model = ref_hand, ref_face
    return h, f


@pytest.fixture(scope="module")
def nets():
    return scaled_(KeypointNet(22), 7, gain=1.4), scaled_(KeypointNet(71), 8, gain=1.4)


def test_hand_and_face_networks_match_reference(nets):
    hand, face = nets
    ref_hand, ref_face = reference_nets(hand, face)
    for ours, ref, size in ((hand, lambda x: ref_hand.model(x), (64, 72)), (face, lambda x: ref_face.model(x)[-1],
                                                                             (96, 96))):
        x = torch.rand(1, 3, *size) - 0.5
        with torch.no_grad():
            a, b = ours(x), ref(x)
        assert a.shape == b.shape and a.shape[1] == ours.channels
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hands_and_face_match_controlnet_aux(nets, monkeypatch):
    """A body from synthetic maps, its hands and face from random networks, through each side's
    ``openpose_full`` call once (the hand network runs at four scales up to 736 px: slow on a CPU):
    the same keypoints as controlnet_aux's detect_poses, and the same control image in all four
    modes (they differ only in what is drawn)."""
    from controlnet_aux.open_pose import Body, OpenposeDetector, draw_poses

    from sfumato.pipeline import annotate

    w, h = 128, 192
    fake = FakePoseNet(PEOPLE[:1], w, h)
    image = photo(w, h)
    body = Body.__new__(Body)
    body.model = fake
    detector = OpenposeDetector(body, *reference_nets(*nets))
    seen = {}
    for owner, name in ((detector, "ref"), (annotate, "ours")):
        original = owner.detect_poses

        def capture(*args, _original=original, _name=name, **kwargs):
            seen[_name] = _original(*args, **kwargs)
            return seen[_name]
        monkeypatch.setattr(owner, "detect_poses", capture)
    want = detector(image, detect_resolution=128, image_resolution=128, output_type="np", include_hand=True,
                    include_face=True)
    got = ANNOTATORS["openpose_full"][1](OpenPoseNets(fake, *nets), image)
    assert want.any() and np.array_equal(got, want)
    ref, pose = seen["ref"], seen["ours"]
    assert len(pose.people) == len(ref) == 1 and len(pose.hands) == len(pose.faces) == 1
    found = 0
    for r, (left, right), face in zip(ref, pose.hands, pose.faces):
        for want_part, got_part in ((r.left_hand, left), (r.right_hand, right), (r.face, face)):
            assert want_part is not None and got_part is not None
            # controlnet_aux marks a point it did not find by a negative coordinate
            assert list(got_part) == [(k.x, k.y) if k.x >= 0 and k.y >= 0 else None for k in want_part]
            found += sum(p is not None for p in got_part)
    assert found > 40, "the random networks found too few points to test anything"
    for flags in ({"draw_hand": True, "draw_face": False}, {"draw_hand": False, "draw_face": True},
                  {"draw_body": False, "draw_hand": False, "draw_face": True}):
        want = draw_poses(ref, h, w, **flags)
        got = render_pose(pose, body=flags.get("draw_body", True), hands=flags["draw_hand"], face=flags["draw_face"])
        assert want.any() and np.array_equal(got, want), flags


def random_pose_with_parts(rng: np.random.Generator) -> dict:
    w, h = (int(v) for v in rng.choice([256, 384, 512, 777], size=2))

    def points(n: int, missing: float) -> list[float]:
        out = []
        for _ in range(n):
            if rng.random() < missing:
                out += [0.0, 0.0, 0.0]
            else:
                out += [float(rng.uniform(0.0, 1.0) * w), float(rng.uniform(0.0, 1.0) * h), 1.0]
        return out

    people = []
    for _ in range(int(rng.integers(1, 3))):
        person = {"pose_keypoints_2d": points(len(BODY_PARTS), 0.1)}
        for key, n in (("hand_left_keypoints_2d", 21), ("hand_right_keypoints_2d", 21), ("face_keypoints_2d", 70)):
            if rng.random() < 0.8:
                person[key] = points(n, 0.1)
        people.append(person)
    return {"people": people, "canvas_width": w, "canvas_height": h}


def test_render_with_hands_and_faces_matches_draw_poses():
    from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult, draw_poses

    rng = np.random.default_rng(1)
    for k in range(20):
        data = random_pose_with_parts(rng)
        w, h = data["canvas_width"], data["canvas_height"]

        def keypoints(v):
            if v is None:
                return None
            return [Keypoint(v[j] / float(w), v[j + 1] / float(h)) if v[j + 2] >= 1 else None
                    for j in range(0, len(v), 3)]

        poses = [PoseResult(BodyResult(keypoints(p["pose_keypoints_2d"]), 0.0, 0),
                            keypoints(p.get("hand_left_keypoints_2d")), keypoints(p.get("hand_right_keypoints_2d")),
                            keypoints(p.get("face_keypoints_2d"))) for p in data["people"]]
        # controlnet_aux draws every hand point it is given (a missing one is at -1, off the canvas)
        for p in poses:
            for hand in (p.left_hand, p.right_hand):
                if hand:
                    hand[:] = [q if q is not None else Keypoint(-1.0, -1.0) for q in hand]
            if p.face:
                p.face[:] = [q if q is not None else Keypoint(-1.0, -1.0) for q in p.face]
        want = draw_poses(poses, h, w)
        pose = parse_pose(json.dumps(data))
        got = render_pose(pose)
        assert np.array_equal(got, want), f"pose {k}: {(got != want).any(-1).sum()} pixels differ"
        # and through the JSON we write
        assert np.array_equal(render_pose(parse_pose(pose_json(pose))), want)
        body_only = draw_poses(poses, h, w, draw_hand=False, draw_face=False)
        assert np.array_equal(render_pose(pose, hands=False, face=False), body_only)
        assert not np.array_equal(body_only, want), f"pose {k}: the hands and face drew nothing"


def test_bad_hand_json_names_the_field():
    data = {"canvas_width": 64, "canvas_height": 64,
            "people": [{"pose_keypoints_2d": [1.0, 1.0, 1.0] * 18, "hand_left_keypoints_2d": [1, 2]}]}
    with pytest.raises(ParamError) as e:
        parse_pose(data)
    assert e.value.field == "pose.people[0].hand_left_keypoints_2d"
    data["people"][0]["hand_left_keypoints_2d"] = [1.0, 2.0, 1.0] * 20   # 20 of 21
    with pytest.raises(ParamError) as e:
        parse_pose(data)
    assert e.value.field == "pose.people[0].hand_left_keypoints_2d" and "63 numbers" in e.value.message
    data["people"][0]["hand_left_keypoints_2d"] = None
    data["people"][0]["face_keypoints_2d"] = [1.0, 2.0, "x"]
    with pytest.raises(ParamError) as e:
        parse_pose(data, field="controlnet_pose")
    assert e.value.field == "controlnet_pose.people[0].face_keypoints_2d[2]"


def test_files_are_told_apart_and_found_in_a_folder(nets, tmp_path):
    hand, face = nets
    body = scaled_(BodyPoseNet(), 4)
    folder = tmp_path / "annotators"
    folder.mkdir()
    torch.save(body.state_dict(), folder / "body_pose_model.pth")
    torch.save(hand.state_dict(), folder / "hand_pose_model.pth")
    torch.save(face.state_dict(), folder / "facenet.pth")
    torch.save(scaled_(HEDNet(), 5).state_dict(), folder / "ControlNetHED.pth")
    assert load_annotator(folder / "hand_pose_model.pth", "openpose_hand").channels == 22
    assert load_annotator(folder / "facenet.pth", "openpose_face").channels == 71
    with pytest.raises(CheckpointError, match="is an OpenPose face model"):
        load_annotator(folder / "facenet.pth", "openpose_hand")
    image = photo(96, 96, seed=5)
    from_folder = annotator_network(folder, "openpose+hand+face", "annotator")
    from_list = annotator_network([folder / "facenet.pth", folder / "body_pose_model.pth", folder / "hand_pose_model.pth"],
                                  "openpose+hand+face", "annotator")
    for loaded in (from_folder, from_list):   # each network from its own file
        assert isinstance(loaded, OpenPoseNets)
        for part, net in (("body", body), ("hand", hand), ("face", face)):
            got, want = getattr(loaded, part).state_dict(), net.state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
    # a plain openpose unit may name the folder too; a loaded network must hold what the kind runs
    assert isinstance(annotator_network(folder, "openpose", "annotator").body, BodyPoseNet)
    with pytest.raises(ParamError, match="needs the face network") as e:
        annotator_network(OpenPoseNets(body, hand), "openpose+hand+face", "control[1].annotator")
    assert e.value.field == "control[1].annotator"
    with pytest.raises(ParamError, match="hand_pose_model.pth") as e:
        annotator_network(folder / "body_pose_model.pth", "openpose+hand", "control[0].annotator")
    assert e.value.field == "control[0].annotator"
    with pytest.raises(ParamError, match="not an OpenPose"):
        annotator_network([folder / "body_pose_model.pth", folder / "ControlNetHED.pth"], "openpose+face", "annotator")
    with pytest.raises(ValueError, match="hand network"):
        detect_poses(body, image, hands=True)

    # the CLI: pose detect with the hand and face models writes their keys (random weights: no people)
    out = tmp_path / "pose.json"
    Image.fromarray(image).save(tmp_path / "x.png")
    assert main(["pose", "detect", "--image", str(tmp_path / "x.png"), "--openpose", str(folder / "body_pose_model.pth"),
                 "--hand", str(folder / "hand_pose_model.pth"), "--face", str(folder / "facenet.pth"),
                 "-o", str(out)]) == 0
    assert json.loads(out.read_text())["canvas_width"] == 96
    assert main(["pose", "detect", "--image", str(tmp_path / "x.png"), "--openpose", str(folder / "body_pose_model.pth"),
                 "--hand", str(folder / "facenet.pth"), "-o", str(out)]) == 2


def test_control_spec_takes_the_folder_or_the_files(tmp_path):
    from sfumato.commands.units import control_specs
    from sfumato.pipeline.params import ControlSpec

    folder = tmp_path / "annotators"
    folder.mkdir()
    (folder / "body_pose_model.pth").write_bytes(b"x")
    model = tmp_path / "control.safetensors"
    model.write_bytes(b"x")
    image = Image.new("RGB", (64, 64))
    ControlSpec(model, image, "openpose_full", annotator=folder).validate("control[0]")
    with pytest.raises(ParamError) as e:
        ControlSpec(model, image, "openpose_hand", annotator=[folder / "body_pose_model.pth", folder / "no.pth"]
                    ).validate("control[0]")
    assert e.value.field == "control[0].annotator[1]"
    with pytest.raises(ParamError) as e:   # a folder is for OpenPose's several files only
        ControlSpec(model, image, "softedge_hed", annotator=folder).validate("control[0]")
    assert e.value.field == "control[0].annotator"

    import argparse
    image.save(tmp_path / "c.png")
    args = argparse.Namespace(control_model=[str(model)], control_image=[str(tmp_path / "c.png")],
                              control_preprocessor=["openpose_hand"], control_strength=[], control_start=[],
                              control_end=[], control_mode=[], control_resize=[], control_threshold_a=[],
                              control_threshold_b=[], control_annotator=[f"{folder}/body_pose_model.pth,{folder}/h.pth"])
    assert control_specs(args)[0].annotator == [f"{folder}/body_pose_model.pth", f"{folder}/h.pth"]
