"""OpenPose poses: the control image against controlnet_aux's ``draw_poses`` (pixel-identical on 20
random poses of 1–3 people with missing keypoints, at several canvas sizes), the JSON layouts of the
A1111 pose editors read and written, ``sfumato pose render``, and typed errors for bad JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sfumato.cli import main
from sfumato.errors import ParamError
from sfumato.pipeline.pose import BODY_PARTS, Pose, default_person, parse_pose, pose_json, render_pose


def random_pose(rng: np.random.Generator) -> dict:
    """An OpenPose-format JSON object in pixels, keypoints spread over (and a little past) the canvas."""
    w, h = (int(v) for v in rng.choice([256, 384, 512, 640, 768, 1000], size=2))
    people = []
    for _ in range(int(rng.integers(1, 4))):
        flat = []
        for _ in BODY_PARTS:
            if rng.random() < 0.15:
                flat += [0.0, 0.0, 0.0]
            else:
                flat += [float(rng.uniform(-0.05, 1.05) * w), float(rng.uniform(-0.05, 1.05) * h), 1.0]
        people.append({"pose_keypoints_2d": flat})
    return {"people": people, "canvas_width": w, "canvas_height": h}


def reference_render(data: dict) -> np.ndarray:
    from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult, draw_poses

    w, h = data["canvas_width"], data["canvas_height"]
    poses = []
    for person in data["people"]:
        v = person["pose_keypoints_2d"]
        points = [Keypoint(v[j] / float(w), v[j + 1] / float(h)) if v[j + 2] >= 1 else None
                  for j in range(0, len(v), 3)]
        poses.append(PoseResult(BodyResult(points, 0.0, 0), None, None, None))
    return draw_poses(poses, h, w, draw_body=True, draw_hand=False, draw_face=False)


def test_render_matches_controlnet_aux_on_20_random_poses():
    rng = np.random.default_rng(0)
    for k in range(20):
        data = random_pose(rng)
        ours = render_pose(parse_pose(json.dumps(data)))
        ref = reference_render(data)
        assert ours.shape == ref.shape and ours.dtype == np.uint8
        assert np.array_equal(ours, ref), f"pose {k}: {(ours != ref).any(-1).sum()} pixels differ"
        assert ours.any(), f"pose {k} drew nothing"


def test_normalised_and_editor_layouts_give_the_same_pose():
    w, h = 512, 768
    person = default_person(w, h)
    pixels = pose_json(Pose(w, h, (person,)))
    normalised = {"canvas_width": w, "canvas_height": h,
                  "people": [{"pose_keypoints_2d": [v for p in person for v in (p[0], p[1], 1.0)]}]}
    editor = {"width": w, "height": h, "keypoints": [[p[0] * w, p[1] * h] for p in person]}
    images = [render_pose(parse_pose(d)) for d in (pixels, normalised, editor)]
    assert all(np.array_equal(images[0], im) for im in images[1:])
    back = parse_pose(json.dumps(pixels))
    assert back.width == w and back.height == h and len(back.people) == 1
    np.testing.assert_allclose(np.array(back.people[0]), np.array(person), atol=1e-12)


def test_missing_keypoints_round_trip_and_are_not_drawn():
    person = list(default_person(512, 512))
    person[4] = None   # right wrist
    pose = Pose(512, 512, (tuple(person),))
    data = pose_json(pose)
    assert data["people"][0]["pose_keypoints_2d"][12:15] == [0.0, 0.0, 0.0]
    assert parse_pose(data).people[0][4] is None
    with_wrist = render_pose(Pose(512, 512, (default_person(512, 512),)))
    without = render_pose(pose)
    x, y = (int(v * 512) for v in default_person(512, 512)[4])
    assert with_wrist[y, x].any() and not without[y, x].any()


@pytest.mark.parametrize("text, field", [
    ("{not json", "pose"),
    ("[1, 2]", "pose"),
    ('{"people": []}', "pose.canvas_width"),
    ('{"canvas_width": 0, "canvas_height": 5, "people": []}', "pose.canvas_width"),
    ('{"canvas_width": 64, "canvas_height": 64, "people": [{"pose_keypoints_2d": [1, 2, 3]}]}',
     "pose.people[0].pose_keypoints_2d"),
    ('{"canvas_width": 64, "canvas_height": 64, "people": [{"pose_keypoints_2d": ' + json.dumps([0] * 53 + ["x"]) + '}]}',
     "pose.people[0].pose_keypoints_2d[53]"),
    ('{"width": 64, "height": 64, "keypoints": [[1, 2]]}', "pose.keypoints"),
])
def test_bad_pose_json_names_the_field(text, field):
    with pytest.raises(ParamError) as e:
        parse_pose(text)
    assert e.value.field == field


def test_cli_pose_render(tmp_path, capsys):
    data = random_pose(np.random.default_rng(3))
    src = tmp_path / "pose.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "pose.png"
    assert main(["pose", "render", str(src), "-o", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), reference_render(data))
    # a new pose JSON: one default person on a chosen canvas
    new = tmp_path / "new.json"
    assert main(["pose", "new", "--width", "512", "--height", "512", "-o", str(new)]) == 0
    np.testing.assert_allclose(np.array(parse_pose(new.read_text()).people[0]), np.array(default_person(512, 512)))
    assert main(["pose", "new", "--width", "384", "--height", "256", "--people", "2", "-o", str(new)]) == 0
    two = parse_pose(new.read_text())
    a, b = (np.array(p) * [384, 256] for p in two.people)
    assert len(two.people) == 2 and (a[:, 0] < 192).all() and (b[:, 0] > 192).all()
    np.testing.assert_allclose(np.ptp(a, 0)[0] / np.ptp(a, 0)[1], 169 / 397, rtol=1e-6)   # the figure's proportions
    bad = tmp_path / "bad.json"
    bad.write_text('{"canvas_width": 64}')
    assert main(["pose", "render", str(bad), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "canvas_height" in err[0]
