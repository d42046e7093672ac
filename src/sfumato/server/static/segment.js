// sfumato web UI, part 7: Inpaint Anything — click an object on the init image, Segment Anything
// (the server's /sam/sam-predict) masks it; the best-scoring mask, grown by /sam/dilate-mask, becomes
// the inpainting mask (undo, invert and the brush still apply).
"use strict";

const sam = { points: [], busy: false };

async function loadSamModels() {
  const names = await optional("sam/sam-model", []);
  const select = $("sam-model");
  if (!names.length) {
    select.replaceChildren(new Option("(no models in the sam folder)", ""));
    $("sam-click").disabled = true;
    return;
  }
  fillSelect(select, names, (n) => n);
  $("sam-click").disabled = false;
}

/** The mask canvas set from a black/white PNG (white: repaint). */
function setMaskFrom(url) {
  const image = new Image();
  image.onload = () => {
    const canvas = $("mask-canvas");
    const scratch = document.createElement("canvas");
    scratch.width = canvas.width;
    scratch.height = canvas.height;
    const sctx = scratch.getContext("2d", { willReadFrequently: true });
    sctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    const data = sctx.getImageData(0, 0, canvas.width, canvas.height);
    const d = data.data;
    for (let i = 0; i < d.length; i += 4) {
      const on = d[i] > 127;
      d[i] = d[i + 1] = d[i + 2] = 255;
      d[i + 3] = on ? 255 : 0;
    }
    rememberMask();
    maskContext().putImageData(data, 0, 0);
    updateMasked();
  };
  image.src = url;
}

async function segmentAt(e) {
  if (!$("sam-click").checked || !state.init || sam.busy) return;
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const x = Math.round((e.clientX - box.left) * canvas.width / box.width);
  const y = Math.round((e.clientY - box.top) * canvas.height / box.height);
  sam.points.push([x, y, !e.shiftKey]);
  const image = initDataUrl();
  sam.busy = true;
  setStatus("segmenting…");
  try {
    const out = await api("POST", "sam/sam-predict", {
      sam_model_name: $("sam-model").value, input_image: image,
      sam_positive_points: sam.points.filter((p) => p[2]).map((p) => [p[0], p[1]]),
      sam_negative_points: sam.points.filter((p) => !p[2]).map((p) => [p[0], p[1]]),
    });
    const best = out.scores.indexOf(Math.max(...out.scores));
    let maskB64 = out.masks[best];
    const grow = intOf("sam-grow") || 0;
    if (grow > 0) {
      const grown = await api("POST", "sam/dilate-mask", { input_image: image, mask: maskB64, dilate_amount: grow });
      maskB64 = grown.mask;
    }
    setMaskFrom(`data:image/png;base64,${maskB64}`);
    setStatus(`masked (score ${out.scores[best].toFixed(3)}, ${sam.points.length} point${sam.points.length > 1 ? "s" : ""})`);
  } catch (err) {
    sam.points.pop();
    setStatus(err.message, true);
  } finally {
    sam.busy = false;
  }
}

function setupSegment() {
  $("mask-canvas").addEventListener("pointerdown", segmentAt);
  $("sam-reset").onclick = () => {
    sam.points = [];
    clearMask();
    setStatus("new selection");
  };
  // Inpaint Anything's remove: the object's area filled from its surroundings, then repainted
  $("sam-remove").onclick = () => {
    if (!state.masked) return setStatus("remove: click the object (or paint its mask) first", true);
    $("inpainting_fill").value = "0";
    generate();
  };
}
