"use strict";
// atae search page: plain JS, no dependencies. Talks to /api/search, /api/audio/{id}, /api/waveform/{id}.png.
const $ = (s) => document.querySelector(s);
const form = $("#search"), q = $("#q"), k = $("#k"), list = $("#results"), status = $("#status");
const drop = $("#drop"), fileInput = $("#file"), scorer = $("#scorer");

// enable only the scorers this library can use; pick its default (adapter with a model, else bridge)
fetch("/api/stats").then((r) => r.json()).then((s) => {
  const info = s.scorers || { available: ["adapter"], default: "adapter", unavailable: {} };
  for (const o of scorer.options) {
    o.disabled = !info.available.includes(o.value);
    o.title = info.unavailable[o.value] || "";
  }
  if (info.default) scorer.value = info.default;
}).catch(() => {});

function fmt(s) {
  if (s == null) return "";
  const m = Math.floor(s / 60), r = s - 60 * m;
  return `${m}:${r.toFixed(1).padStart(4, "0")}`;
}

function setStatus(text, isError) {
  status.textContent = text;
  status.classList.toggle("error", !!isError);
}

async function run(request, label) {
  setStatus(`searching for ${label}…`);
  try {
    const resp = await request;
    const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
    if (!resp.ok) {
      list.replaceChildren();
      setStatus(body.error + (body.fix ? ` — ${body.fix}` : ""), true);
      return;
    }
    render(body.results);
    setStatus(`${body.results.length} result(s) for ${label} in ${body.took_ms} ms`);
  } catch (e) {
    setStatus(`search failed: ${e}`, true);
  }
}

function render(results) {
  list.replaceChildren();
  for (const r of results) {
    const li = document.createElement("li");
    li.className = "result";
    li.tabIndex = 0;
    li.dataset.start = r.start_s;
    const whole = r.duration != null && r.end_s - r.start_s >= r.duration - 1e-6;
    const meta = document.createElement("div");
    meta.className = "meta";
    const add = (cls, text) => { const s = document.createElement("span"); s.className = cls; s.textContent = text; meta.append(s); };
    add("rank", r.rank);
    add("score", r.score.toFixed(3));
    add("path", r.path);
    add("dur", fmt(r.duration));
    if (!whole) add("span", `match ${fmt(r.start_s)}–${fmt(r.end_s)}`);
    const wave = document.createElement("div");
    wave.className = "wave";
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = "waveform";
    img.src = `/api/waveform/${r.file_id}.png`;
    wave.append(img);
    if (!whole && r.duration) {
      const hl = document.createElement("div");
      hl.className = "hl";
      hl.style.left = `${(100 * r.start_s) / r.duration}%`;
      hl.style.width = `${(100 * (r.end_s - r.start_s)) / r.duration}%`;
      wave.append(hl);
    }
    const cursor = document.createElement("div");
    cursor.className = "cursor";
    wave.append(cursor);
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.preload = "none";
    audio.src = `/api/audio/${r.file_id}`;
    let jumped = false;
    audio.addEventListener("play", () => {
      for (const a of document.querySelectorAll("audio")) if (a !== audio) a.pause();
      if (!jumped && !whole) {
        jumped = true;
        // with preload="none" the first play starts before metadata: a seek then may be dropped,
        // so seek once the duration is known (the server answers range requests)
        const seek = () => { audio.currentTime = r.start_s; };
        if (audio.readyState >= 1) seek(); else audio.addEventListener("loadedmetadata", seek, { once: true });
      }
    });
    audio.addEventListener("timeupdate", () => {
      if (!r.duration) return;
      cursor.style.display = "block";
      cursor.style.left = `${(100 * audio.currentTime) / r.duration}%`;
    });
    wave.addEventListener("click", (ev) => {
      const box = wave.getBoundingClientRect();
      jumped = true;
      audio.currentTime = ((ev.clientX - box.left) / box.width) * (r.duration || 0);
      audio.play();
    });
    li.append(meta, wave, audio);
    li.addEventListener("focus", () => select(li));
    list.append(li);
  }
  const first = list.querySelector("li.result");
  if (first) select(first);
}

function select(li) {
  for (const x of list.querySelectorAll("li.selected")) x.classList.remove("selected");
  li.classList.add("selected");
}

function items() { return Array.from(list.querySelectorAll("li.result")); }
function current() { return list.querySelector("li.selected"); }

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = q.value;
  const url = `/api/search?q=${encodeURIComponent(text)}&k=${encodeURIComponent(k.value)}` +
    `&scorer=${encodeURIComponent(scorer.value)}`;
  run(fetch(url), `“${text.trim()}”`);
});

function searchByExample(file) {
  const fd = new FormData();
  fd.append("file", file, file.name);
  fd.append("k", k.value);
  run(fetch("/api/search", { method: "POST", body: fd }), `sounds like ${file.name}`);
}

fileInput.addEventListener("change", () => { if (fileInput.files[0]) searchByExample(fileInput.files[0]); fileInput.value = ""; });

let dragDepth = 0;
window.addEventListener("dragenter", (ev) => { ev.preventDefault(); dragDepth++; drop.hidden = false; });
window.addEventListener("dragover", (ev) => ev.preventDefault());
window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; drop.hidden = true; } });
window.addEventListener("drop", (ev) => {
  ev.preventDefault();
  dragDepth = 0;
  drop.hidden = true;
  const f = ev.dataTransfer && ev.dataTransfer.files[0];
  if (f) searchByExample(f);
});

document.addEventListener("keydown", (ev) => {
  const inInput = ev.target === q || ev.target.tagName === "SELECT";
  if (ev.key === "/" && !inInput) { ev.preventDefault(); q.focus(); q.select(); return; }
  const all = items();
  if (!all.length) return;
  if (ev.target.tagName === "AUDIO" || ev.target.tagName === "BUTTON") return;  // native controls
  const cur = current();
  const i = cur ? all.indexOf(cur) : -1;
  if (ev.key === "ArrowDown") {
    ev.preventDefault();
    if (inInput) (cur || all[0]).focus(); else all[Math.min(i + 1, all.length - 1)].focus();
  } else if (ev.key === "ArrowUp") {
    ev.preventDefault();
    if (i <= 0) q.focus(); else all[i - 1].focus();
  } else if (ev.key === " " && !inInput && cur) {
    ev.preventDefault();
    const a = cur.querySelector("audio");
    if (a.paused) a.play(); else a.pause();
  }
});
