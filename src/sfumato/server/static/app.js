// sfumato web UI, part 5: the request, the job (progress, live preview, time left, interrupt), the
// panels (tabs) and the wiring. Loaded last: it uses the other scripts' functions.
"use strict";

const NUMBERS = ["steps", "seed", "width", "height", "batch_size", "n_iter"];
const SIDES = ["left", "right", "up", "down"];

function buildRequest() {
  const tab = state.tab;
  const r = {
    mode: tab === "txt2img" || tab === "variations" ? "txt2img" : "img2img", prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value, sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value, cfg_scale: floatOf("cfg_scale"),
  };
  for (const id of NUMBERS) r[id] = intOf(id);
  const styles = selectedStyles();
  if (styles.length) r.styles = styles;
  if (r.mode === "img2img") img2imgFields(r);
  if (tab === "variations") variationFields(r);
  hiresFields(r);
  seedFields(r);
  refinerFields(r);
  controlnetFields(r);
  detailFields(r);
  animateFields(r);
  xyzFields(r);
  if ($("attention_maps").checked) r.attention_maps = true;
  return r;
}

function img2imgFields(r) {
  const tab = state.tab;
  if (!state.init) throw new Error("choose or drop an init image first");
  r.init_images = [initDataUrl()];
  r.denoising_strength = floatOf("denoising_strength");
  if (tab === "outpaint") {
    for (const side of SIDES) r[`outpaint_${side}`] = intOf(`outpaint_${side}`) || 0;
    if (!SIDES.some((side) => r[`outpaint_${side}`])) throw new Error("outpaint: give at least one side a width");
    delete r.width;                       // the server sizes the grown canvas itself
    delete r.height;
    r.mask_blur = intOf("mask_blur");
  }
  if (tab === "inpaint") {
    if (!state.masked) throw new Error("inpaint: paint the area to repaint on the image first");
    Object.assign(r, {
      mask: maskImage(), mask_blur: intOf("mask_blur"), inpainting_fill: intOf("inpainting_fill"),
      inpaint_full_res: $("inpaint_full_res").checked, inpaint_full_res_padding: intOf("inpaint_full_res_padding"),
      inpainting_mask_invert: $("inpainting_mask_invert").checked ? 1 : 0,
    });
  }
  if (tab === "depth") {
    const infers = state.modelInfo && state.modelInfo.depth_estimator;   // a depth checkpoint carrying MiDaS
    if (!state.depth && !infers) {
      throw new Error("depth: choose a depth map image first (a depth checkpoint that carries its MiDaS infers it)");
    }
    if (state.depth) r.depth_map = state.depth;
  }
}

async function generate() {
  if (state.job || $("generate").disabled) return;
  if (state.tab === "upscale") return upscale();
  if (state.tab === "history" || state.tab === "pose") return;
  let request;
  try {
    request = buildRequest();
  } catch (e) {
    return setStatus(e.message, true);
  }
  try {
    $("generate").disabled = true;
    const job = await api("POST", "v1/jobs", request);
    state.job = job.id;
    state.plot = Boolean(request.script_name);
    $("interrupt").disabled = false;
    setStatus("queued");
    follow(job.id);
  } catch (e) {
    $("generate").disabled = false;
    setStatus(e.message, true);
  }
}

function timeLeft(seconds) {
  if (!(seconds > 0)) return "";
  return seconds < 60 ? ` · ${Math.ceil(seconds)} s left` : ` · ${Math.floor(seconds / 60)} min ${Math.ceil(seconds % 60)} s left`;
}

function follow(id) {
  const events = new EventSource(`v1/jobs/${id}/events`);
  state.events = events;
  events.addEventListener("progress", (e) => {
    const job = JSON.parse(e.data);
    const p = job.progress;
    $("progress").value = p.progress;
    if (job.status === "queued") setStatus(`queued (${job.position} ahead)`);
    else setStatus(`${p.stage || "starting"} step ${p.step}/${p.steps}` +
      (p.n_iter > 1 ? ` · batch ${p.iteration + 1}/${p.n_iter}` : "") + timeLeft(p.eta_relative));
    if (job.current_image) {
      $("preview").src = `data:image/png;base64,${job.current_image}`;
      $("preview").hidden = false;
    }
  });
  events.addEventListener("end", (e) => {
    const job = JSON.parse(e.data);
    finish();
    if (job.result) addToGallery(job.result, state.plot);
    if (state.tab === "history") loadHistory();
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

// -- panels -------------------------------------------------------------------------------------

const LEGENDS = {
  img2img: "Init image", inpaint: "Init image — paint the area to repaint", outpaint: "Image to extend",
  depth: "Init image (with a depth map below)",
};

function setTab(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll(".tabs button")) {
    const on = button.dataset.mode === tab;
    button.classList.toggle("active", on);
    button.setAttribute("aria-pressed", String(on));
  }
  const generating = GEN_TABS.includes(tab);
  $("gen-fields").hidden = !generating;
  $("img2img-fields").hidden = !generating || tab === "txt2img" || tab === "variations";
  $("upscale-fields").hidden = tab !== "upscale";
  $("pose-fields").hidden = tab !== "pose";
  $("actions").hidden = $("progress").hidden = tab === "history" || tab === "pose";
  $("generate").textContent = tab === "upscale" ? "Upscale" : "Generate";
  for (const part of document.querySelectorAll("[data-only]")) part.hidden = part.dataset.only !== tab;
  if (LEGENDS[tab]) $("init-legend").textContent = LEGENDS[tab];
  $("gallery").hidden = tab === "history";
  $("history").hidden = tab !== "history";
  if (tab === "history") loadHistory();
  if (generating) loadAxes();
}

async function changeModel() {
  setStatus("loading model…");
  $("model").disabled = true;
  try {
    await api("POST", "sdapi/v1/options", { sd_model_checkpoint: $("model").value });
    await loadModelInfo();
    await loadNetworks();
    setStatus("model loaded");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("model").disabled = false;
  }
}

for (const tab of document.querySelectorAll(".tabs button")) tab.onclick = () => setTab(tab.dataset.mode);
$("generate").onclick = generate;
$("interrupt").onclick = interrupt;
$("model").onchange = changeModel;
$("aspect").onchange = applyAspect;
$("history-more").onclick = () => loadHistory(true);
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    generate();
  }
});
setupCanvas();
setupPanels();
setupVariations();
setupSegment();
setupPose();
setTab("txt2img");
loadLists().then(() => setStatus("ready"), (e) => setStatus(e.message, true));
