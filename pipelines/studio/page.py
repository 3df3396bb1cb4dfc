"""The studio's one page (HTML + CSS + plain JavaScript, no external assets: it works offline).

The page talks to :mod:`pipelines.studio.app`'s JSON API: ``/api/state`` (models, scans, limits),
``/api/upload`` (a map or photo; refused files come back as one sentence), ``/api/generate``
(queues a job: from the picked conditions' adapters, or from a registered combination with
``combination``), ``/api/jobs/<id>`` (polled for progress and results), ``/api/gate`` and
``/api/promote``.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>CtrLoRA dental studio</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 :root { --ink:#1d2733; --muted:#5b6b7c; --line:#d5dde6; --accent:#1f6feb; --bad:#b42318; --good:#067647; }
 * { box-sizing: border-box; }
 body { font: 14px/1.4 system-ui, sans-serif; color: var(--ink); margin: 0; background: #f6f8fa; }
 header { background: #102a43; color: #fff; padding: 10px 18px; display: flex; gap: 18px; align-items: baseline; }
 header h1 { font-size: 18px; margin: 0; }
 header small { color: #bcccdc; }
 main { padding: 12px 18px; display: grid; gap: 12px; }
 section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; }
 h2 { font-size: 15px; margin: 0 0 8px; }
 table { border-collapse: collapse; width: 100%; }
 th, td { border-bottom: 1px solid var(--line); padding: 3px 6px; text-align: left; vertical-align: top; }
 th { color: var(--muted); font-weight: 600; }
 .alias { display: inline-block; padding: 0 6px; border-radius: 9px; background: #e6f0ff; color: #0b4aa2; margin-right: 3px; }
 .alias.champion { background: #dcfae6; color: var(--good); }
 .cards { display: flex; flex-wrap: wrap; gap: 10px; }
 .card { border: 1px solid var(--line); border-radius: 6px; padding: 8px; width: 250px; }
 .card.off { opacity: .45; }
 .card label { display: block; margin: 3px 0; }
 .card img, .thumb { width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid var(--line); background: #eee; }
 .row { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; }
 .grid { display: flex; gap: 14px; align-items: flex-start; }
 .col h3 { font-size: 13px; margin: 0 0 4px; color: var(--muted); }
 .imgs { display: flex; flex-wrap: wrap; gap: 6px; }
 #maps, #truth { flex-direction: column; }
 figure { margin: 0; width: 100px; text-align: center; font-size: 11px; color: var(--muted); }
 figure img { width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid var(--line); display: block; margin: 0 auto; }
 .chip { display: inline-block; border: 1px solid var(--line); border-radius: 10px; padding: 0 6px; margin: 2px; cursor: pointer; font-size: 12px; }
 button { background: var(--accent); color: #fff; border: 0; border-radius: 5px; padding: 6px 12px; cursor: pointer; }
 button.secondary { background: #eef2f6; color: var(--ink); border: 1px solid var(--line); }
 button:disabled { opacity: .5; cursor: default; }
 #error { display: none; background: #fef3f2; border: 1px solid #fda29b; color: var(--bad); padding: 8px 12px; border-radius: 6px; }
 #progress-box { display: none; }
 progress { width: 320px; }
 .runs { display: flex; gap: 14px; flex-wrap: wrap; }
 .run { border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
 .scores { font-size: 11px; color: var(--muted); }
 .scores div { white-space: nowrap; }
 .run .imgs { flex-wrap: nowrap; }
 dialog { border: 1px solid var(--line); border-radius: 8px; max-width: 560px; }
 .ok { color: var(--good); } .bad { color: var(--bad); }
 pre { white-space: pre-wrap; margin: 0; font-size: 12px; }
</style>
</head>
<body>
<header><h1>CtrLoRA dental studio</h1><small id="tracking"></small></header>
<main>
 <div id="error" role="alert"></div>

 <section id="models-section">
  <h2>Registered models</h2>
  <table id="models"><thead><tr><th>model</th><th>version</th><th>aliases</th><th>dataset hash</th>
   <th>metrics</th><th>gate</th><th></th></tr></thead><tbody id="model-rows"></tbody></table>
  <div id="inspect" style="display:none; margin-top:8px"></div>
 </section>

 <section id="combinations-section">
  <h2>Combinations</h2>
  <table id="combinations"><thead><tr><th>model</th><th>version</th><th>aliases</th><th>built from</th>
   <th>weights</th><th>recipe</th><th></th></tr></thead><tbody id="combo-rows"></tbody></table>
  <div id="combo-panel" style="display:none; margin-top:8px">
   <div class="row">
    <label>Combination <select id="combination"></select></label>
    <span id="combo-weights" class="row"></span>
    <label><input type="checkbox" id="combo-recipe" checked> sample with its recipe
     (<span id="combo-recipe-text"></span>)</label>
    <button id="combo-generate">Generate from combination</button>
   </div>
   <div class="scores" style="margin-top:4px">Each condition's map comes from the validation scan picked under
    Conditions; prompt, seed and images from Sampling (and its steps, sampler and guidance when the recipe
    is unticked). Drawn by the registered model itself, as serving and
    <code>ctrlora-ops generate --combination</code> draw.</div>
  </div>
 </section>

 <section>
  <h2>Conditions</h2>
  <div class="row" style="margin-bottom:8px">
   <label>Validation scan <select id="scan"><option value="">(none)</option></select></label>
   <img id="scan-photo" class="thumb" alt="ground truth photo of the scan" style="display:none">
   <label>Photo for derived maps <input type="file" id="photo" accept="image/png,image/jpeg"></label>
   <img id="photo-preview" class="thumb" alt="uploaded photo" style="display:none">
  </div>
  <div id="cards" class="cards"></div>
 </section>

 <section>
  <h2>Sampling</h2>
  <div class="row">
   <label style="flex:1">Prompt <input id="prompt" list="captions" style="width:100%"
     value="dental photo of upper jaw, white teeth, light from front"></label>
   <datalist id="captions"></datalist>
  </div>
  <div id="vocab" style="margin:4px 0"></div>
  <div class="row">
   <label>Negative <input id="negative" size="18"></label>
   <label>Steps <input id="steps" type="number" value="20" min="1" max="200" style="width:60px"></label>
   <label>Sampler <select id="sampler"></select></label>
   <label>Guidance <input id="guidance" type="number" value="1" step="0.5" min="0" max="20" style="width:60px"></label>
   <label>Seed <input id="seed" type="number" value="0" min="0" style="width:80px"></label>
   <label>Images <input id="num-images" type="number" value="2" min="1" max="8" style="width:50px"></label>
   <label>Strength <input id="strength" type="number" value="1" step="0.1" min="0" max="2" style="width:60px"></label>
  </div>
  <div class="row" style="margin-top:8px">
   <button id="generate">Generate</button>
   <span style="color:var(--muted)">or compare two versions of</span>
   <select id="compare-condition"></select>
   <select id="compare-a"></select> <span>vs</span> <select id="compare-b"></select>
   <button id="compare">Compare</button>
  </div>
  <div id="progress-box" style="margin-top:8px"><progress id="progress" value="0" max="1"></progress>
   <span id="status"></span></div>
 </section>

 <section id="results-section" style="display:none">
  <h2 id="results-title">Results</h2>
  <div class="grid">
   <div class="col"><h3>condition maps</h3><div id="maps" class="imgs"></div></div>
   <div class="col" style="flex:1"><h3>generated</h3><div id="runs" class="runs"></div></div>
   <div class="col"><h3>ground truth</h3><div id="truth" class="imgs"></div></div>
  </div>
  <div id="promote-result" style="margin-top:8px"></div>
 </section>
</main>

<dialog id="confirm">
 <h2 id="confirm-title">Promote?</h2>
 <div id="gate-report"></div>
 <p>Move alias <b>champion</b> through the gate of <code>params.yaml</code> (<code>register.gate</code>)?
  A version the gate refuses becomes <b>challenger</b> instead.</p>
 <div class="row"><button id="confirm-promote">Confirm promotion</button>
  <button id="cancel-promote" class="secondary">Cancel</button></div>
</dialog>

<script>
"use strict";
const $ = (id) => document.getElementById(id);
let STATE = null;
const uploads = {};        // condition -> upload token (or "__photo__")
let pending = null;        // job id being polled
let toPromote = null;

function showError(msg) { const e = $("error"); e.textContent = msg; e.style.display = msg ? "block" : "none"; }
function fmt(v) { return (typeof v === "number") ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(3)) : String(v); }
function el(tag, attrs = {}, text) {
  const x = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) x.setAttribute(k, v);
  if (text !== undefined) x.textContent = text;
  return x;
}
async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  let data = {};
  try { data = await r.json(); } catch (e) { data = { error: `${path}: HTTP ${r.status}` }; }
  if (!r.ok || data.error) throw new Error(data.error || `${path}: HTTP ${r.status}`);
  return data;
}
function adaptersOf(c) { return STATE.adapters.filter(a => a.condition === c); }
function labelOf(ref) {
  const a = STATE.adapters.find(a => a.ref === ref); if (a) return `${a.condition} ${a.label}`;
  const k = (STATE.combinations || []).find(k => k.ref === ref); return k ? k.label : ref;
}
function recipeText(r) { return r && r.scheduler ? `${r.scheduler}, ${r.steps} steps, guidance ${r.guidance_scale}` : "-"; }

function renderModels() {
  const body = $("model-rows"); body.innerHTML = "";
  for (const a of STATE.adapters) {
    const tr = el("tr", { "data-ref": a.ref });
    tr.appendChild(el("td", {}, a.model || a.condition));
    tr.appendChild(el("td", {}, a.version ? `v${a.version}` : a.label));
    const al = el("td"); for (const x of a.aliases) al.appendChild(el("span", { class: `alias ${x}` }, x)); tr.appendChild(al);
    tr.appendChild(el("td", { title: a.dataset_hash || "" }, (a.dataset_hash || "-").slice(0, 12)));
    const m = Object.entries(a.metrics || {}).filter(([k]) => !k.includes(".")).slice(0, 4).map(([k, v]) => `${k}=${fmt(v)}`).join(", ");
    tr.appendChild(el("td", {}, m || "-"));
    tr.appendChild(el("td", {}, a.gate ? `${a.gate}: ${a.gate_reason || ""}` : "-"));
    const td = el("td"); const b = el("button", { class: "secondary inspect" }, "inspect");
    b.onclick = () => inspect(a); td.appendChild(b); tr.appendChild(td);
    body.appendChild(tr);
  }
  if (STATE.registry_error) showError(STATE.registry_error);
}

function renderCombinations() {
  const body = $("combo-rows"); body.innerHTML = "";
  const combos = STATE.combinations || [];
  if (!combos.length) {
    const tr = el("tr"); tr.appendChild(el("td", { colspan: "7", class: "scores" },
      "none registered (ctrlora-ops registry combine C1 C2 builds one from the conditions' champions)"));
    body.appendChild(tr);
  }
  for (const k of combos) {
    const tr = el("tr", { "data-ref": k.ref });
    tr.appendChild(el("td", {}, k.model));
    tr.appendChild(el("td", {}, `v${k.version}`));
    const al = el("td"); for (const x of k.aliases) al.appendChild(el("span", { class: `alias ${x}` }, x)); tr.appendChild(al);
    tr.appendChild(el("td", { class: "sources", title: Object.values(k.sources).join(", ") },
      k.conditions.map(c => `${c} v${k.source_versions[c] || "?"}`).join(", ")));
    tr.appendChild(el("td", { class: "weights", title: k.weights_source || "" },
      k.conditions.map(c => `${c} × ${k.weights[c] ?? 1}`).join(", ")));
    tr.appendChild(el("td", {}, recipeText(k.recipe)));
    const td = el("td"); const b = el("button", { class: "secondary use-combination" }, "generate from it");
    b.onclick = () => { $("combination").value = k.ref; syncCombination(); $("combo-panel").scrollIntoView(); };
    td.appendChild(b); tr.appendChild(td);
    body.appendChild(tr);
  }
  const s = $("combination"), keep = s.value; s.innerHTML = "";
  for (const k of combos) s.appendChild(el("option", { value: k.ref }, k.label));
  const champ = combos.find(k => k.aliases.includes("champion"));
  if (combos.some(k => k.ref === keep)) s.value = keep; else if (champ) s.value = champ.ref;
  $("combo-panel").style.display = combos.length ? "block" : "none";
  syncCombination();
}
function syncCombination() {
  const k = (STATE.combinations || []).find(k => k.ref === $("combination").value);
  const box = $("combo-weights"); box.innerHTML = "";
  if (!k) return;
  for (const c of k.conditions) {
    const w = el("input", { type: "number", id: `combo-weight-${c}`, value: String(k.weights[c] ?? 1), step: "0.1",
                            min: "0", max: String(STATE.limits.weight[1]), style: "width:60px" });
    const l = el("label", {}, `${c} (v${k.source_versions[c] || "?"}) weight `); l.appendChild(w); box.appendChild(l);
  }
  $("combo-recipe-text").textContent = recipeText(k.recipe);
}

function inspect(a) {
  const box = $("inspect"); box.style.display = "block"; box.innerHTML = "";
  box.appendChild(el("h2", {}, `${a.model || a.condition} ${a.version ? "v" + a.version : ""}`));
  const rows = [["condition", a.condition], ["source", a.source], ["aliases", a.aliases.join(", ") || "-"],
    ["dataset hash", a.dataset_hash || "-"], ["adapter hash", a.adapter_hash || "-"], ["git commit", a.git_commit || "-"],
    ["gate", a.gate ? `${a.gate}: ${a.gate_reason || ""}` : "-"]];
  for (const [k, v] of Object.entries(a.metrics || {})) rows.push([k, fmt(v)]);
  const t = el("table", { id: "inspect-table" });
  for (const [k, v] of rows) { const tr = el("tr"); tr.appendChild(el("th", {}, k)); tr.appendChild(el("td", {}, v)); t.appendChild(tr); }
  box.appendChild(t);
  const details = el("table", { id: "adapter-table" }); box.appendChild(details);
  api(`/api/adapter?ref=${encodeURIComponent(a.ref)}`).then(d => {
    for (const [k, v] of Object.entries(d)) { const tr = el("tr"); tr.appendChild(el("th", {}, `adapter ${k.replace("_", " ")}`)); tr.appendChild(el("td", {}, String(v))); details.appendChild(tr); }
  }).catch(e => showError(e.message));
  const use = el("button", { class: "secondary" }, `compose with ${a.condition}`);
  use.onclick = () => { const cb = $(`use-${a.condition}`); cb.checked = true; $(`version-${a.condition}`).value = a.ref; syncCards(); };
  box.appendChild(use);
}

function renderCards() {
  const cards = $("cards"); cards.innerHTML = "";
  for (const c of STATE.conditions) {
    const card = el("div", { class: "card off", id: `card-${c}` });
    const head = el("label"); const cb = el("input", { type: "checkbox", id: `use-${c}`, "data-condition": c });
    cb.onchange = syncCards; head.appendChild(cb); head.appendChild(document.createTextNode(" " + c)); card.appendChild(head);
    const vs = el("select", { id: `version-${c}` });
    for (const a of adaptersOf(c)) vs.appendChild(el("option", { value: a.ref }, a.label));
    const champ = adaptersOf(c).find(a => a.aliases.includes("champion")); if (champ) vs.value = champ.ref;
    const l1 = el("label", {}, "adapter "); l1.appendChild(vs); card.appendChild(l1);
    const src = el("select", { id: `source-${c}` });
    src.appendChild(el("option", { value: "upload" }, "upload a map"));
    src.appendChild(el("option", { value: "scan" }, "a validation scan's map"));
    if (STATE.derived.includes(c)) src.appendChild(el("option", { value: "derive" }, "derive from the photo"));
    src.onchange = () => refreshPreview(c);
    const l2 = el("label", {}, "map "); l2.appendChild(src); card.appendChild(l2);
    const f = el("input", { type: "file", id: `file-${c}`, accept: "image/png,image/jpeg" });
    f.onchange = () => uploadFile(c, f); card.appendChild(f);
    const w = el("input", { type: "number", id: `weight-${c}`, value: String((STATE.default_weights || {})[c] ?? 1), step: "0.1", min: "0", max: String(STATE.limits.weight[1]), style: "width:60px" });
    const l3 = el("label", {}, "weight "); l3.appendChild(w); card.appendChild(l3);
    card.appendChild(el("img", { id: `preview-${c}`, alt: `${c} map` }));
    cards.appendChild(card);
  }
}
function syncCards() {
  for (const c of STATE.conditions) $(`card-${c}`).classList.toggle("off", !$(`use-${c}`).checked);
  const cc = $("compare-condition"), keep = cc.value; cc.innerHTML = "";
  for (const c of STATE.conditions) if ($(`use-${c}`).checked) cc.appendChild(el("option", { value: c }, c));
  if ([...cc.options].some(o => o.value === keep)) cc.value = keep;
  syncCompare();
}
function syncCompare() {
  const c = $("compare-condition").value;
  for (const [id, pick] of [["compare-a", 0], ["compare-b", 1]]) {
    const s = $(id); s.innerHTML = "";
    const list = c ? adaptersOf(c) : [];
    for (const a of list) s.appendChild(el("option", { value: a.ref }, a.label));
    const champ = list.find(a => a.aliases.includes("champion"));
    const other = list.find(a => a !== champ);
    if (pick === 0 && champ) s.value = champ.ref;
    if (pick === 1 && other) s.value = other.ref;
  }
}

function readFile(input) {
  return new Promise((resolve, reject) => {
    const f = input.files[0]; if (!f) { reject(new Error("no file chosen")); return; }
    const r = new FileReader(); r.onload = () => resolve({ filename: f.name, data: r.result });
    r.onerror = () => reject(new Error(`${f.name}: cannot be read`)); r.readAsDataURL(f);
  });
}
async function uploadFile(c, input) {
  showError("");
  try {
    const up = await api("/api/upload", await readFile(input));
    uploads[c] = up.token; $(`source-${c}`).value = "upload"; $(`preview-${c}`).src = up.preview;
  } catch (e) { delete uploads[c]; $(`preview-${c}`).removeAttribute("src"); input.value = ""; showError(e.message); }
}
async function uploadPhoto() {
  showError("");
  try {
    const up = await api("/api/upload", await readFile($("photo")));
    uploads.__photo__ = up.token; $("photo-preview").src = up.preview; $("photo-preview").style.display = "";
    for (const c of STATE.conditions) refreshPreview(c);
  } catch (e) { delete uploads.__photo__; $("photo").value = ""; $("photo-preview").style.display = "none"; showError(e.message); }
}
async function refreshPreview(c) {
  const src = $(`source-${c}`).value, scan = $("scan").value, img = $(`preview-${c}`);
  if (src === "scan" && scan) {
    const s = STATE.scans.find(x => x.id === scan);
    if (s && s.conditions.includes(c)) img.src = `/api/scans/${scan}/${c}.png`; else img.removeAttribute("src");
  } else if (src === "derive" && uploads.__photo__) {
    try { img.src = (await api("/api/derive", { condition: c, photo: uploads.__photo__ })).image; } catch (e) { showError(e.message); }
  }
}
function onScan() {
  const scan = $("scan").value, p = $("scan-photo");
  if (scan) { p.src = `/api/scans/${scan}/photo.png`; p.style.display = "";
    const s = STATE.scans.find(x => x.id === scan); if (s) $("prompt").value = s.caption;
    for (const c of STATE.conditions) { if ($(`use-${c}`).checked && !uploads[c]) $(`source-${c}`).value = "scan"; refreshPreview(c); }
  } else { p.style.display = "none"; }
}

function request(compare) {
  const conds = [];
  for (const c of STATE.conditions) {
    if (!$(`use-${c}`).checked) continue;
    const source = $(`source-${c}`).value;
    conds.push({ condition: c, version: $(`version-${c}`).value, source, weight: $(`weight-${c}`).value,
                 map: source === "derive" ? uploads.__photo__ : uploads[c] });
  }
  const body = { conditions: conds, scan: $("scan").value || null, prompt: $("prompt").value,
    negative_prompt: $("negative").value, steps: $("steps").value, sampler: $("sampler").value,
    guidance: $("guidance").value, seed: $("seed").value, num_images: $("num-images").value, strength: $("strength").value };
  if (compare) body.compare = { condition: $("compare-condition").value, a: $("compare-a").value, b: $("compare-b").value };
  return body;
}
function comboRequest() {
  const k = (STATE.combinations || []).find(k => k.ref === $("combination").value);
  const weights = {};
  if (k) for (const c of k.conditions) weights[c] = $(`combo-weight-${c}`).value;
  const body = { combination: $("combination").value, scan: $("scan").value || null, weights,
    recipe: $("combo-recipe").checked, prompt: $("prompt").value, seed: $("seed").value, num_images: $("num-images").value };
  if (!body.recipe) Object.assign(body, { steps: $("steps").value, sampler: $("sampler").value, guidance: $("guidance").value });
  return body;
}
async function start(compare, combination) {
  showError(""); $("promote-result").textContent = "";
  try {
    const job = await api("/api/generate", combination ? comboRequest() : request(compare));
    pending = job.id; setBusy(true); poll();
  } catch (e) { showError(e.message); }
}
function setBusy(busy) {
  $("generate").disabled = busy; $("compare").disabled = busy; $("combo-generate").disabled = busy;
  $("progress-box").style.display = busy ? "block" : "none";
}
async function poll() {
  if (!pending) return;
  let job;
  try { job = await api(`/api/jobs/${pending}`); } catch (e) { showError(e.message); setBusy(false); pending = null; return; }
  $("progress").max = job.total; $("progress").value = job.done;
  $("status").textContent = `${job.message} — step ${job.done} / ${job.total}`;
  if (job.state === "done") { pending = null; setBusy(false); showResult(job.result); }
  else if (job.state === "error") { pending = null; setBusy(false); showError(job.error); }
  else setTimeout(poll, 250);
}
function scoreText(s) { return Object.entries(s).map(([k, v]) => `${k} ${fmt(v)}`).join(" · "); }
function scoreBox(s, cls) {
  const box = el("div", { class: cls || "scores" });
  for (const [k, v] of Object.entries(s)) box.appendChild(el("div", { title: k }, `${k.replace("segmentation.", "seg.")} ${fmt(v)}`));
  return box;
}
function figure(src, caption, cls) {
  const f = el("figure"); f.appendChild(el("img", { src, class: cls || "", alt: caption })); f.appendChild(el("figcaption", {}, caption)); return f;
}
function showResult(res) {
  $("results-section").style.display = "block";
  $("results-title").textContent = res.compare ? `Compare ${res.compare[0]}: ${labelOf(res.compare[1])} vs ${labelOf(res.compare[2])}`
    : res.combination ? `Combination ${res.combination.label}: ${recipeText(res.combination.sampling)}${res.combination.from_recipe ? " (its recipe)" : ""}`
    : "Results";
  const maps = $("maps"); maps.innerHTML = "";
  for (const m of res.maps) maps.appendChild(figure(m.image, `${m.condition} × ${m.weight}`, "map"));
  const truth = $("truth"); truth.innerHTML = "";
  if (res.truth) truth.appendChild(figure(res.truth, `scan ${res.scan}`, "truth")); else truth.appendChild(el("span", { class: "scores" }, "(upload: no ground truth)"));
  const runs = $("runs"); runs.innerHTML = "";
  for (const r of res.runs) {
    const box = el("div", { class: "run", "data-ref": r.ref });
    if (r.ref) box.appendChild(el("h3", {}, labelOf(r.ref)));
    const imgs = el("div", { class: "imgs" });
    for (const im of r.images) { const f = figure(im.image, `seed ${im.seed}`, "generated"); f.appendChild(scoreBox(im.scores)); imgs.appendChild(f); }
    box.appendChild(imgs);
    if (Object.keys(r.mean_scores).length) box.appendChild(el("div", { class: "scores mean" }, "mean: " + scoreText(r.mean_scores)));
    const a = STATE.adapters.find(x => x.ref === r.ref);
    if (a && a.version && !a.aliases.includes("champion")) {
      const b = el("button", { class: "promote" }, `Promote ${a.condition} v${a.version} to champion…`);
      b.onclick = () => askPromote(a); box.appendChild(b);
    }
    runs.appendChild(box);
  }
}
async function askPromote(a) {
  showError("");
  try {
    const rep = await api(`/api/gate?condition=${encodeURIComponent(a.condition)}&version=${encodeURIComponent(a.version)}`);
    toPromote = a;
    $("confirm-title").textContent = `Promote ctrlora-${a.condition} v${a.version} to champion?`;
    const g = $("gate-report"); g.innerHTML = "";
    const t = el("table");
    const p = rep.paired;
    const rows = [["gate decision (tags)", rep.gate ? `${rep.gate}: ${rep.gate_reason || ""}` : "no gate report in its tags"],
      ["gate (params.yaml)", Object.entries(rep.gate_config).map(([k, v]) => `${k} ${v}`).join(", ") || "defaults"],
      ["champion now", rep.champion ? `v${rep.champion}` : "(none: this version takes the alias)"],
      ["paired comparison", p ? `v${rep.version} − champion v${p.champion_version}, ${p.metric || ""} on ${p.n_scans} scans of benchmark v${p.benchmark_version} at residual weight ${p.weight}: ${fmt(p.delta)} [${fmt(p.low)}, ${fmt(p.high)}]` : "none recorded"],
      ["comparison weight", `${rep.weight} (the version's recipe weight, both sides)`],
      ["on confirm", rep.compare_now ? "the comparison with the current champion runs now (a minute or two)" : "the recorded comparison decides"]];
    if (rep.forced_reason) rows.push(["forced by hand", rep.forced_reason]);
    for (const [k, v] of rows) { const tr = el("tr"); tr.appendChild(el("th", {}, k)); tr.appendChild(el("td", {}, v)); t.appendChild(tr); }
    g.appendChild(t);
    $("confirm").showModal();
  } catch (e) { showError(e.message); }
}
async function confirmPromote() {
  const a = toPromote; $("confirm").close(); if (!a) return;
  try {
    const res = await api("/api/promote", { condition: a.condition, version: a.version, confirm: true });
    const box = $("promote-result"); box.innerHTML = "";
    box.appendChild(el("b", { class: res.promoted ? "ok" : "bad" },
      res.promoted ? `ctrlora-${a.condition} v${res.version} is now champion` : `ctrlora-${a.condition} v${res.version} NOT promoted (now challenger)`));
    box.appendChild(el("span", {}, ` — ${res.reason}`));
    await loadState(false);
  } catch (e) { showError(e.message); }
}

async function loadState(first) {
  STATE = await api("/api/state");
  $("tracking").textContent = `registry: ${STATE.tracking_uri}`;
  renderModels();
  if (!first) return;
  renderCombinations();
  renderCards();
  for (const s of STATE.scans) $("scan").appendChild(el("option", { value: s.id }, `${s.id}: ${s.caption}`));
  const dl = $("captions"); for (const s of STATE.scans) dl.appendChild(el("option", { value: s.caption }));
  const v = $("vocab"); v.appendChild(el("span", { class: "scores" }, "vocabulary: "));
  for (const w of STATE.vocabulary) { const c = el("span", { class: "chip" }, w); c.onclick = () => { $("prompt").value += ($("prompt").value ? " " : "") + w; }; v.appendChild(c); }
  for (const s of STATE.samplers) $("sampler").appendChild(el("option", { value: s }, s));
  const d = STATE.default_sampling || {};  // the evaluation's recipe, the registered versions' too
  if (d.sampler) $("sampler").value = d.sampler;
  if (d.steps) $("steps").value = String(d.steps);
  if (d.guidance != null) $("guidance").value = String(d.guidance);
  syncCards();
}
window.addEventListener("DOMContentLoaded", async () => {
  $("scan").onchange = onScan; $("photo").onchange = uploadPhoto;
  $("generate").onclick = () => start(false); $("compare").onclick = () => start(true);
  $("compare-condition").onchange = syncCompare;
  $("combination").onchange = syncCombination; $("combo-generate").onclick = () => start(false, true);
  $("confirm-promote").onclick = confirmPromote; $("cancel-promote").onclick = () => { toPromote = null; $("confirm").close(); };
  try { await loadState(true); document.body.dataset.ready = "1"; } catch (e) { showError(e.message); }
});
</script>
</body>
</html>
"""
