// sfumato web UI, part 1: shared state, the API helper, lists and the size presets.
// A plain page that talks only to the server's API (no build step); the scripts share globals.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  tab: "txt2img", job: null, events: null, init: null, masked: false, depth: null, upscale: null,
  native: 64, modelInfo: null, historyOffset: 0, unclip: [null, null],
};
const GEN_TABS = ["txt2img", "img2img", "inpaint", "outpaint", "depth", "variations"];

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error((data && data.detail) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.field = data && data.field;
    throw error;
  }
  return data;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function fillSelect(select, items, value, label = value) {
  select.replaceChildren(...items.map((item) => new Option(label(item), value(item))));
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

function readFile(file, then) {
  const reader = new FileReader();
  reader.onload = () => then(reader.result);
  reader.readAsDataURL(file);
}

const intOf = (id) => parseInt($(id).value, 10);
const floatOf = (id) => parseFloat($(id).value);

// lists that may be missing on an older server: an empty list and a note, not a failure
async function optional(path, fallback) {
  try {
    return await api("GET", path);
  } catch (e) {
    return fallback;
  }
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
  $("hr_sampler_name").replaceChildren(new Option("same", ""), ...samplers.map((s) => new Option(s.name, s.name)));
  $("refiner_checkpoint").replaceChildren(new Option("None", ""), ...models.map((m) => new Option(m.title, m.title)));
  $("hr_checkpoint_name").replaceChildren(new Option("same", ""), ...models.map((m) => new Option(m.title, m.title)));
  await Promise.all([loadModelInfo(), loadNetworks(), loadStyles(), loadControlNetLists(), loadUpscalers(), loadDetectors(),
    loadMotionModules(),
    loadAxes(), loadSamModels()]);
}

// -- size: the model's native resolution and aspect presets ------------------------------------------

async function loadModelInfo() {
  const info = await optional("v1/ui/model", null);
  state.modelInfo = info;
  if (info) state.native = info.width;
  const few = info && info.few_step;
  if (few) {   // a few-step model (Turbo, Lightning, Hyper-SD, LCM): its model card's settings
    $("sampler_name").value = few.sampler;
    $("scheduler").value = few.scheduler;
    $("steps").value = few.steps;
    $("cfg_scale").value = few.cfg_scale;
    setStatus(`few-step model (${few.name}): ${few.sampler}, ${few.scheduler}, ${few.steps} steps, CFG ${few.cfg_scale}`);
  }
  applyAspect();
  noteVariations();
}

/** Width and height near the native area for ``ratio`` ("16:9"): multiples of 64 for models of
 * 512 pixels and more, of 8 for smaller ones. */
function presetSize(native, ratio) {
  const [a, b] = ratio.split(":").map(Number);
  const step = native >= 512 ? 64 : 8;
  const round = (x) => Math.max(step, Math.round(x / step) * step);
  return [round(native * Math.sqrt(a / b)), round(native * Math.sqrt(b / a))];
}

function applyAspect() {
  const [w, h] = presetSize(state.native, $("aspect").value);
  $("width").value = w;
  $("height").value = h;
}
