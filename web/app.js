// The page of dmx serve. It calls the same endpoints as any client: A1111's /sdapi/v1/* for generation, inpainting,
// progress and cancel, dmx's /dmx/v1/* for what A1111 has no API for (docs/serve.md). No framework, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
const toDataUrl = (b64) => (b64.startsWith("data:") ? b64 : "data:image/png;base64," + b64);
const toBase64 = (url) => url.replace(/^data:[^,]*,/, "");

// ---- HTTP and status ---------------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("token").value) h["Authorization"] = "Bearer " + $("token").value;
  return h;
}

// A refusal comes back as {error, field, rule, value, detail}: the message shows the status, the field and the detail.
async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) {
    const detail = j.detail || j.error || r.statusText;
    const field = j.field && !detail.startsWith(j.field) ? j.field + ": " : "";
    throw new Error(r.status + " " + path + ": " + field + detail);
  }
  return j;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// ---- lists: models, samplers, ControlNets ------------------------------------------------------------------------

function fillSelect(select, names, empty) {
  select.innerHTML = "";
  for (const n of names) select.add(new Option(n, n));
  if (!names.length) select.add(new Option(empty, ""));
}

async function loadLists() {
  status("");
  try {
    const [models, samplers, options] = await Promise.all([
      api("GET", "/sdapi/v1/sd-models"), api("GET", "/sdapi/v1/samplers"), api("GET", "/sdapi/v1/options")]);
    $("model").innerHTML = "";
    $("sampler_name").length = 1;  // keeps "model's own"
    for (const m of models) {
      const o = new Option(m.model_name, m.title);
      o.selected = m.title === options.sd_model_checkpoint;
      $("model").add(o);
    }
    for (const s of samplers) {
      const o = new Option(s.name, s.name);
      o.dataset.dmx = s.aliases[0] || s.name;  // dmx's own scheduler name, for /dmx/v1/*
      $("sampler_name").add(o);
    }
    $("model-info").textContent = options.sd_model_checkpoint;
  } catch (e) {
    status(e.message, true);
  }
  // dmx's own list: ControlNets and the models of each kind (upscalers, unCLIP).
  let dmx = { models: [], controlnets: [] };
  try {
    dmx = await api("GET", "/dmx/v1/models");
  } catch (e) { /* an older server: these panels stay empty */ }
  const ofKind = (k) => dmx.models.filter((m) => m.kind === k).map((m) => m.name);
  fillSelect($("cn-model"), dmx.controlnets.map((c) => c.name), "(no ControlNet in the models folder)");
  fillSelect($("up-model"), ofKind("upscaler"), "(no upscaler in the models folder)");
  fillSelect($("var-model"), ofKind("unclip-img2img"), "(no unCLIP img2img model in the models folder)");
}

$("model").addEventListener("change", async () => {
  status("loading " + $("model").value + " ...");
  try {
    const r = await api("POST", "/sdapi/v1/options", { sd_model_checkpoint: $("model").value });
    $("model-info").textContent = r.sd_model_checkpoint;
    status("loaded in " + r.load_seconds.toFixed(2) + " s");
  } catch (e) {
    status(e.message, true);
  }
});

// ---- the parameters on the left, in A1111's names and in dmx's -----------------------------------------------------

function numberField(id) {
  const v = $(id).value;
  return v === "" ? undefined : Number(v);
}

function a1111Params() {
  const sampler = $("sampler_name").value;
  return {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, steps: numberField("steps"),
    cfg_scale: numberField("cfg_scale"), seed: numberField("seed"), width: numberField("width"),
    height: numberField("height"), sampler_name: sampler || undefined,
  };
}

function dmxParams() {
  const o = $("sampler_name").selectedOptions[0];
  return {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, steps: numberField("steps"),
    guidance_scale: numberField("cfg_scale"), seed: numberField("seed"), width: numberField("width"),
    height: numberField("height"), scheduler: o && o.value ? o.dataset.dmx : undefined,
  };
}

// ---- one job at a time: progress, preview, cancel -------------------------------------------------------------------

let running = false;  // a poll answered after its job ended must not overwrite the job's result
async function poll() {
  try {
    const p = await api("GET", "/sdapi/v1/progress");
    if (!running) return;
    if (p.progress > 0) $("progress").value = p.progress;
    if (p.current_image) $("preview").src = toDataUrl(p.current_image);
    if (p.textinfo) status(p.textinfo + (p.eta_relative > 0 ? ", eta " + p.eta_relative.toFixed(1) + " s" : ""));
  } catch (e) { /* the next poll tries again */ }
}

async function runJob(label, call) {
  const buttons = document.querySelectorAll("button.run");
  buttons.forEach((b) => (b.disabled = true));
  $("cancel").disabled = false;
  $("progress").value = 0;
  $("preview").removeAttribute("src");
  status(label + ": queued");
  running = true;
  const timer = setInterval(poll, 250);
  try {
    await call();
  } catch (e) {
    status(label + ": " + e.message, true);
  } finally {
    running = false;
    clearInterval(timer);
    buttons.forEach((b) => (b.disabled = false));
    $("cancel").disabled = true;
  }
}

// Puts a response's pictures into the gallery (names: a caption line per picture) and says how it went. The caption
// is A1111's infotext of the picture (/sdapi) or the job's parameters text (/dmx/v1).
function showResult(label, r, names) {
  const info = typeof r.info === "string" ? JSON.parse(r.info) : r.info || {};  // A1111's info is a JSON string
  (r.images || []).forEach((b64, i) => {
    const params = (info.infotexts && info.infotexts[i]) || (typeof info.parameters === "string" && info.parameters);
    const text = (names ? names[i] + "\n" : "") + (params || label);
    const seed = info.all_seeds ? info.all_seeds[i] : info.seeds ? info.seeds[i] : info.seed;
    addToGallery(b64, text, seed);
  });
  const ignored = (info.ignored_fields || []).length ? " (ignored: " + info.ignored_fields.join(", ") + ")" : "";
  status(label + ": " + (info.interrupted ? "interrupted" : "done") + ignored);
  $("progress").value = 1;
}

$("cancel").addEventListener("click", () => api("POST", "/sdapi/v1/interrupt").catch((e) => status(e.message, true)));

// ---- gallery -----------------------------------------------------------------------------------------------------

function addToGallery(b64, text, seed) {
  const f = document.createElement("figure");
  const img = new Image();
  img.className = "px";
  img.src = toDataUrl(b64);
  const c = document.createElement("figcaption");
  c.textContent = text;
  const actions = document.createElement("div");
  actions.className = "actions";
  const button = (name, onclick) => {
    const b = document.createElement("button");
    b.textContent = name;
    b.onclick = onclick;
    actions.append(b);
  };
  if (seed === undefined) seed = (/Seed: (\d+)/.exec(text) || [])[1];
  button("reuse seed", () => { if (seed !== undefined) $("seed").value = seed; });
  button("send to edit", () => { setEditPicture(img.src); $("edit-panel").open = true; });
  button("ControlNet", () => { $("cn-image").src = img.src; $("controlnet-panel").open = true; });
  button("upscale", () => { $("up-image").src = img.src; $("upscale-panel").open = true; });
  button("variations", () => { $("var-image").src = img.src; $("variations-panel").open = true; });
  f.append(img, c, actions);
  $("gallery").prepend(f);
}

// A file input shows its picture in an <img> (as a data: URL, sent as it is).
function readFile(input, onload) {
  input.addEventListener("change", () => {
    const file = input.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => onload(reader.result);
    reader.readAsDataURL(file);
  });
}

function pictureOf(img, what) {
  if (!img.getAttribute("src")) throw new Error("no " + what + ": upload one or send one from the gallery");
  return img.src;
}

// ---- generate (txt2img, with ControlNet when enabled) -------------------------------------------------------------

$("generate").addEventListener("click", () => runJob("txt2img", async () => {
  const body = a1111Params();
  if ($("cn-enabled").checked) {
    body.alwayson_scripts = { controlnet: { args: [{
      model: $("cn-model").value, image: pictureOf($("cn-image"), "control picture"), module: $("cn-module").value,
      weight: numberField("cn-weight"), guidance_start: numberField("cn-start"), guidance_end: numberField("cn-end"),
      threshold_a: numberField("canny_low"), threshold_b: numberField("canny_high"),
    }] } };
  }
  showResult("txt2img", await api("POST", "/sdapi/v1/txt2img", body));
}));

// ---- edit panel: the picture and its mask --------------------------------------------------------------------------
// The mask canvas has the picture's own size and CSS scales it over the picture. On screen the painted part is red
// (opaque) over a transparent rest; what is sent is the mask as the server reads it: white = may change, black = kept.

const mask = $("mask-canvas");
const maskCtx = mask.getContext("2d");
const MASK_RGB = [244, 63, 94];

function clearMask() {
  maskCtx.clearRect(0, 0, mask.width, mask.height);
}

// Replaces the mask by f(painted 0..255) for each pixel (invert, DiffEdit's mask).
function setMaskAlpha(f) {
  const d = maskCtx.getImageData(0, 0, mask.width, mask.height);
  for (let i = 0; i < d.data.length; i += 4) {
    d.data.set(MASK_RGB, i);
    d.data[i + 3] = f(d.data[i + 3], i);
  }
  maskCtx.putImageData(d, 0, 0);
}

function setEditPicture(src) {
  const img = $("edit-image");
  img.onload = () => {
    mask.width = img.naturalWidth;
    mask.height = img.naturalHeight;
    clearMask();
    const brush = Math.max(1, Math.round(img.naturalWidth / 8));
    $("brush").max = Math.max(8, img.naturalWidth / 2);
    $("brush").value = brush;
    $("brush-value").value = brush;
  };
  img.src = src;
}
readFile($("edit-file"), setEditPicture);

$("brush").addEventListener("input", () => ($("brush-value").value = $("brush").value));

let last = null;  // the pointer's previous position while painting, in mask pixels
function maskPoint(e) {
  const r = mask.getBoundingClientRect();
  return { x: ((e.clientX - r.left) * mask.width) / r.width, y: ((e.clientY - r.top) * mask.height) / r.height };
}

function paintTo(p) {
  maskCtx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  maskCtx.fillStyle = maskCtx.strokeStyle = `rgb(${MASK_RGB})`;
  maskCtx.lineWidth = Number($("brush").value);
  maskCtx.lineCap = "round";
  maskCtx.beginPath();
  maskCtx.arc(p.x, p.y, maskCtx.lineWidth / 2, 0, 2 * Math.PI);
  maskCtx.fill();
  if (last) {
    maskCtx.beginPath();
    maskCtx.moveTo(last.x, last.y);
    maskCtx.lineTo(p.x, p.y);
    maskCtx.stroke();
  }
  maskCtx.globalCompositeOperation = "source-over";
  last = p;
}

mask.addEventListener("pointerdown", (e) => {
  mask.setPointerCapture(e.pointerId);
  last = null;
  paintTo(maskPoint(e));
});
mask.addEventListener("pointermove", (e) => { if (last) paintTo(maskPoint(e)); });
mask.addEventListener("pointerup", () => (last = null));
mask.addEventListener("pointercancel", () => (last = null));

$("mask-clear").addEventListener("click", clearMask);
$("mask-invert").addEventListener("click", () => setMaskAlpha((a) => 255 - a));

// The mask as the server reads it: white (painted at least half) on black, the picture's size.
function maskCanvas() {
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const ctx = out.getContext("2d");
  const d = maskCtx.getImageData(0, 0, mask.width, mask.height);
  for (let i = 0; i < d.data.length; i += 4) {
    const v = d.data[i + 3] >= 128 ? 255 : 0;
    d.data.set([v, v, v, 255], i);
  }
  ctx.putImageData(d, 0, 0);
  return out;
}

// The mask as base64 PNG; an all-black mask would change nothing, so it is refused here.
function maskBase64() {
  const c = maskCanvas();
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let painted = false;
  for (let i = 0; i < d.length && !painted; i += 4) painted = d[i] === 255;
  if (!painted) throw new Error("the mask is empty: paint where the picture may change");
  return toBase64(c.toDataURL("image/png"));
}

function editPicture() {
  return pictureOf($("edit-image"), "picture to edit");
}

// The picture's own size, so that the mask and the result match it.
function editSize() {
  return { width: $("edit-image").naturalWidth, height: $("edit-image").naturalHeight };
}

$("run-inpaint").addEventListener("click", () => runJob("inpaint", async () => {
  const body = { ...a1111Params(), ...editSize(), init_images: [toBase64(editPicture())], mask: maskBase64(),
                 denoising_strength: numberField("strength") };
  showResult("inpaint", await api("POST", "/sdapi/v1/img2img", body));
}));

$("run-blended").addEventListener("click", () => runJob("blended " + $("background").value, async () => {
  const body = { ...dmxParams(), ...editSize(), init_image: toBase64(editPicture()), mask: maskBase64(),
                 background: $("background").value, strength: numberField("strength") };
  showResult("blended " + $("background").value, await api("POST", "/dmx/v1/generate", body));
}));

$("run-diffedit").addEventListener("click", () => runJob("DiffEdit", async () => {
  const p = dmxParams();
  const body = { image: toBase64(editPicture()), source_prompt: $("diffedit-source").value, target_prompt: p.prompt,
                 negative_prompt: p.negative_prompt, steps: p.steps, guidance_scale: p.guidance_scale, seed: p.seed };
  const r = await api("POST", "/dmx/v1/diffedit", body);
  showResult("DiffEdit", r);
  if (r.mask) {  // DiffEdit's own mask, drawn on the canvas (it can be touched up and used for inpainting)
    const m = new Image();
    m.onload = () => {  // its gray level becomes the painted amount
      const c = document.createElement("canvas");
      c.width = mask.width;
      c.height = mask.height;
      c.getContext("2d").drawImage(m, 0, 0, c.width, c.height);
      const gray = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      setMaskAlpha((a, i) => gray[i]);
    };
    m.src = toDataUrl(r.mask);
  }
}));

// ---- ControlNet ----------------------------------------------------------------------------------------------------

readFile($("cn-file"), (url) => ($("cn-image").src = url));
$("cn-preview").addEventListener("click", () => runJob("Canny", async () => {
  const body = { image: toBase64(pictureOf($("cn-image"), "control picture")), canny_low: numberField("canny_low"),
                 canny_high: numberField("canny_high") };
  const r = await api("POST", "/dmx/v1/canny", body);
  $("cn-map").src = toDataUrl(r.image);
  status("Canny: done");
}));

// ---- Prompt-to-Prompt -----------------------------------------------------------------------------------------
// Each word of the edit prompt gets a slider; in mode reweight the words not at 1 are sent as reweight "WORD=SCALE".

const weights = new Map();
function buildWords() {
  const words = [...new Set($("p2p-edit").value.split(/[\s,.;:!?]+/).filter((w) => w))];
  $("p2p-words").innerHTML = "";
  for (const w of words) {
    const label = document.createElement("label");
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: 0, max: 3, step: 0.1, value: weights.get(w) || 1 });
    slider.dataset.word = w;
    const out = document.createElement("output");
    out.value = slider.value;
    slider.addEventListener("input", () => { weights.set(w, Number(slider.value)); out.value = slider.value; });
    label.append(w, slider, out);
    $("p2p-words").append(label);
  }
}
$("p2p-edit").addEventListener("input", buildWords);
buildWords();

let p2pImage = null;
readFile($("p2p-file"), (url) => (p2pImage = url));

$("run-p2p").addEventListener("click", () => runJob("Prompt-to-Prompt", async () => {
  const p = dmxParams();
  const reweight = $("p2p-mode").value !== "reweight" ? undefined
                 : [...$("p2p-words").querySelectorAll("input")].filter((s) => Number(s.value) !== 1)
                                                                .map((s) => s.dataset.word + "=" + s.value);
  const body = { prompt: $("p2p-prompt").value, edit_prompt: $("p2p-edit").value, mode: $("p2p-mode").value,
                 reweight, cross_replace_steps: numberField("p2p-cross"), self_replace_steps: numberField("p2p-self"),
                 steps: p.steps, guidance_scale: p.guidance_scale, seed: p.seed, width: p.width, height: p.height };
  if (p2pImage) {
    body.image = toBase64(p2pImage);
    body.null_text_inversion = $("p2p-nti").checked;
  }
  const r = await api("POST", "/dmx/v1/p2p", body);
  $("p2p-source").src = toDataUrl(r.images[0]);
  $("p2p-result").src = toDataUrl(r.images[1]);
  if (r.attention_maps) $("p2p-maps").src = toDataUrl(r.attention_maps);
  showResult("Prompt-to-Prompt", r, ["Prompt-to-Prompt source", "Prompt-to-Prompt edit"]);
}));

// ---- upscale and variations --------------------------------------------------------------------------------------

readFile($("up-file"), (url) => ($("up-image").src = url));
$("run-upscale").addEventListener("click", () => runJob("upscale", async () => {
  const p = dmxParams();
  const body = { model: $("up-model").value, image: toBase64(pictureOf($("up-image"), "picture to upscale")),
                 prompt: p.prompt, negative_prompt: p.negative_prompt, steps: p.steps,
                 guidance_scale: p.guidance_scale, seed: p.seed };
  showResult("upscale", await api("POST", "/dmx/v1/upscale", body));
}));

readFile($("var-file"), (url) => ($("var-image").src = url));
$("run-variations").addEventListener("click", () => runJob("variations", async () => {
  const p = dmxParams();
  const body = { model: $("var-model").value, image: toBase64(pictureOf($("var-image"), "picture for variations")),
                 steps: p.steps, guidance_scale: p.guidance_scale, seed: p.seed };
  showResult("variations", await api("POST", "/dmx/v1/variations", body));
}));

// With --token the lists need it: they are read again once it is typed.
$("token").addEventListener("change", loadLists);
loadLists();
