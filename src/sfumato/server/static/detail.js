// sfumato web UI, part 9: the detail pass (the ADetailer extension's fields): a detector from the
// models folder's adetailer/ finds regions of each finished image, each inpainted again (only masked).
"use strict";

async function loadDetectors() {
  const out = await optional("adetailer/v1/ad_model", { ad_model: [] });
  const models = out.ad_model;
  $("ad_model").replaceChildren(...(models.length ? models.map((m) => new Option(m, m))
    : [new Option("(no detectors in the models folder's adetailer/)", "")]));
}

function detailFields(r) {
  if (!$("ad_enable").checked) return;
  const model = $("ad_model").value;
  if (!model) throw new Error("detail pass: choose a detector (YOLO ONNX files in the models folder's adetailer/)");
  const tab = {
    ad_model: model, ad_prompt: $("ad_prompt").value, ad_negative_prompt: $("ad_negative_prompt").value,
    ad_denoising_strength: floatOf("ad_denoising_strength"), ad_confidence: floatOf("ad_confidence"),
    ad_inpaint_only_masked_padding: intOf("ad_inpaint_only_masked_padding"),
    ad_dilate_erode: intOf("ad_dilate_erode"), ad_mask_k_largest: intOf("ad_mask_k_largest"),
  };
  r.alwayson_scripts = { ...(r.alwayson_scripts || {}), ADetailer: { args: [true, false, tab] } };
}
