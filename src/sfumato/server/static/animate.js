// sfumato web UI, part 10: AnimateDiff (the extension's fields): a motion module from the models
// folder's animatediff/ turns the generation into a clip; the gallery plays the GIF it returns.
"use strict";

async function loadMotionModules() {
  const names = await optional("v1/motion-modules", []);
  $("animate-model").replaceChildren(...(names.length ? names.map((m) => new Option(m, m))
    : [new Option("(no motion modules in the models folder's animatediff/)", "")]));
}

function animateFields(r) {
  if (!$("animate-enable").checked) return;
  const model = $("animate-model").value;
  if (!model) throw new Error("AnimateDiff: choose a motion module (files in the models folder's animatediff/)");
  r.batch_size = 1;
  r.n_iter = 1;
  const unit = {
    model, format: ["GIF"], enable: true, video_length: intOf("animate-frames"), fps: intOf("animate-fps"),
    loop_number: 0, closed_loop: $("animate-loop").value, batch_size: intOf("animate-context"), stride: 1, overlap: -1,
  };
  r.alwayson_scripts = { ...(r.alwayson_scripts || {}), AnimateDiff: { args: [unit] } };
}
