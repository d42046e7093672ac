// sfumato web UI, part 3: the optional panels — hires fix, refiner, styles, LoRA / embedding /
// hypernetwork picker, ControlNet units, X/Y/Z plot, upscaling — and their parts of a request.
"use strict";

// -- extra networks and styles ----------------------------------------------------------------------

async function loadNetworks() {
  const [loras, embeddings, hypernets] = await Promise.all([
    optional("sdapi/v1/loras", []), optional("sdapi/v1/embeddings", { loaded: {} }),
    optional("sdapi/v1/hypernetworks", []),
  ]);
  const fill = (id, names) => {
    $(id).replaceChildren(...names.map((n) => new Option(n, n)));
    $(id).disabled = names.length === 0;
    if (!names.length) $(id).append(new Option("(none)", ""));
  };
  fill("lora-list", loras.map((l) => l.name));
  fill("embedding-list", Object.keys(embeddings.loaded || {}));
  fill("hypernet-list", hypernets.map((h) => h.name));
}

const NETWORK_TAGS = {
  "lora-list": (name) => `<lora:${name}:1>`,
  "embedding-list": (name) => name,
  "hypernet-list": (name) => `<hypernet:${name}:1>`,
};

/** Insert the chosen network's tag into the prompt at the cursor (at the end if it has no focus). */
function insertNetwork(listId) {
  const name = $(listId).value;
  if (!name) return setStatus("nothing to insert: the list is empty", true);
  const prompt = $("prompt");
  const tag = NETWORK_TAGS[listId](name);
  const at = prompt.selectionStart ?? prompt.value.length;
  const before = prompt.value.slice(0, at), after = prompt.value.slice(at);
  const pad = before && !/\s$/.test(before) ? " " : "";
  prompt.value = `${before}${pad}${tag}${after && !/^\s/.test(after) ? " " : ""}${after}`;
  prompt.selectionStart = prompt.selectionEnd = before.length + pad.length + tag.length;
}

async function loadStyles() {
  try {
    const styles = await api("GET", "sdapi/v1/prompt-styles");
    $("styles").replaceChildren(...styles.map((s) => {
      const option = new Option(s.name, s.name);
      option.title = [s.prompt, s.negative_prompt].filter(Boolean).join("\n");
      return option;
    }));
    $("styles-note").textContent = styles.length ? "" : "no styles: the models folder has no styles.csv";
  } catch (e) {
    $("styles-note").textContent = e.message;
  }
}

const selectedStyles = () => [...$("styles").selectedOptions].map((o) => o.value);

// -- hires fix and refiner --------------------------------------------------------------------------

function hiresFields(r) {
  if (state.tab !== "txt2img" || !$("enable_hr").checked) return;
  Object.assign(r, {
    enable_hr: true, hr_scale: floatOf("hr_scale"), hr_upscaler: $("hr_upscaler").value,
    hr_second_pass_steps: intOf("hr_second_pass_steps"), denoising_strength: floatOf("hr_denoising_strength"),
  });
  if ($("hr_sampler_name").value) r.hr_sampler_name = $("hr_sampler_name").value;
  if ($("hr_prompt").value) r.hr_prompt = $("hr_prompt").value;
  if ($("hr_negative_prompt").value) r.hr_negative_prompt = $("hr_negative_prompt").value;
  if ($("hr_checkpoint_name").value) r.hr_checkpoint_name = $("hr_checkpoint_name").value;
}

function seedFields(r) {
  const strength = floatOf("subseed_strength");
  if (strength > 0) Object.assign(r, { subseed: intOf("subseed"), subseed_strength: strength });
  const [w, h] = [intOf("seed_resize_from_w"), intOf("seed_resize_from_h")];
  if (w > 0 && h > 0) Object.assign(r, { seed_resize_from_w: w, seed_resize_from_h: h });
  const ensd = intOf("eta_noise_seed_delta");
  if (ensd > 0) r.override_settings = { ...(r.override_settings || {}), eta_noise_seed_delta: ensd };
}

function refinerFields(r) {
  if (!$("refiner_checkpoint").value) return;
  r.refiner_checkpoint = $("refiner_checkpoint").value;
  r.refiner_switch_at = floatOf("refiner_switch_at");
}

// -- ControlNet ---------------------------------------------------------------------------------

const controlnet = { modules: ["none"], models: [] };

async function loadControlNetLists() {
  const [modules, models] = await Promise.all([
    optional("controlnet/module_list", { module_list: ["none"] }), optional("controlnet/model_list", { model_list: [] }),
  ]);
  controlnet.modules = modules.module_list;
  controlnet.models = models.model_list;
  for (const unit of document.querySelectorAll(".cn-unit")) fillUnitLists(unit);
}

function fillUnitLists(unit) {
  const module = unit.querySelector(".cn-module"), model = unit.querySelector(".cn-model");
  const [m, k] = [module.value, model.value];
  fillSelect(module, controlnet.modules, (x) => x);
  model.replaceChildren(...(controlnet.models.length ? controlnet.models.map((x) => new Option(x, x))
    : [new Option("(no ControlNet models on the server)", "")]));
  if (m) module.value = m;
  if (k) model.value = k;
}

function renumberUnits() {
  document.querySelectorAll(".cn-unit").forEach((unit, i) => {
    unit.querySelector("legend").textContent = `Unit ${i + 1}`;
  });
}

function addUnit() {
  const unit = $("cn-unit").content.firstElementChild.cloneNode(true);
  $("cn-units").append(unit);
  fillUnitLists(unit);
  renumberUnits();
  const canvas = unit.querySelector(".cn-canvas");
  resetUnitCanvas(unit);
  strokes(canvas, {
    begin: () => true,
    style: (ctx) => { ctx.strokeStyle = "#fff"; ctx.lineWidth = Math.max(1, canvas.width / 32); },
    end: () => markUnitImage(unit),
  });
  unit.querySelector(".cn-file").onchange = (e) => {
    if (e.target.files[0]) readFile(e.target.files[0], (url) => setUnitImage(unit, url));
  };
  unit.querySelector(".cn-frames").onchange = (e) => readFrames(unit, [...e.target.files]);
  unit.querySelector(".cn-clear").onclick = () => resetUnitCanvas(unit);
  unit.querySelector(".cn-remove").onclick = () => { unit.remove(); renumberUnits(); };
  unit.querySelector(".cn-detect").onclick = () => detect(unit);
  return unit;
}

// an AnimateDiff clip's control images, one per frame, in file-name order (sent as batch_images)
async function readFrames(unit, files) {
  files.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  unit.frames = await Promise.all(files.map((f) => new Promise((done) => readFile(f, done))));
  unit.querySelector(".cn-frames-count").textContent = unit.frames.length ? `${unit.frames.length} frames` : "";
  if (unit.frames.length) unit.querySelector(".cn-enabled").checked = true;
}

function resetUnitCanvas(unit) {
  const canvas = unit.querySelector(".cn-canvas");
  canvas.width = Math.max(8, intOf("width") || state.native);
  canvas.height = Math.max(8, intOf("height") || state.native);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  delete unit.dataset.hasImage;
  unit.querySelector(".cn-preview").hidden = true;
}

function setUnitImage(unit, src) {
  const image = new Image();
  image.onload = () => {
    const canvas = unit.querySelector(".cn-canvas");
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    canvas.getContext("2d").drawImage(image, 0, 0);
    markUnitImage(unit);
  };
  image.src = src;
}

// as the extension does: giving a unit an image enables it
function markUnitImage(unit) {
  unit.dataset.hasImage = "1";
  unit.querySelector(".cn-enabled").checked = true;
}

function unitImage(unit) {
  return unit.dataset.hasImage ? unit.querySelector(".cn-canvas").toDataURL("image/png") : null;
}

async function detect(unit) {
  const image = unitImage(unit);
  if (!image) return setStatus("ControlNet: choose or draw a control image first", true);
  const q = (c) => unit.querySelector(c);
  try {
    setStatus("running the preprocessor…");
    const out = await api("POST", "controlnet/detect", {
      controlnet_module: q(".cn-module").value, controlnet_input_images: [image],
      controlnet_processor_res: parseInt(q(".cn-res").value, 10),
      controlnet_threshold_a: parseFloat(q(".cn-ta").value), controlnet_threshold_b: parseFloat(q(".cn-tb").value),
    });
    const preview = q(".cn-preview");
    preview.src = `data:image/png;base64,${out.images[0]}`;
    preview.hidden = false;
    setStatus("preprocessor preview ready");
  } catch (e) {
    setStatus(e.message, true);
  }
}

function controlnetFields(r) {
  const units = [...document.querySelectorAll(".cn-unit")].filter((u) => u.querySelector(".cn-enabled").checked);
  if (!units.length) return;
  const numbers = [...document.querySelectorAll(".cn-unit")];
  for (const unit of units) {   // the server skips a unit without a model, as the extension does: say so first
    if (!unit.querySelector(".cn-model").value) {
      throw new Error(`ControlNet unit ${numbers.indexOf(unit) + 1}: choose a model, or untick Enabled`);
    }
  }
  r.alwayson_scripts = {
    controlnet: {
      args: units.map((unit) => {
        const q = (c) => unit.querySelector(c);
        const args = {
          enabled: true, module: q(".cn-module").value, model: q(".cn-model").value,
          weight: parseFloat(q(".cn-weight").value), guidance_start: parseFloat(q(".cn-start").value),
          guidance_end: parseFloat(q(".cn-end").value), control_mode: parseInt(q(".cn-mode").value, 10),
          resize_mode: parseInt(q(".cn-resize").value, 10), pixel_perfect: q(".cn-pixel").checked,
          processor_res: parseInt(q(".cn-res").value, 10),
          threshold_a: parseFloat(q(".cn-ta").value), threshold_b: parseFloat(q(".cn-tb").value),
        };
        const image = unitImage(unit);
        if (image) args.image = image;
        if (unit.frames && unit.frames.length) args.batch_images = unit.frames;
        return args;
      }),
    },
  };
}

// -- X/Y/Z plot ---------------------------------------------------------------------------------

const AXES = ["x", "y", "z"];

async function loadAxes() {
  const mode = state.tab === "txt2img" ? "txt2img" : "img2img";
  if (state.axesMode === mode) return;
  try {
    const axes = await api("GET", `v1/xyz/axes?mode=${mode}`);
    state.axesMode = mode;
    for (const axis of AXES) {
      const select = $(`xyz-${axis}-type`), kept = select.value;
      select.replaceChildren(...axes.map((a) => {
        const option = new Option(a.label, String(a.index));
        option.disabled = a.supported === false && a.index !== 0;   // "Nothing" stays choosable
        return option;
      }));
      if ([...select.options].some((o) => o.value === kept)) select.value = kept;
    }
    $("xyz-note").textContent = "";
    $("xyz-enable").disabled = false;
  } catch (e) {
    $("xyz-note").textContent = `X/Y/Z plot is not available: ${e.message}`;
    $("xyz-enable").disabled = true;
    $("xyz-enable").checked = false;
  }
}

function xyzFields(r) {
  if (!$("xyz-enable").checked) return;
  const args = [];
  for (const axis of AXES) args.push(intOf(`xyz-${axis}-type`), $(`xyz-${axis}-values`).value, []);
  args.push($("xyz-legend").checked, $("xyz-lone").checked, $("xyz-subgrids").checked, $("xyz-fixed").checked,
    false, false, false, intOf("xyz-margin") || 0, false);
  r.script_name = "x/y/z plot";
  r.script_args = args;
}

// -- upscaling (the extras endpoint) --------------------------------------------------------------

async function loadUpscalers() {
  const upscalers = await optional("sdapi/v1/upscalers", null);
  if (!upscalers) {
    $("upscaler").replaceChildren(new Option("(this server cannot upscale)", ""));
    return;
  }
  const names = upscalers.map((u) => u.name).filter((n) => n !== "None");
  fillSelect($("upscaler"), names, (n) => n);
  if (names.includes("Lanczos")) $("upscaler").value = "Lanczos";
}

async function upscale() {
  if (!state.upscale) return setStatus("choose or drop an image to upscale first", true);
  setStatus("upscaling…");
  $("generate").disabled = true;
  try {
    const out = await api("POST", "sdapi/v1/extra-single-image", {
      image: state.upscale, resize_mode: 0, upscaling_resize: floatOf("upscale-by"), upscaler_1: $("upscaler").value,
    });
    addFigure({ b64: out.image, text: out.html_info || "", alt: "Upscaled image" });
    setStatus("done");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("generate").disabled = false;
  }
}

function setupPanels() {
  for (const id of Object.keys(NETWORK_TAGS)) $(id.replace("-list", "-add")).onclick = () => insertNetwork(id);
  $("cn-add").onclick = addUnit;
  addUnit();
}
