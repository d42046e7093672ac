// sfumato web UI, part 4: the gallery (with attention maps), the server's history, and reading
// generation parameters back from a PNG's infotext.
"use strict";

/** One image in ``container`` (the gallery by default): its infotext, "Send to img2img",
 * "Send to upscale", "Reuse settings", and the words of its attention maps. */
function addFigure({ b64, src, text, alt, maps, container, flagged, type }) {
  const figure = el("figure");
  const mime = b64 && b64.startsWith("R0lGOD") ? "image/gif" : b64 && b64.startsWith("UklGR") ? "image/webp" : "image/png";
  // a kept MP4 clip plays in a video element; images and GIF / WebP clips in an img
  const img = type === "video/mp4" ? el("video", { src, controls: true, loop: true, muted: true })
    : el("img", { src: src || `data:${mime};base64,${b64}`, alt: alt || "" });
  const original = img.src;
  const caption = el("figcaption");
  const pre = el("pre", { textContent: text || "" });
  const send = el("button", { type: "button", textContent: "Send to img2img" });
  send.onclick = () => { setTab("img2img"); setInit(original); };
  const reuse = el("button", { type: "button", textContent: "Reuse settings" });
  reuse.onclick = () => {
    if (!GEN_TABS.includes(state.tab)) setTab("txt2img");
    readParameters(original);
  };
  const toUpscale = el("button", { type: "button", textContent: "Send to upscale" });
  toUpscale.onclick = () => { setTab("upscale"); setUpscaleSource(original); };
  if (flagged) caption.append(el("p", { className: "flag", textContent: "Flagged by the safety checker" }));
  caption.append(pre);
  if (type !== "video/mp4") caption.append(send, toUpscale, reuse);   // a video is no init image nor PNG info
  if (maps && maps.length) caption.append(attentionWords(img, original, maps));
  figure.append(img, caption);
  (container || $("gallery")).prepend(figure);
  return figure;
}

function attentionWords(img, original, maps) {
  const row = el("div", { className: "words" });
  row.setAttribute("role", "group");
  row.setAttribute("aria-label", "Attention maps");
  const buttons = [];
  const show = (button, src) => {
    img.src = src;
    for (const b of buttons) b.setAttribute("aria-pressed", String(b === button));
  };
  const plain = el("button", { type: "button", textContent: "image" });
  plain.onclick = () => show(plain, original);
  buttons.push(plain);
  for (const { word, image } of maps) {
    const button = el("button", { type: "button", textContent: word, className: "word" });
    button.setAttribute("aria-label", `Attention map of “${word}”`);
    button.onclick = () => show(button, `data:image/png;base64,${image}`);
    buttons.push(button);
  }
  plain.setAttribute("aria-pressed", "true");
  row.append(...buttons);
  return row;
}

/** A job's images; ``plot``: an X/Y/Z plot, whose first image is the grid (with or without an
 * infotext of its own). */
function addToGallery(result, plot = false) {
  const info = JSON.parse(result.info || "{}");
  const texts = info.infotexts || [];
  const maps = result.attention_maps || [];
  const offset = Math.max(0, result.images.length - texts.length);
  // newest first: add the last image first, so the grid ends up on top
  [...result.images.entries()].reverse().forEach(([i, b64]) => {
    const text = texts[i - offset] ?? texts[0] ?? "";
    const grid = plot && i === 0;
    const alt = grid ? "X/Y/Z plot grid" : (info.all_prompts || [])[i - offset] || "";
    addFigure({ b64, text, alt, maps: maps[i], flagged: (result.nsfw || [])[i] });
  });
}

// -- history ------------------------------------------------------------------------------------

async function loadHistory(more = false) {
  if (!more) {
    state.historyOffset = 0;
    $("history-list").replaceChildren();
  }
  const limit = 12;
  try {
    const page = await api("GET", `v1/history?offset=${state.historyOffset}&limit=${limit}`);
    if (!page.enabled) {
      $("history-note").textContent = "This server keeps no history: start it with --outputs-dir to keep every image.";
      $("history-more").hidden = true;
      return;
    }
    $("history-note").textContent = page.items.length || more ? "" : "No images yet.";
    for (const item of page.items) {
      const figure = addFigure({ src: item.url, text: item.parameters || "", alt: item.name,
                                 container: $("history-list"), type: item.type });
      $("history-list").append(figure);      // newest first: keep the server's order
    }
    state.historyOffset += page.items.length;
    $("history-more").hidden = !page.more;
  } catch (e) {
    $("history-note").textContent = e.message;
  }
}

// -- reading parameters back ----------------------------------------------------------------------

const FROM_INFOTEXT = {
  Prompt: "prompt", "Negative prompt": "negative_prompt", Steps: "steps", "CFG scale": "cfg_scale", Seed: "seed",
  "Size-1": "width", "Size-2": "height", "Denoising strength": "denoising_strength",
  "Hires upscale": "hr_scale", "Hires steps": "hr_second_pass_steps", "Hires upscaler": "hr_upscaler",
  "Mask blur": "mask_blur", "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
  "Seed resize from-1": "seed_resize_from_w", "Seed resize from-2": "seed_resize_from_h", ENSD: "eta_noise_seed_delta",
  "Hires prompt": "hr_prompt", "Hires negative prompt": "hr_negative_prompt",
};

async function asDataUrl(src) {
  if (src.startsWith("data:")) return src;
  const blob = await (await fetch(src)).blob();
  return new Promise((resolve) => readFile(blob, resolve));
}

async function readParameters(src) {
  try {
    const info = await api("POST", "sdapi/v1/png-info", { image: await asDataUrl(src) });
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
    if ("Hires upscale" in p) {
      $("enable_hr").checked = true;
      if ("Denoising strength" in p) $("hr_denoising_strength").value = p["Denoising strength"];
    }
    if (sampler) $("sampler_name").value = sampler.value;
    $("scheduler").value = schedule.value;
    setStatus("parameters read from the image");
  } catch (e) {
    setStatus(e.message, true);
  }
}
