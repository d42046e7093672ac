// sfumato web UI: a plain page that talks only to the server's API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "txt2img", job: null, events: null, init: null, masked: false };

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error((data && data.detail) || `${response.status} ${response.statusText}`);
  return data;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function fillSelect(select, items, value, label = value) {
  select.replaceChildren(...items.map((item) => new Option(label(item), value(item))));
}

async function loadLists() {
  const [models, samplers, schedulers, options] = await Promise.all([
    api("GET", "sdapi/v1/sd-models"), api("GET", "sdapi/v1/samplers"),
    api("GET", "sdapi/v1/schedulers"), api("GET", "sdapi/v1/options"),
  ]);
  fillSelect($("model"), models, (m) => m.title);
  $("model").value = options.sd_model_checkpoint;
  fillSelect($("sampler_name"), samplers, (s) => s.name);
  $("sampler_name").value = "Euler a";
  fillSelect($("scheduler"), schedulers, (s) => s.name, (s) => s.label);
}

// -- the request --------------------------------------------------------------------------------

const NUMBERS = ["steps", "seed", "width", "height", "batch_size", "n_iter"];

function buildRequest() {
  const r = {
    mode: state.mode, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    cfg_scale: parseFloat($("cfg_scale").value),
  };
  for (const id of NUMBERS) r[id] = parseInt($(id).value, 10);
  if (state.mode === "img2img") {
    if (!state.init) throw new Error("choose or drop an init image first");
    r.init_images = [state.init.src];
    r.denoising_strength = parseFloat($("denoising_strength").value);
    for (const side of ["left", "right", "up", "down"]) {
      r[`outpaint_${side}`] = parseInt($(`outpaint_${side}`).value, 10) || 0;
    }
    if (["left", "right", "up", "down"].some((side) => r[`outpaint_${side}`])) {
      delete r.width;                       // the server sizes the grown canvas itself
      delete r.height;
    }
    if (state.masked) {
      r.mask = maskImage();
      r.mask_blur = parseInt($("mask_blur").value, 10);
      r.inpainting_fill = parseInt($("inpainting_fill").value, 10);
      r.inpaint_full_res = $("inpaint_full_res").checked;
      r.inpaint_full_res_padding = parseInt($("inpaint_full_res_padding").value, 10);
    }
  }
  return r;
}

async function generate() {
  let request;
  try {
    request = buildRequest();
  } catch (e) {
    return setStatus(e.message, true);
  }
  try {
    const job = await api("POST", "v1/jobs", request);
    state.job = job.id;
    $("generate").disabled = true;
    $("interrupt").disabled = false;
    follow(job.id);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function follow(id) {
  const events = new EventSource(`v1/jobs/${id}/events`);
  state.events = events;
  events.addEventListener("progress", (e) => {
    const job = JSON.parse(e.data);
    $("progress").value = job.progress.progress;
    if (job.status === "queued") setStatus(`queued (${job.position} ahead)`);
    else setStatus(`${job.progress.stage || "starting"} step ${job.progress.step}/${job.progress.steps}` +
      (job.progress.n_iter > 1 ? ` · batch ${job.progress.iteration + 1}/${job.progress.n_iter}` : ""));
    if (job.current_image) {
      $("preview").src = `data:image/png;base64,${job.current_image}`;
      $("preview").hidden = false;
    }
  });
  events.addEventListener("end", (e) => {
    const job = JSON.parse(e.data);
    finish();
    if (job.result) addToGallery(job.result);
    if (job.status === "failed") setStatus(job.error.detail, true);
    else setStatus(job.status);
  });
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) {
      finish();
      setStatus("lost the connection to the server", true);
    }
  };
}

function finish() {
  if (state.events) state.events.close();
  state.events = state.job = null;
  $("generate").disabled = false;
  $("interrupt").disabled = true;
  $("progress").value = 0;
  $("preview").hidden = true;
}

async function interrupt() {
  if (!state.job) return;
  try {
    await api("POST", `v1/jobs/${state.job}/interrupt`);   // keeps the images made so far
  } catch (e) {
    setStatus(e.message, true);
  }
}

// -- gallery ------------------------------------------------------------------------------------

function addToGallery(result) {
  const info = JSON.parse(result.info);
  result.images.forEach((b64, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${b64}`;
    img.alt = info.all_prompts[i] || "";
    const caption = document.createElement("figcaption");
    const text = document.createElement("pre");
    text.textContent = info.infotexts[i];
    const use = document.createElement("button");
    use.textContent = "Use as init";
    use.onclick = () => { setMode("img2img"); setInit(img.src); };
    const reuse = document.createElement("button");
    reuse.textContent = "Reuse settings";
    reuse.onclick = () => readParameters(img.src);
    caption.append(text, use, reuse);
    figure.append(img, caption);
    $("gallery").prepend(figure);
  });
}

// -- reading parameters back ----------------------------------------------------------------------

const FROM_INFOTEXT = {
  Prompt: "prompt", "Negative prompt": "negative_prompt", Steps: "steps", "CFG scale": "cfg_scale", Seed: "seed",
  "Size-1": "width", "Size-2": "height", "Denoising strength": "denoising_strength",
};

async function readParameters(dataUrl) {
  try {
    const info = await api("POST", "sdapi/v1/png-info", { image: dataUrl });
    if (!info.info) return setStatus("this image carries no generation parameters", true);
    const p = info.parameters;
    const samplers = [...$("sampler_name").options], schedules = [...$("scheduler").options];
    let name = p.Sampler, type = p["Schedule type"] || "Automatic";
    // before A1111 1.9 the schedule rode in the sampler's name: "DPM++ 2M Karras"
    const legacy = schedules.find((o) => name && !p["Schedule type"] && name.endsWith(` ${o.text}`));
    if (legacy && !samplers.some((o) => o.value === name)) [name, type] = [name.slice(0, -legacy.text.length - 1), legacy.text];
    const sampler = samplers.find((o) => o.value === name);
    const schedule = schedules.find((o) => o.text === type);
    if (name && !sampler) return setStatus(`unknown sampler in the image: ${name}`, true);
    if (!schedule) return setStatus(`unknown schedule type in the image: ${type}`, true);
    for (const [key, id] of Object.entries(FROM_INFOTEXT)) if (key in p) $(id).value = p[key];
    if (sampler) $("sampler_name").value = sampler.value;
    $("scheduler").value = schedule.value;
    setStatus("parameters read from the image");
  } catch (e) {
    setStatus(e.message, true);
  }
}

// -- init image and mask brush ------------------------------------------------------------------

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
    $("width").value = Math.floor(image.naturalWidth / 8) * 8;
    $("height").value = Math.floor(image.naturalHeight / 8) * 8;
  };
  image.src = src;
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.masked = false;
}

function maskImage() {
  const canvas = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);              // the strokes are white: white = repaint
  return out.toDataURL("image/png");
}

function setupBrush() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  let last = null;
  const point = (e) => {
    const box = canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (!state.init) return;
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    draw(last);
  });
  canvas.addEventListener("pointermove", (e) => { if (last) draw(point(e)); });
  canvas.addEventListener("pointerup", () => { last = null; });
  function draw(to) {
    ctx.strokeStyle = "#fff";
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = parseInt($("brush").value, 10);
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...to);
    ctx.stroke();
    last = to;
    state.masked = true;
  }
}

function readFile(file, then) {
  const reader = new FileReader();
  reader.onload = () => then(reader.result);
  reader.readAsDataURL(file);
}

// -- wiring -------------------------------------------------------------------------------------

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll(".tabs button")) tab.classList.toggle("active", tab.dataset.mode === mode);
  $("img2img-fields").hidden = mode !== "img2img";
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
    readFile(file, (url) => (onCanvas ? setInit(url) : readParameters(url)));
  });
}

async function changeModel() {
  setStatus("loading model…");
  $("model").disabled = true;
  try {
    await api("POST", "sdapi/v1/options", { sd_model_checkpoint: $("model").value });
    setStatus("model loaded");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("model").disabled = false;
  }
}

for (const tab of document.querySelectorAll(".tabs button")) tab.onclick = () => setMode(tab.dataset.mode);
$("generate").onclick = generate;
$("interrupt").onclick = interrupt;
$("clear-mask").onclick = clearMask;
$("model").onchange = changeModel;
$("init-file").onchange = (e) => { if (e.target.files[0]) readFile(e.target.files[0], setInit); };
setupBrush();
setupDrop();
loadLists().then(() => setStatus("ready"), (e) => setStatus(e.message, true));
