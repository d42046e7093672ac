"""OpenPose poses: read and write the JSON the A1111 pose editors use, and render the control image.

A pose is a canvas size and a list of people, each the 18 COCO body keypoints of OpenPose (nose,
neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle, left
hip/knee/ankle, right/left eye, right/left ear), each at a position in [0, 1]² of the canvas or
missing; a person may also have a left and a right hand (21 keypoints each) and a face (OpenPose's
face landmarks), present or not. Two JSON layouts are read:

* the OpenPose output format that sd-webui-controlnet writes and sd-webui-openpose-editor reads and
  saves: ``{"canvas_width", "canvas_height", "people": [{"pose_keypoints_2d": [x, y, c, …]}]}``,
  a keypoint with confidence ``c < 1`` missing (as the extension decodes it); ``hand_left_keypoints_2d``,
  ``hand_right_keypoints_2d`` and ``face_keypoints_2d`` the same way (null: none; a hand or face
  point at a negative coordinate is one the detector did not find). The extension writes
  coordinates in [0, 1]; the editor writes pixels. As both of them decide, a file whose present
  coordinates all lie in [0, 1] is normalised, any other is in pixels;
* fkunn1326's Openpose Editor: ``{"width", "height", "keypoints": [[x, y], …]}`` in pixels, 18 per
  person, none missing.

``pose_json`` writes the first layout in pixels. ``render_pose`` draws what controlnet_aux's
``draw_bodypose`` draws (limbs as filled ellipses at 60 % colour, then keypoints as radius-4 discs),
with the same float arithmetic and OpenCV's rasteriser, so the control image is pixel-identical; hands
and faces as ``draw_handpose`` / ``draw_facepose`` draw them (bones as 2 px lines in hue order, joints
as radius-4 blue discs; landmarks as radius-3 white discs), each person's after its body.
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
HAND_BONES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
              (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
HAND_POINTS = 21
MAX_FACE_POINTS = 128
STICK_WIDTH = 4
MAX_PEOPLE = 64
MAX_SIDE = 8192
MAX_JSON_BYTES = 1 << 20

Keypoint = tuple[float, float] | None   # (x, y) as fractions of the canvas width / height
Person = tuple[Keypoint, ...]           # the 18 body keypoints
Points = tuple[Keypoint, ...]           # a hand's 21 keypoints or a face's landmarks


@dataclass(frozen=True)
class Pose:
    width: int
    height: int
    people: tuple[Person, ...] = ()
    hands: tuple[tuple[Points | None, Points | None], ...] = ()   # per person (left, right), or ()
    faces: tuple[Points | None, ...] = ()                          # per person, or ()

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
        for name, parts in (("hands", self.hands), ("faces", self.faces)):
            if len(parts) not in (0, len(self.people)):
                raise ParamError(f"pose.{name}", f"needs one entry per person ({len(self.people)}), got {len(parts)}")
        for i, pair in enumerate(self.hands):
            for side, hand in zip(("left", "right"), pair):
                _check_points(f"pose.people[{i}].hand_{side}", hand, HAND_POINTS, HAND_POINTS)
        for i, face in enumerate(self.faces):
            _check_points(f"pose.people[{i}].face", face, 1, MAX_FACE_POINTS)


def _check_points(field: str, points: Points | None, least: int, most: int) -> None:
    if points is None:
        return
    if not least <= len(points) <= most:
        raise ParamError(field, f"needs {least if least == most else f'{least} to {most}'} keypoints, got {len(points)}")
    for k, point in enumerate(points):
        if point is not None and not (len(point) == 2 and all(math.isfinite(v) for v in point)):
            raise ParamError(f"{field}[{k}]", f"must be (x, y) or missing, got {point!r}")


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
    extra: list[list[list[tuple[float, float] | None] | None]] = []   # per person: left, right, face
    for i, person in enumerate(people):
        where = f"{field}.people[{i}].pose_keypoints_2d"
        numbers = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        if not isinstance(numbers, list) or len(numbers) != 3 * len(BODY_PARTS):
            got = len(numbers) if isinstance(numbers, list) else type(numbers).__name__
            raise ParamError(where, f"must be a list of {3 * len(BODY_PARTS)} numbers (x, y, confidence "
                                    f"for each of the 18 body keypoints), got {got}")
        raw.append(_triples(numbers, where))
        extra.append([_part(person, key, f"{field}.people[{i}].{key}", most)
                      for key, most in (("hand_left_keypoints_2d", HAND_POINTS),
                                        ("hand_right_keypoints_2d", HAND_POINTS),
                                        ("face_keypoints_2d", MAX_FACE_POINTS))])
    present = [v for person in raw for point in person if point is not None for v in point]
    present += [v for parts in extra for part in parts if part for point in part if point is not None for v in point]
    normalised = bool(present) and all(0.0 <= v <= 1.0 for v in present)
    sx, sy = (1.0, 1.0) if normalised else (float(width), float(height))

    def scaled(points):
        return None if points is None else tuple(None if p is None else (p[0] / sx, p[1] / sy) for p in points)

    has_hands = any(parts[0] is not None or parts[1] is not None for parts in extra)
    has_faces = any(parts[2] is not None for parts in extra)
    return Pose(width, height, tuple(scaled(person) for person in raw),
                tuple((scaled(p[0]), scaled(p[1])) for p in extra) if has_hands else (),
                tuple(scaled(p[2]) for p in extra) if has_faces else ())


def _triples(numbers: list, where: str) -> list[tuple[float, float] | None]:
    values = [_number(v, f"{where}[{j}]") for j, v in enumerate(numbers)]
    return [(values[j], values[j + 1]) if values[j + 2] >= 1.0 else None for j in range(0, len(values), 3)]


def _part(person: dict, key: str, where: str, most: int) -> list[tuple[float, float] | None] | None:
    """A hand's or face's keypoints (None: absent); points at negative coordinates are missing."""
    numbers = person.get(key)
    if numbers is None or numbers == []:
        return None
    exact = most == HAND_POINTS   # a hand has all 21 (a missing one at 0, 0, 0); a face up to MAX_FACE_POINTS
    if not isinstance(numbers, list) or len(numbers) % 3 or len(numbers) > 3 * most or \
            exact and len(numbers) != 3 * most:
        got = len(numbers) if isinstance(numbers, list) else type(numbers).__name__
        count = f"{3 * most} numbers" if exact else f"at most {most} (x, y, confidence) triples"
        raise ParamError(where, f"must be a list of {count}, or null; got {got}")
    return [None if p is None or p[0] < 0 or p[1] < 0 else p for p in _triples(numbers, where)]


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
    def flat(points: Points | None) -> list[float] | None:
        if points is None:
            return None
        return [float(v) for p in points
                for v in ((p[0] * pose.width, p[1] * pose.height, 1.0) if p else (0.0, 0.0, 0.0))]

    people = []
    for i, person in enumerate(pose.people):
        entry = {"pose_keypoints_2d": flat(person)}
        if pose.hands:
            entry["hand_left_keypoints_2d"], entry["hand_right_keypoints_2d"] = map(flat, pose.hands[i])
        if pose.faces:
            entry["face_keypoints_2d"] = flat(pose.faces[i])
        people.append(entry)
    return {"people": people, "canvas_width": pose.width, "canvas_height": pose.height}


def render_pose(pose: Pose, width: int | None = None, height: int | None = None, *, body: bool = True,
                hands: bool = True, face: bool = True) -> np.ndarray:
    """The control image, uint8 (H, W, 3) RGB: black, then per person its limbs and keypoints, its
    hands and its face (each where present and asked for), drawn at ``width`` × ``height`` (default:
    the pose's canvas) as controlnet_aux's ``draw_poses`` does (with OpenCV's ellipse polygons,
    scan-line fill, lines and discs: what makes the map pixel-identical)."""
    w, h = width or pose.width, height or pose.height
    Pose(w, h)   # validates the size
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    for i, person in enumerate(pose.people):
        if body:
            _draw_body(canvas, person)
        if hands and pose.hands:
            for hand in pose.hands[i]:
                _draw_hand(canvas, hand)
        if face and pose.faces:
            _draw_points(canvas, pose.faces[i], 3, (255, 255, 255))
    return canvas


def _pixel(point: Keypoint, w: int, h: int) -> tuple[int, int] | None:
    """Where a hand or face point is drawn; None where controlnet_aux skips it (at or left of / above 0)."""
    if point is None:
        return None
    x, y = int(point[0] * w), int(point[1] * h)
    return (x, y) if x > 0.01 and y > 0.01 else None


def _hue(fraction: float) -> tuple[float, float, float]:
    """Full-saturation, full-value HSV → RGB × 255, as matplotlib's hsv_to_rgb computes it."""
    i = int(fraction * 6.0)
    f = fraction * 6.0 - i
    q, t = 1.0 - f, 1.0 - (1.0 - f)
    rgb = ((1.0, t, 0.0), (q, 1.0, 0.0), (0.0, 1.0, t), (0.0, q, 1.0), (t, 0.0, 1.0), (1.0, 0.0, q))[i % 6]
    return tuple(v * 255 for v in rgb)


def _draw_hand(canvas: np.ndarray, hand: Points | None) -> None:
    import cv2

    if not hand:
        return
    h, w = canvas.shape[:2]
    for k, (a, b) in enumerate(HAND_BONES):
        p, q = _pixel(hand[a], w, h), _pixel(hand[b], w, h)
        if p is not None and q is not None:
            cv2.line(canvas, p, q, _hue(k / float(len(HAND_BONES))), thickness=2)
    _draw_points(canvas, hand, 4, (0, 0, 255))


def _draw_points(canvas: np.ndarray, points: Points | None, radius: int, color: tuple[int, int, int]) -> None:
    import cv2

    h, w = canvas.shape[:2]
    for point in points or ():
        p = _pixel(point, w, h)
        if p is not None:
            cv2.circle(canvas, p, radius, color, thickness=-1)


def _draw_body(canvas: np.ndarray, person: Person) -> None:
    import cv2

    h, w = canvas.shape[:2]
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


def default_person(width: int, height: int) -> Person:
    """A standing figure (the editors' starting pose, scaled from their 512² canvas)."""
    points = ((241, 77), (241, 120), (191, 118), (177, 183), (163, 252), (298, 118), (317, 182), (332, 245),
              (225, 241), (213, 359), (215, 454), (270, 240), (282, 360), (286, 456), (232, 59), (253, 60),
              (225, 70), (260, 72))
    return tuple((x / 512.0, y / 512.0) for x, y in points)
