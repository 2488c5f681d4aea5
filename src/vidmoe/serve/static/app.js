// vidmoe web UI: a form over the /v1 API, the plan drawn before running, live progress from the
// job's event stream, the finished video, and a gallery of past jobs. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "vidmoe-token";
const COLORS = { high_noise: "#e4572e", low_noise: "#2e86ab", dense: "#76b041" };
const PALETTE = ["#e4572e", "#2e86ab", "#76b041", "#f3a712", "#8e5572", "#4f5d75"];
let token = sessionStorage.getItem(TOKEN_KEY);
let model = null;
let currentJob = null;
let streamAbort = null;
let galleryOffset = 0;

// -- API ------------------------------------------------------------------------------------
async function api(path, opts = {}) {
  let res = null;
  for (let attempt = 0; attempt < 3; attempt++) {
    const used = token;
    const headers = Object.assign({}, opts.headers || {});
    if (used) headers.Authorization = "Bearer " + used;
    res = await fetch(path, Object.assign({}, opts, { headers }));
    if (res.status !== 401) return res;
    if (token === used) { // ask once; requests that failed meanwhile retry with the new token
      const given = window.prompt("This vidmoe server needs its access token:");
      if (!given) return res;
      token = given.trim();
      sessionStorage.setItem(TOKEN_KEY, token);
    }
  }
  return res;
}

async function detail(res) {
  try { const body = await res.json(); return body.detail || JSON.stringify(body); }
  catch (e) { return res.status + " " + res.statusText; }
}

// -- form -----------------------------------------------------------------------------------
function colorOf(name) {
  if (COLORS[name]) return COLORS[name];
  const i = model ? model.experts.findIndex((e) => e.name === name) : 0;
  return PALETTE[Math.max(i, 0) % PALETTE.length];
}

function formBody() {
  const body = { prompt: $("prompt").value };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  body.rewrite_prompt = $("rewrite_prompt").checked;
  for (const key of ["width", "height", "num_frames", "num_steps", "seed"]) {
    if ($(key).value !== "") body[key] = Number($(key).value);
  }
  const guidance = {};
  for (const input of document.querySelectorAll("#guidance-fields input")) {
    if (input.value !== "") guidance[input.dataset.expert] = Number(input.value);
  }
  if (Object.keys(guidance).length) body.guidance = guidance;
  const boundary = $("boundary").value.trim();
  if (boundary) body.boundary = /^[0-9.]+$/.test(boundary) ? Number(boundary) : boundary;
  if ($("sampler").value) body.sampler = $("sampler").value;
  return body;
}

function fillForm(s) {
  $("prompt").value = s.prompt || "";
  $("negative_prompt").value = s.negative_prompt || "";
  $("rewrite_prompt").checked = s.rewrite_prompt !== false;
  for (const key of ["width", "height", "num_frames", "num_steps", "seed"]) {
    if (s[key] !== undefined && s[key] !== null) $(key).value = s[key];
  }
  for (const input of document.querySelectorAll("#guidance-fields input")) {
    const g = (s.guidance || {})[input.dataset.expert];
    input.value = g === undefined ? "" : g;
  }
  $("boundary").value = s.boundary === undefined || s.boundary === null ? "" : String(s.boundary);
  $("sampler").value = s.sampler || model.default_sampler;
  updatePlan();
}

function drawTimeline(el, steps) {
  el.replaceChildren();
  for (const st of steps) {
    const cell = document.createElement("div");
    cell.className = "step";
    cell.dataset.step = st.index;
    cell.dataset.experts = st.experts.join("+");
    const colors = st.experts.map(colorOf);
    cell.style.background = colors.length > 1 ? `linear-gradient(90deg, ${colors.join(", ")})` : colors[0];
    cell.title = `step ${st.index + 1}: sigma ${st.sigma.toFixed(4)} -> ${st.sigma_next.toFixed(4)}, ` +
      `${st.experts.join(" + ")}, guidance ${st.guidance.join("/")}`;
    el.appendChild(cell);
  }
}

function drawLegend(el, counts) {
  el.replaceChildren();
  for (const [name, n] of Object.entries(counts)) {
    const item = document.createElement("span");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = colorOf(name);
    item.append(sw, `${name}: ${n} step${n === 1 ? "" : "s"}`);
    el.appendChild(item);
  }
}

let planTimer = null;
function updatePlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(async () => {
    const res = await api("/v1/plan", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(formBody()) });
    if (!res.ok) { $("form-error").textContent = await detail(res); return; }
    const plan = await res.json();
    $("form-error").textContent = "";
    const said = plan.settings.encoded_prompt;
    $("encoded-prompt").textContent = said ? `the model reads: ${said}` : "";
    drawTimeline($("plan-timeline"), plan.plan);
    drawLegend($("plan-legend"), plan.counts);
  }, 200);
}

// -- a run ----------------------------------------------------------------------------------
function setStatus(text, status) {
  $("status").textContent = text;
  $("status").dataset.status = status;
}

function showProgress(ev) {
  const p = ev.progress;
  $("progress-bar").value = p.num_steps ? p.step / p.num_steps : 0;
  for (const cell of $("progress-timeline").children) {
    const i = Number(cell.dataset.step);
    cell.classList.toggle("done", i < p.step || ev.status === "done");
    cell.classList.toggle("active", ev.status === "running" && p.phase === "denoise" && i === p.step);
  }
  if (ev.status === "queued") setStatus(`queued (position ${ev.queue_position})`, "queued");
  else if (ev.status === "running" && p.phase === "denoise")
    setStatus(`step ${p.step + 1} of ${p.num_steps}: ${(p.experts || []).join(" + ")} expert at work`, "running");
  else if (ev.status === "running" && p.phase === "decode") setStatus("decoding the video (VAE)", "running");
  else if (ev.status === "running") setStatus(`${p.phase || "starting"}…`, "running");
  else if (ev.status === "failed") setStatus(`failed: ${ev.error}`, "failed");
  else setStatus(ev.status, ev.status);
  $("cancel").disabled = !(ev.status === "queued" || ev.status === "running");
}

async function follow(id) {
  if (streamAbort) streamAbort.abort();
  const ctrl = new AbortController();
  streamAbort = ctrl;
  let res;
  try { res = await api(`/v1/jobs/${id}/events`, { signal: ctrl.signal }); }
  catch (e) { return; }
  if (!res.ok) { setStatus(`events: ${await detail(res)}`, "failed"); return; }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try { chunk = await reader.read(); } catch (e) { return; }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data || id !== currentJob) continue;
      const ev = JSON.parse(data);
      showProgress(ev);
      if (name === "done") await showVideo(id);
      if (name === "done" || name === "failed" || name === "cancelled") refreshGallery();
    }
  }
}

async function showVideo(id) {
  const res = await api(`/v1/jobs/${id}/video`);
  if (!res.ok) { $("video-info").textContent = await detail(res); return; }
  const blob = await res.blob(); // fetched with the token: a <video src> could not send it
  const video = $("video");
  if (video.src.startsWith("blob:")) URL.revokeObjectURL(video.src);
  video.dataset.job = id;
  video.src = URL.createObjectURL(blob);
  video.play().catch(() => {});
  const job = await (await api(`/v1/jobs/${id}`)).json();
  const s = job.settings;
  $("video-info").textContent = `${s.width}x${s.height}, ${s.num_frames} frames at ${model.fps} fps, ` +
    `${s.num_steps} steps, seed ${s.seed}; ${job.timings.total.toFixed(1)} s`;
}

async function run(event) {
  event.preventDefault();
  const res = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(formBody()) });
  if (res.status === 429) {
    $("form-error").textContent = `${await detail(res)} (Retry-After ${res.headers.get("Retry-After")} s)`;
    return;
  }
  if (!res.ok) { $("form-error").textContent = await detail(res); return; }
  const job = await res.json();
  currentJob = job.id;
  $("form-error").textContent = "";
  drawTimeline($("progress-timeline"), job.plan);
  setStatus("queued", "queued");
  refreshGallery();
  follow(job.id);
}

async function cancel() {
  if (!currentJob) return;
  const res = await api(`/v1/jobs/${currentJob}`, { method: "DELETE" });
  if (!res.ok) $("form-error").textContent = await detail(res);
}

// -- gallery --------------------------------------------------------------------------------
function card(job) {
  const s = job.settings;
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.job = job.id;
  const prompt = document.createElement("div");
  prompt.className = "prompt";
  prompt.textContent = s.prompt || "(no prompt)";
  const encoded = document.createElement("div");
  encoded.className = "encoded";
  encoded.textContent = s.encoded_prompt ? `read as: ${s.encoded_prompt}` : "";
  const badge = document.createElement("span");
  badge.className = `badge ${job.status}`;
  badge.textContent = job.status;
  const meta = document.createElement("div");
  meta.className = "meta";
  const counts = Object.entries(job.counts).map(([n, c]) => `${n} ${c}`).join(", ");
  const guidance = Object.entries(s.guidance).map(([n, g]) => `${n}=${g}`).join(", ");
  meta.textContent = `${s.width}x${s.height}, ${s.num_frames} frames, ${s.num_steps} steps (${counts}), ` +
    `seed ${s.seed}, ${s.sampler}, guidance ${guidance}, boundary ${s.boundary}`;
  const actions = document.createElement("div");
  actions.className = "actions";
  const use = document.createElement("button");
  use.type = "button";
  use.className = "use-settings";
  use.textContent = "use these settings";
  use.onclick = () => fillForm(s);
  actions.appendChild(use);
  if (job.status === "done") {
    const play = document.createElement("button");
    play.type = "button";
    play.textContent = "play";
    play.onclick = () => { currentJob = job.id; setStatus("done", "done"); showVideo(job.id); };
    actions.appendChild(play);
  }
  el.append(prompt, encoded, badge, meta, actions);
  return el;
}

async function refreshGallery(more = false) {
  galleryOffset = more ? galleryOffset : 0;
  const res = await api(`/v1/jobs?limit=12&offset=${galleryOffset}`);
  if (!res.ok) return;
  const page = await res.json();
  if (!more) $("gallery").replaceChildren();
  for (const job of page.jobs) $("gallery").appendChild(card(job));
  galleryOffset = page.next_offset || galleryOffset;
  $("more").hidden = page.next_offset === null;
}

// -- start ----------------------------------------------------------------------------------
async function init() {
  const res = await api("/v1/model");
  if (!res.ok) { $("model-name").textContent = await detail(res); return; }
  model = await res.json();
  const millions = (n) => (n / 1e6).toFixed(n < 1e7 ? 2 : 0) + "M";
  $("model-name").textContent = `${model.name}: ${model.experts.map((e) => e.name).join(" + ")}, ` +
    `${millions(model.params.total)} parameters (${millions(model.params.active)} active per step), ` +
    `frames ${model.frames.rule}, sizes ${model.sizes ? model.sizes.map((s) => s.join("x")).join(" ") : "multiples of " + model.size_multiple}`;
  $("width").value = model.default_size[0];
  $("height").value = model.default_size[1];
  $("num_frames").value = model.frames.default;
  $("num_steps").value = model.default_steps;
  for (const e of model.experts) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "number"; input.step = "0.5"; input.min = "0";
    input.dataset.expert = e.name;
    input.placeholder = String(e.guidance);
    label.append(`Guidance ${e.name}`, input);
    $("guidance-fields").appendChild(label);
  }
  for (const name of model.samplers) $("sampler").add(new Option(name, name, false, name === model.default_sampler));
  $("job-form").addEventListener("input", updatePlan);
  $("job-form").addEventListener("submit", run);
  $("random-seed").onclick = () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); updatePlan(); };
  $("cancel").onclick = cancel;
  $("more").onclick = () => refreshGallery(true);
  updatePlan();
  refreshGallery();
  const health = await (await api("/v1/health")).json();
  $("health").textContent = `worker ${health.worker}, ${health.queued} queued`;
}

init();
