// earmark's page: plain JS over the same HTTP API as any client. No build step, nothing from a CDN.
"use strict";

const $ = (sel) => document.querySelector(sel);
const teachClips = [];

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const c of children) node.append(c);
  return node;
}

function authHeaders() {
  const token = $("#token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(method, path, files, needsToken) {
  const opts = { method, headers: needsToken ? authHeaders() : {} };
  if (files) {
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    opts.body = form;
  }
  const resp = await fetch(path, opts);
  let body = null;
  try { body = await resp.json(); } catch (e) { body = { error: resp.statusText }; }
  if (!resp.ok) throw new Error((body && body.error) || resp.statusText);
  return body;
}

// -- recording: MediaRecorder, then decoded in the browser and sent as 16-bit WAV (the server reads WAV, FLAC, OGG, MP3)
function encodeWav(buffer) {
  const n = buffer.length, rate = buffer.sampleRate, chans = buffer.numberOfChannels;
  const mono = new Float32Array(n);
  for (let c = 0; c < chans; c++) {
    const d = buffer.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += d[i] / chans;
  }
  const out = new DataView(new ArrayBuffer(44 + n * 2));
  const str = (o, s) => { for (let i = 0; i < s.length; i++) out.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); out.setUint32(4, 36 + n * 2, true); str(8, "WAVE"); str(12, "fmt ");
  out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, rate * 2, true); out.setUint16(32, 2, true); out.setUint16(34, 16, true);
  str(36, "data"); out.setUint32(40, n * 2, true);
  for (let i = 0; i < n; i++) out.setInt16(44 + i * 2, Math.max(-1, Math.min(1, mono[i])) * 0x7fff, true);
  return new Blob([out], { type: "audio/wav" });
}

let recordCount = 0;
async function record(button, seconds, onClip) {
  if (!navigator.mediaDevices || !window.MediaRecorder) { alert("recording is not available in this browser"); return; }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const rec = new MediaRecorder(stream);
  const chunks = [];
  rec.ondataavailable = (e) => chunks.push(e.data);
  const label = button.textContent;
  button.classList.add("recording");
  button.textContent = "■ stop";
  const done = new Promise((resolve) => { rec.onstop = resolve; });
  const stop = () => { if (rec.state !== "inactive") rec.stop(); };
  button.onclick = stop;
  rec.start();
  setTimeout(stop, seconds * 1000);
  await done;
  stream.getTracks().forEach((t) => t.stop());
  button.classList.remove("recording");
  button.textContent = label;
  button.onclick = null;
  const raw = await new Blob(chunks).arrayBuffer();
  const ctx = new AudioContext();
  const decoded = await ctx.decodeAudioData(raw);
  ctx.close();
  recordCount += 1;
  onClip(new File([encodeWav(decoded)], `recording-${recordCount}.wav`, { type: "audio/wav" }));
}

// -- classify
function bars(top) {
  const box = el("div");
  for (const t of top) {
    const pct = Math.round(t.probability * 1000) / 10;
    const fill = el("div", { className: "fill" });
    fill.style.width = pct + "%";
    const row = el("div", { className: "bar" }, el("span", { className: "name", textContent: t.label }),
      el("div", { className: "track" }, fill), el("span", { className: "p", textContent: pct.toFixed(1) + "%" }));
    row.dataset.label = t.label;
    box.append(row);
  }
  return box;
}

function teachHint(file) {
  const hint = el("div", { className: "hint" }, "Not a sound I know. ");
  const btn = el("button", { type: "button", textContent: "Teach this sound" });
  btn.onclick = () => { addTeachClips([file]); $("#teach-label").focus(); };
  hint.append(btn);
  return hint;
}

async function classify(files) {
  const out = $("#classify-results");
  out.replaceChildren(el("p", { className: "muted", textContent: "classifying…" }));
  try {
    const body = await api("POST", "/classify?top_k=5", files, false);
    out.replaceChildren();
    body.results.forEach((r, i) => {
      const card = el("div", { className: "result" }, el("div", { className: "file", textContent: r.file }));
      const top = r.top || (r.windows && r.windows.length ? r.windows[0].top : []);
      card.dataset.top = top.length ? top[0].label : "";
      card.append(bars(top));
      if (top.length && top[0].label === "unknown") card.append(teachHint(files[i]));
      out.append(card);
    });
  } catch (e) {
    out.replaceChildren(el("p", { className: "error", textContent: e.message }));
  }
}

// -- teach
function addTeachClips(files) {
  for (const f of files) teachClips.push(f);
  $("#teach-clips").replaceChildren(...teachClips.map((f) => el("li", { textContent: f.name })));
}

async function teach() {
  const name = $("#teach-label").value.trim();
  const status = $("#teach-status");
  status.className = "";
  if (!name) { status.className = "error"; status.textContent = "name the sound first"; return; }
  if (!teachClips.length) { status.className = "error"; status.textContent = "add some clips first"; return; }
  status.textContent = "teaching…";
  try {
    const body = await api("POST", `/labels/${encodeURIComponent(name)}/examples`, teachClips, true);
    status.textContent = `learned ${body.learned} clip(s) of "${name}" (now ${body.counts[name]})`;
    teachClips.length = 0;
    addTeachClips([]);
    await refreshLabels();
  } catch (e) {
    status.className = "error";
    status.textContent = e.message;
  }
}

// -- labels
async function forget(name) {
  const status = $("#labels-status");
  status.className = "";
  status.textContent = `forgetting "${name}"…`;
  try {
    await api("DELETE", `/labels/${encodeURIComponent(name)}`, null, true);
    status.textContent = `forgot "${name}"`;
    await refreshLabels();
  } catch (e) {
    status.className = "error";
    status.textContent = e.message;
  }
}

async function refreshLabels() {
  const body = await api("GET", "/labels");
  const rows = body.labels.map((l) => {
    const btn = el("button", { type: "button", className: "forget", textContent: "forget" });
    btn.dataset.label = l.name;
    btn.onclick = () => forget(l.name);
    const tr = el("tr", {}, el("td", { textContent: l.name }), el("td", { className: "n", textContent: String(l.clips) }),
      el("td", {}, btn));
    tr.dataset.label = l.name;
    return tr;
  });
  $("#labels").replaceChildren(...rows);
  $("#status").textContent = `ready · ${body.labels.length} labels · model v${body.version}`;
}

async function waitReady() {
  for (;;) {
    try {
      const resp = await fetch("/health/ready");
      if (resp.ok) return;
      const body = await resp.json();
      $("#status").textContent = body.error || "loading…";
    } catch (e) { $("#status").textContent = "server unreachable"; }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
}

window.addEventListener("DOMContentLoaded", async () => {
  const saved = sessionStorage.getItem("earmark-token");
  if (saved) $("#token").value = saved;
  $("#token").addEventListener("change", () => sessionStorage.setItem("earmark-token", $("#token").value.trim()));
  $("#classify-input").addEventListener("change", (e) => { if (e.target.files.length) classify([...e.target.files]); e.target.value = ""; });
  dropZone($("#classify-drop"), classify);
  $("#classify-record").addEventListener("click", (e) => { if (!e.currentTarget.classList.contains("recording")) record(e.currentTarget, 3, (f) => classify([f])); });
  $("#teach-input").addEventListener("change", (e) => { addTeachClips([...e.target.files]); e.target.value = ""; });
  dropZone($("#teach"), addTeachClips);
  $("#teach-record").addEventListener("click", (e) => { if (!e.currentTarget.classList.contains("recording")) record(e.currentTarget, 2, (f) => addTeachClips([f])); });
  $("#teach-button").addEventListener("click", teach);
  $("#teach-clear").addEventListener("click", () => { teachClips.length = 0; addTeachClips([]); });
  await waitReady();
  await refreshLabels();
});
