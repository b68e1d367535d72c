// The page of dmx serve: it calls the same A1111 endpoints as any client (/sdapi/v1/...).
"use strict";
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("token").value) h["Authorization"] = "Bearer " + $("token").value;
  return h;
}

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(r.status + ": " + (j.detail || j.error || r.statusText));
  return j;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function loadLists() {
  try {
    const [models, samplers, options] = await Promise.all([
      api("GET", "/sdapi/v1/sd-models"), api("GET", "/sdapi/v1/samplers"), api("GET", "/sdapi/v1/options")]);
    $("model").innerHTML = "";
    for (const m of models) {
      const o = new Option(m.model_name, m.title);
      o.selected = m.title === options.sd_model_checkpoint;
      $("model").add(o);
    }
    for (const s of samplers) $("sampler_name").add(new Option(s.name, s.name));
    $("model-info").textContent = options.sd_model_checkpoint;
  } catch (e) {
    status(e.message, true);
  }
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

let polling = null;
async function poll() {
  try {
    const p = await api("GET", "/sdapi/v1/progress");
    $("progress").value = p.progress;
    if (p.current_image) $("preview").src = "data:image/png;base64," + p.current_image;
    if (p.textinfo) status(p.textinfo + (p.eta_relative > 0 ? ", eta " + p.eta_relative.toFixed(1) + " s" : ""));
  } catch (e) { /* the next poll tries again */ }
}

function addToGallery(b64, info) {
  const f = document.createElement("figure");
  const img = new Image();
  img.src = "data:image/png;base64," + b64;
  const c = document.createElement("figcaption");
  c.textContent = info;
  const reuse = document.createElement("button");
  reuse.textContent = "reuse seed";
  const seed = /Seed: (\d+)/.exec(info);
  reuse.onclick = () => { if (seed) $("seed").value = seed[1]; };
  f.append(img, c, reuse);
  $("gallery").prepend(f);
}

$("generate").addEventListener("click", async () => {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    steps: Number($("steps").value), cfg_scale: Number($("cfg_scale").value), seed: Number($("seed").value),
  };
  if ($("width").value) body.width = Number($("width").value);
  if ($("height").value) body.height = Number($("height").value);
  if ($("sampler_name").value) body.sampler_name = $("sampler_name").value;
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  status("queued");
  polling = setInterval(poll, 500);
  try {
    const r = await api("POST", "/sdapi/v1/txt2img", body);
    const info = JSON.parse(r.info);
    r.images.forEach((b64, i) => addToGallery(b64, info.infotexts[i]));
    status(info.interrupted ? "interrupted" : "done" +
           (info.ignored_fields.length ? " (ignored: " + info.ignored_fields.join(", ") + ")" : ""));
    $("progress").value = 1;
  } catch (e) {
    status(e.message, true);
  } finally {
    clearInterval(polling);
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
});

$("cancel").addEventListener("click", () => api("POST", "/sdapi/v1/interrupt").catch((e) => status(e.message, true)));

loadLists();
