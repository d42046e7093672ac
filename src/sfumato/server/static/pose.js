// sfumato web UI, part 8: the OpenPose editor. People of 18 body keypoints (OpenPose's COCO order)
// on a canvas: drag a keypoint, add or remove a person, start from the poses detected in a photo
// (with hands and face where the server has those models: they are kept, drawn and saved, and move
// with their person's wrist / nose), load and save the JSON the A1111 pose editors use. The exact control image is the server's
// (/v1/pose/render, drawn as the OpenPose preprocessor draws); "Send to ControlNet" puts it in a unit.
"use strict";

const POSE_LIMBS = [[1, 2], [1, 5], [2, 3], [3, 4], [5, 6], [6, 7], [1, 8], [8, 9], [9, 10], [1, 11], [11, 12],
  [12, 13], [1, 0], [0, 14], [14, 16], [0, 15], [15, 17]];
const POSE_COLORS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
  [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255],
  [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]];
const POSE_STANDING = [[241, 77], [241, 120], [191, 118], [177, 183], [163, 252], [298, 118], [317, 182],
  [332, 245], [225, 241], [213, 359], [215, 454], [270, 240], [282, 360], [286, 456], [232, 59], [253, 60],
  [225, 70], [260, 72]].map(([x, y]) => [x / 512, y / 512]);

// keypoints are fractions of the canvas (x, y in [0, 1]); null: missing. parts[k]: person k's
// hands and face ({ hand_left_keypoints_2d, hand_right_keypoints_2d, face_keypoints_2d }, each a list of
// points or null), moved with their anchor (left wrist 7, right wrist 4, nose 0)
const POSE_PARTS = { hand_left_keypoints_2d: 7, hand_right_keypoints_2d: 4, face_keypoints_2d: 0 };
const pose = { width: 512, height: 512, people: [], parts: [], selected: -1, drag: null, background: null, timer: null };

function poseJson() {
  const flat = (points) => points.flatMap((p) => (p ? [p[0] * pose.width, p[1] * pose.height, 1] : [0, 0, 0]));
  return {
    people: pose.people.map((person, k) => {
      const out = { pose_keypoints_2d: flat(person) };
      for (const key of Object.keys(POSE_PARTS)) {
        if (pose.parts[k] && pose.parts[k][key]) out[key] = flat(pose.parts[k][key]);
      }
      return out;
    }),
    canvas_width: pose.width, canvas_height: pose.height,
  };
}

function unflatten(v) {
  if (!Array.isArray(v) || !v.length) return null;
  const out = [];
  for (let i = 0; i < v.length; i += 3) {
    out.push(v[i + 2] >= 1 && v[i] >= 0 && v[i + 1] >= 0 ? [v[i] / pose.width, v[i + 1] / pose.height] : null);
  }
  return out;
}

/** Take a pose in the OpenPose JSON layout, pixels (as the server returns it). */
function setPose(json) {
  pose.width = json.canvas_width;
  pose.height = json.canvas_height;
  pose.people = json.people.map((person) => unflatten(person.pose_keypoints_2d));
  pose.parts = json.people.map((person) => Object.fromEntries(Object.keys(POSE_PARTS).map((key) => [key, unflatten(person[key])])));
  pose.selected = pose.people.length ? 0 : -1;
  $("pose-width").value = pose.width;
  $("pose-height").value = pose.height;
  drawPose();
}

function drawPose() {
  const canvas = $("pose-canvas"), ctx = canvas.getContext("2d");
  canvas.width = pose.width;
  canvas.height = pose.height;
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (pose.background) {
    ctx.globalAlpha = 0.5;
    ctx.drawImage(pose.background, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
  pose.people.forEach((person, k) => {
    const at = (p) => [p[0] * pose.width, p[1] * pose.height];
    ctx.lineWidth = 8;
    POSE_LIMBS.forEach(([a, b], i) => {
      if (!person[a] || !person[b]) return;
      ctx.strokeStyle = `rgb(${POSE_COLORS[i].map((c) => Math.floor(c * 0.6)).join(",")})`;
      ctx.beginPath();
      ctx.moveTo(...at(person[a]));
      ctx.lineTo(...at(person[b]));
      ctx.stroke();
    });
    person.forEach((p, i) => {
      if (!p) return;
      ctx.fillStyle = `rgb(${POSE_COLORS[i].join(",")})`;
      ctx.beginPath();
      ctx.arc(...at(p), 5, 0, 2 * Math.PI);
      ctx.fill();
      if (k === pose.selected) {
        ctx.strokeStyle = "#fff";
        ctx.lineWidth = 1.5;
        ctx.stroke();
      }
    });
    for (const [key, points] of Object.entries(pose.parts[k] || {})) {
      ctx.fillStyle = key.startsWith("face") ? "#fff" : "#36f";
      for (const p of points || []) {
        if (!p) continue;
        ctx.beginPath();
        ctx.arc(...at(p), 2, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  });
  $("pose-people").textContent = `${pose.people.length} ${pose.people.length === 1 ? "person" : "people"}` +
    (pose.selected >= 0 ? `, person ${pose.selected + 1} selected` : "");
  clearTimeout(pose.timer);
  pose.timer = setTimeout(renderExact, 150);
}

/** The server's control image for the pose: what ControlNet will see. */
async function renderExact() {
  try {
    const out = await api("POST", "v1/pose/render", { pose: poseJson() });
    $("pose-render").src = `data:image/png;base64,${out.image}`;
    $("pose-render").hidden = false;
    return out.image;
  } catch (e) {
    setStatus(e.message, true);
    return null;
  }
}

function canvasPoint(e) {
  const canvas = $("pose-canvas"), box = canvas.getBoundingClientRect();
  return [(e.clientX - box.left) / box.width, (e.clientY - box.top) / box.height];
}

function nearestKeypoint(point) {
  let best = null, bestDistance = 12;   // canvas pixels
  pose.people.forEach((person, k) => person.forEach((p, i) => {
    if (!p) return;
    const d = Math.hypot((p[0] - point[0]) * pose.width, (p[1] - point[1]) * pose.height);
    if (d < bestDistance) [best, bestDistance] = [[k, i], d];
  }));
  return best;
}

function addPerson() {
  const shift = (pose.people.length % 3) * 0.25 - 0.25;
  pose.people.push(POSE_STANDING.map(([x, y]) => [Math.min(1, Math.max(0, x + shift)), y]));
  pose.parts.push({});
  pose.selected = pose.people.length - 1;
  drawPose();
}

function removePerson() {
  if (pose.selected < 0) return setStatus("pose: select a person first (click one of their keypoints)", true);
  pose.people.splice(pose.selected, 1);
  pose.parts.splice(pose.selected, 1);
  pose.selected = pose.people.length - 1;
  drawPose();
}

function resizePose() {
  const w = intOf("pose-width"), h = intOf("pose-height");
  if (!(w >= 8 && w <= 4096 && h >= 8 && h <= 4096)) return setStatus("pose: width and height must be 8 to 4096", true);
  pose.width = w;
  pose.height = h;
  drawPose();
}

async function loadPoseJson(file) {
  const text = await file.text();
  try {
    const out = await api("POST", "v1/pose/render", { pose: text });   // the server reads both editors' layouts
    setPose(out.pose);
    setStatus(`pose loaded: ${pose.people.length} people`);
  } catch (e) {
    setStatus(`pose JSON: ${e.field ? e.field + ": " : ""}${e.message}`, true);
  }
}

function savePoseJson() {
  const blob = new Blob([JSON.stringify(poseJson(), null, 1)], { type: "application/json" });
  const a = el("a", { href: URL.createObjectURL(blob), download: "pose.json" });
  a.click();
  URL.revokeObjectURL(a.href);
}

async function detectPose(file) {
  // the fullest OpenPose the server has models for: body with hands and face, then either, then the body
  const module = ["openpose_full", "openpose_hand", "openpose_face", "openpose"].find((m) => controlnet.modules.includes(m));
  if (!module) {
    return setStatus("pose: detection needs an OpenPose body model (body_pose_model.pth) in the models folder's " +
      "annotators/", true);
  }
  readFile(file, async (url) => {
    try {
      setStatus("detecting poses…");
      const out = await api("POST", "controlnet/detect", {
        controlnet_module: module, controlnet_input_images: [url], controlnet_processor_res: -1,
      });
      const image = new Image();
      image.onload = () => {
        pose.background = image;
        setPose(out.poses[0]);
        setStatus(`detected ${pose.people.length} people (${module})`);
      };
      image.src = url;
    } catch (e) {
      setStatus(e.message, true);
    }
  });
}

async function sendPoseToControlNet() {
  const image = await renderExact();
  if (!image) return;
  const unit = addUnit();
  setUnitImage(unit, `data:image/png;base64,${image}`);
  unit.querySelector(".cn-module").value = "none";
  setTab("txt2img");
  $("controlnet-panel").open = true;
  setStatus(`pose sent to ControlNet unit ${document.querySelectorAll(".cn-unit").length}`);
}

function setupPose() {
  const canvas = $("pose-canvas");
  canvas.addEventListener("pointerdown", (e) => {
    const hit = nearestKeypoint(canvasPoint(e));
    if (!hit) return;
    pose.drag = hit;
    pose.selected = hit[0];
    canvas.setPointerCapture(e.pointerId);
    drawPose();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!pose.drag) return;
    const [x, y] = canvasPoint(e), [k, i] = pose.drag, old = pose.people[k][i];
    const moved = [Math.min(1, Math.max(0, x)), Math.min(1, Math.max(0, y))];
    pose.people[k][i] = moved;
    for (const [key, anchor] of Object.entries(POSE_PARTS)) {   // a hand follows its wrist, the face its nose
      const points = pose.parts[k] && pose.parts[k][key];
      if (anchor !== i || !points) continue;
      pose.parts[k][key] = points.map((p) => (p ? [p[0] + moved[0] - old[0], p[1] + moved[1] - old[1]] : null));
    }
    drawPose();
  });
  canvas.addEventListener("pointerup", () => { pose.drag = null; });
  $("pose-add").onclick = addPerson;
  $("pose-remove").onclick = removePerson;
  $("pose-resize").onclick = resizePose;
  $("pose-save").onclick = savePoseJson;
  $("pose-send").onclick = sendPoseToControlNet;
  $("pose-load").onchange = (e) => e.target.files[0] && loadPoseJson(e.target.files[0]);
  $("pose-detect").onchange = (e) => e.target.files[0] && detectPose(e.target.files[0]);
  $("pose-clear-bg").onclick = () => { pose.background = null; drawPose(); };
  addPerson();
}
