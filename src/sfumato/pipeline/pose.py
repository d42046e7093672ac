"""OpenPose body poses: read and write the JSON the A1111 pose editors use, and render the control image.

A pose is a canvas size and a list of people, each the 18 COCO body keypoints of OpenPose (nose,
neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle, left
hip/knee/ankle, right/left eye, right/left ear), each at a position in [0, 1]² of the canvas or
missing. Two JSON layouts are read:

* the OpenPose output format that sd-webui-controlnet writes and sd-webui-openpose-editor reads and
  saves: ``{"canvas_width", "canvas_height", "people": [{"pose_keypoints_2d": [x, y, c, …]}]}``,
  a keypoint with confidence ``c < 1`` missing (as the extension decodes it). The extension writes
  coordinates in [0, 1]; the editor writes pixels. As both of them decide, a file whose present
  coordinates all lie in [0, 1] is normalised, any other is in pixels;
* fkunn1326's Openpose Editor: ``{"width", "height", "keypoints": [[x, y], …]}`` in pixels, 18 per
  person, none missing.

``pose_json`` writes the first layout in pixels. ``render_pose`` draws what controlnet_aux's
``draw_bodypose`` draws (limbs as filled ellipses at 60 % colour, then keypoints as radius-4 discs),
with the same float arithmetic and OpenCV's rasteriser, so the control image is pixel-identical.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import ParamError

BODY_PARTS = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
# OpenPose's limbs (keypoint index pairs) in drawing order, each with the colour of the same index
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
         (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
STICK_WIDTH = 4
MAX_PEOPLE = 64
MAX_SIDE = 8192
MAX_JSON_BYTES = 1 << 20

Keypoint = tuple[float, float] | None   # (x, y) as fractions of the canvas width / height
Person = tuple[Keypoint, ...]           # the 18 body keypoints


@dataclass(frozen=True)
class Pose:
    width: int
    height: int
    people: tuple[Person, ...] = ()

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIDE:
                raise ParamError(f"pose.{name}", f"must be an integer in [1, {MAX_SIDE}], got {v!r}")
        if len(self.people) > MAX_PEOPLE:
            raise ParamError("pose.people", f"at most {MAX_PEOPLE} people, got {len(self.people)}")
        for i, person in enumerate(self.people):
            if len(person) != len(BODY_PARTS):
                raise ParamError(f"pose.people[{i}]", f"needs {len(BODY_PARTS)} keypoints, got {len(person)}")
            for k, point in enumerate(person):
                if point is not None and not (len(point) == 2 and all(math.isfinite(v) for v in point)):
                    raise ParamError(f"pose.people[{i}].{BODY_PARTS[k]}", f"must be (x, y) or missing, got {point!r}")


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamError(field, f"must be a finite number, got {value!r}")
    return float(value)


def _side(data: dict, keys: Sequence[str], field: str) -> int:
    for key in keys:
        if key in data:
            v = data[key]
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIDE:
                raise ParamError(f"{field}.{key}", f"must be an integer in [1, {MAX_SIDE}], got {v!r}")
            return v
    raise ParamError(f"{field}.{keys[0]}", "is missing")


def parse_pose(data: str | bytes | dict, field: str = "pose") -> Pose:
    """A pose from JSON text or its decoded object (either layout above); errors name the field."""
    if isinstance(data, (str, bytes)):
        if len(data) > MAX_JSON_BYTES:
            raise ParamError(field, f"the JSON is larger than {MAX_JSON_BYTES} bytes")
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ParamError(field, f"does not parse as JSON: {e}") from None
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]   # sd-webui-controlnet's /controlnet/detect returns one pose object per image
    if not isinstance(data, dict):
        raise ParamError(field, f"must be a JSON object, got {type(data).__name__}")
    if "keypoints" in data and "people" not in data:
        return _parse_editor(data, field)
    width = _side(data, ("canvas_width", "width"), field)
    height = _side(data, ("canvas_height", "height"), field)
    people = data.get("people", [])
    if not isinstance(people, list):
        raise ParamError(f"{field}.people", "must be a list")
    if len(people) > MAX_PEOPLE:
        raise ParamError(f"{field}.people", f"at most {MAX_PEOPLE} people, got {len(people)}")
    raw: list[list[tuple[float, float] | None]] = []
    for i, person in enumerate(people):
        where = f"{field}.people[{i}].pose_keypoints_2d"
        numbers = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        if not isinstance(numbers, list) or len(numbers) != 3 * len(BODY_PARTS):
            got = len(numbers) if isinstance(numbers, list) else type(numbers).__name__
            raise ParamError(where, f"must be a list of {3 * len(BODY_PARTS)} numbers (x, y, confidence "
                                    f"for each of the 18 body keypoints), got {got}")
        values = [_number(v, f"{where}[{j}]") for j, v in enumerate(numbers)]
        raw.append([(values[j], values[j + 1]) if values[j + 2] >= 1.0 else None for j in range(0, len(values), 3)])
    present = [v for person in raw for point in person if point is not None for v in point]
    normalised = bool(present) and all(0.0 <= v <= 1.0 for v in present)
    sx, sy = (1.0, 1.0) if normalised else (float(width), float(height))
    return Pose(width, height, tuple(tuple(None if p is None else (p[0] / sx, p[1] / sy) for p in person)
                                     for person in raw))


def _parse_editor(data: dict, field: str) -> Pose:
    width = _side(data, ("width",), field)
    height = _side(data, ("height",), field)
    points = data["keypoints"]
    if not isinstance(points, list) or len(points) % len(BODY_PARTS):
        raise ParamError(f"{field}.keypoints", f"must be a list of [x, y] pairs, {len(BODY_PARTS)} per person")
    if len(points) > MAX_PEOPLE * len(BODY_PARTS):
        raise ParamError(f"{field}.keypoints", f"at most {MAX_PEOPLE} people")
    parsed = []
    for j, point in enumerate(points):
        if not isinstance(point, list) or len(point) != 2:
            raise ParamError(f"{field}.keypoints[{j}]", f"must be an [x, y] pair, got {point!r}")
        x, y = (_number(v, f"{field}.keypoints[{j}]") for v in point)
        parsed.append((x / float(width), y / float(height)))
    n = len(BODY_PARTS)
    return Pose(width, height, tuple(tuple(parsed[i:i + n]) for i in range(0, len(parsed), n)))


def pose_json(pose: Pose) -> dict:
    """The OpenPose-format object (pixel coordinates, missing keypoints as 0, 0, 0)."""
    def flat(person: Person) -> list[float]:
        return [v for p in person for v in ((p[0] * pose.width, p[1] * pose.height, 1.0) if p else (0.0, 0.0, 0.0))]

    return {"people": [{"pose_keypoints_2d": flat(p)} for p in pose.people],
            "canvas_width": pose.width, "canvas_height": pose.height}


def render_pose(pose: Pose, width: int | None = None, height: int | None = None) -> np.ndarray:
    """The control image, uint8 (H, W, 3) RGB: black, each person's limbs then keypoints, drawn at
    ``width`` × ``height`` (default: the pose's canvas) as controlnet_aux's ``draw_bodypose`` does."""
    import cv2   # OpenCV's ellipse polygon and scan-line fill are what make the map pixel-identical

    w, h = width or pose.width, height or pose.height
    Pose(w, h)   # validates the size
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    for person in pose.people:
        for (a, b), color in zip(LIMBS, COLORS):
            p, q = person[a], person[b]
            if p is None or q is None:
                continue
            xs = np.array([p[0], q[0]]) * float(w)
            ys = np.array([p[1], q[1]]) * float(h)
            length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH),
                                       int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
        for point, color in zip(person, COLORS):
            if point is not None:
                cv2.circle(canvas, (int(point[0] * w), int(point[1] * h)), 4, color, thickness=-1)
    return canvas


def default_person(width: int, height: int) -> Person:
    """A standing figure (the editors' starting pose, scaled from their 512² canvas)."""
    points = ((241, 77), (241, 120), (191, 118), (177, 183), (163, 252), (298, 118), (317, 182), (332, 245),
              (225, 241), (213, 359), (215, 454), (270, 240), (282, 360), (286, 456), (232, 59), (253, 60),
              (225, 70), (260, 72))
    return tuple((x / 512.0, y / 512.0) for x, y in points)
