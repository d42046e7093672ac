// sfumato web UI, part 2: the init image, the inpainting mask (brush, eraser, invert, undo), the
// depth map and dropped files.
"use strict";

const UNDO_LIMIT = 20;
const mask = { tool: "brush", undo: [] };

function setInit(src) {
  const image = new Image();
  image.onload = () => {
    state.init = image;
    for (const canvas of [$("init-canvas"), $("mask-canvas")]) {
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
    }
    $("init-canvas").getContext("2d").drawImage(image, 0, 0);
    clearMask();
    mask.undo = [];
    $("width").value = Math.floor(image.naturalWidth / 8) * 8;
    $("height").value = Math.floor(image.naturalHeight / 8) * 8;
  };
  image.src = src;
}

function initDataUrl() {
  return $("init-canvas").toDataURL("image/png");
}

function maskContext() {
  return $("mask-canvas").getContext("2d", { willReadFrequently: true });
}

function rememberMask() {
  const canvas = $("mask-canvas");
  mask.undo.push(maskContext().getImageData(0, 0, canvas.width, canvas.height));
  if (mask.undo.length > UNDO_LIMIT) mask.undo.shift();
}

function updateMasked() {
  const canvas = $("mask-canvas");
  const data = maskContext().getImageData(0, 0, canvas.width, canvas.height).data;
  let any = false;
  for (let i = 3; i < data.length && !any; i += 4) any = data[i] > 0;
  state.masked = any;
}

function clearMask() {
  const canvas = $("mask-canvas");
  if (state.masked) rememberMask();
  maskContext().clearRect(0, 0, canvas.width, canvas.height);
  state.masked = false;
}

function undoMask() {
  const last = mask.undo.pop();
  if (!last) return setStatus("nothing to undo");
  maskContext().putImageData(last, 0, 0);
  updateMasked();
}

function invertMask() {
  const canvas = $("mask-canvas");
  rememberMask();
  const ctx = maskContext();
  const image = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const d = image.data;
  for (let i = 0; i < d.length; i += 4) {
    const painted = d[i + 3] > 127;
    d[i] = d[i + 1] = d[i + 2] = 255;
    d[i + 3] = painted ? 0 : 255;
  }
  ctx.putImageData(image, 0, 0);
  updateMasked();
}

function setTool(tool) {
  mask.tool = tool;
  $("tool-brush").setAttribute("aria-pressed", String(tool === "brush"));
  $("tool-eraser").setAttribute("aria-pressed", String(tool === "eraser"));
}

/** The mask as A1111 takes it: white = repaint, on black. */
function maskImage() {
  const canvas = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return out.toDataURL("image/png");
}

/** Free-hand strokes on ``canvas``: ``begin()`` once per stroke (false: refuse it), ``style(ctx)``
 * before each segment, ``end()`` after. */
function strokes(canvas, { begin, style, end }) {
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  let last = null;
  const point = (e) => {
    const box = canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
  };
  const draw = (to) => {
    ctx.save();
    style(ctx);
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...to);
    ctx.stroke();
    ctx.restore();
    last = to;
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (!begin()) return;
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    draw(last);
  });
  canvas.addEventListener("pointermove", (e) => { if (last) draw(point(e)); });
  const stop = () => {
    if (last) end();
    last = null;
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
}

function setupBrush() {
  strokes($("mask-canvas"), {
    begin: () => {
      if (!state.init || $("sam-click").checked) return false;   // a click then selects (segment.js)
      rememberMask();
      return true;
    },
    style: (ctx) => {
      ctx.globalCompositeOperation = mask.tool === "eraser" ? "destination-out" : "source-over";
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = intOf("brush");
    },
    end: updateMasked,
  });
}

function setDepth(src) {
  state.depth = src;
  $("depth-preview").src = src;
  $("depth-preview").hidden = false;
}

function setUpscaleSource(src) {
  state.upscale = src;
  $("upscale-source").src = src;
  $("upscale-source").hidden = false;
}

function setupDrop() {
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    const file = e.dataTransfer.files[0];
    if (!file) return;
    const onCanvas = $("canvas-wrap").contains(e.target);
    const onUpscale = $("upscale-fields").contains(e.target);
    readFile(file, (url) => (onCanvas ? setInit(url) : onUpscale ? setUpscaleSource(url) : readParameters(url)));
  });
}

function setupCanvas() {
  setupBrush();
  setupDrop();
  $("tool-brush").onclick = () => setTool("brush");
  $("tool-eraser").onclick = () => setTool("eraser");
  $("invert-mask").onclick = invertMask;
  $("undo-mask").onclick = undoMask;
  $("clear-mask").onclick = clearMask;
  $("init-file").onchange = (e) => { if (e.target.files[0]) readFile(e.target.files[0], setInit); };
  $("depth-file").onchange = (e) => { if (e.target.files[0]) readFile(e.target.files[0], setDepth); };
  $("upscale-file").onchange = (e) => { if (e.target.files[0]) readFile(e.target.files[0], setUpscaleSource); };
}
