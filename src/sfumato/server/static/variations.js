// sfumato web UI, part 6: the variations panel (Stable unCLIP): up to two images whose CLIP
// embeddings, summed by weight, condition a txt2img job (the request's unclip_images).
"use strict";

function setUnclipImage(k, url) {
  state.unclip[k] = url;
  const thumb = $(`unclip-thumb-${k}`);
  thumb.hidden = !url;
  if (url) thumb.src = url;
  else thumb.removeAttribute("src");
}

function variationFields(r) {
  const images = [];
  state.unclip.forEach((url, k) => {
    if (url) images.push({ image: url, weight: floatOf(`unclip-weight-${k}`) });
  });
  if (!images.length) throw new Error("variations: choose an image first");
  r.unclip_images = images;
  r.unclip_noise_level = intOf("unclip_noise_level");
}

/** The panel's note says when the loaded model cannot take image embeddings. */
function noteVariations() {
  const info = state.modelInfo;
  const ok = !info || info.unclip;
  $("unclip-note").classList.toggle("error", !ok);
  $("unclip-note").textContent = ok
    ? "The images' CLIP embeddings, summed by weight, condition the model; the prompt is optional. " +
      "A higher noise level keeps less of the images."
    : `The loaded model (${info.family}) takes no image embedding: choose a Stable unCLIP checkpoint ` +
      "(bundled-unclip ships with sfumato) in the model list.";
}

function setupVariations() {
  for (const k of [0, 1]) {
    $(`unclip-file-${k}`).onchange = (e) => {
      if (e.target.files[0]) readFile(e.target.files[0], (url) => setUnclipImage(k, url));
    };
  }
  $("unclip-clear").onclick = () => {
    for (const k of [0, 1]) {
      setUnclipImage(k, null);
      $(`unclip-file-${k}`).value = "";
    }
  };
}
