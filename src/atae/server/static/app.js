"use strict";
// atae search page: plain JS, no dependencies. Talks to /api/search, /api/similar/{segment},
// /api/audio/{file}, /api/waveform/{file}.png and /api/stats. The address bar always holds the current
// search (?q=&scorer=&k= or ?like=&k=), so a search can be bookmarked, shared and reloaded.
const $ = (s) => document.querySelector(s);
const form = $("#search"), q = $("#q"), k = $("#k"), list = $("#results"), status = $("#status");
const drop = $("#drop"), fileInput = $("#file"), scorer = $("#scorer");

function fmt(s) {
  if (s == null) return "";
  const m = Math.floor(s / 60), r = s - 60 * m;
  return `${m}:${r.toFixed(1).padStart(4, "0")}`;
}

function setStatus(text, isError) {
  status.textContent = text;
  status.classList.toggle("error", !!isError);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

// ---- the address bar <-> the form
function stateFromForm() {
  return { q: q.value, scorer: scorer.value, k: k.value };
}

function urlOf(st) {
  const p = new URLSearchParams();
  if (st.like != null) p.set("like", st.like); else { p.set("q", st.q); p.set("scorer", st.scorer); }
  p.set("k", st.k);
  return `/?${p}`;
}

function remember(st, replace) {
  const url = urlOf(st);
  if (location.pathname + location.search === url) return;
  (replace ? history.replaceState : history.pushState).call(history, st, "", url);
}

function setChoice(select, value) {
  const opt = Array.from(select.options).find((o) => o.value === value && !o.disabled);
  if (opt) select.value = value;
}

function fromUrl() {
  const p = new URLSearchParams(location.search);
  if (p.has("k")) {
    const want = p.get("k");
    if (!Array.from(k.options).some((o) => o.value === want) && /^\d{1,4}$/.test(want)) k.append(new Option(want));
    setChoice(k, want);
  }
  if (p.has("scorer")) setChoice(scorer, p.get("scorer"));
  if (p.has("like")) return { like: p.get("like"), k: k.value };
  if (p.has("q")) { q.value = p.get("q"); return stateFromForm(); }
  return null;
}

// ---- searching
// label: what was searched for, a string or a function of the answer's body
async function run(request, label, empty) {
  const named = (body) => (typeof label === "function" ? label(body) : label);
  setStatus(`searching for ${named(null)}…`);
  try {
    const resp = await request;
    const body = await resp.json().catch(() => ({ error: `the server answered HTTP ${resp.status}` }));
    if (!resp.ok) {
      list.replaceChildren();
      setStatus(body.error + (body.fix ? ` — ${body.fix}` : ""), true);
      return;
    }
    render(body.results);
    if (!body.results.length) setStatus(empty);
    else setStatus(`${body.results.length} result(s) for ${named(body)} in ${body.took_ms} ms`);
  } catch (e) {
    list.replaceChildren();
    setStatus(`search failed: the server cannot be reached (${e.message || e})`, true);
  }
}

function searchText(st) {
  const url = `/api/search?q=${encodeURIComponent(st.q)}&k=${encodeURIComponent(st.k)}` +
    `&scorer=${encodeURIComponent(st.scorer)}`;
  const label = `“${st.q.trim()}”`;
  const tags = scorer.querySelector("[value=bridge]");
  const hint = st.scorer !== "bridge" && !tags.disabled ? " or the zero-shot tags" : "";
  return run(fetch(url), label, `No sounds matched ${label}. Try other words${hint}.`);
}

function searchLike(st) {
  const url = `/api/similar/${encodeURIComponent(String(st.like))}?k=${encodeURIComponent(st.k)}`;
  const label = (body) => {
    if (!body) return "similar sounds";
    const l = body.like;
    const part = l.duration && l.end_s - l.start_s < l.duration - 1e-6 ? ` (${fmt(l.start_s)}–${fmt(l.end_s)})` : "";
    return `sounds like ${l.file_name}${part}`;
  };
  return run(fetch(url), label, "No other sounds in the library to compare with.");
}

function go(st, replace) {
  if (!st) return;
  remember(st, replace);
  if (st.like != null) searchLike(st); else searchText(st);
}

// ---- results
function tagList(tags) {
  const box = el("ul", "tags");
  box.setAttribute("aria-label", "AudioSet tags (marked: why it matched)");
  for (const t of tags) {
    const li = el("li", t.matched ? "tag matched" : "tag", t.label);
    li.title = `${t.matched ? "matches the query · " : ""}probability ${t.prob.toFixed(2)}`;
    box.append(li);
  }
  return box;
}

function missingNote() {
  return el("p", "missing", "This file is no longer on disk (deleted or moved since it was indexed). " +
    "Run atae index again to update the library.");
}

function render(results) {
  list.replaceChildren();
  for (const r of results) {
    const li = el("li", "result");
    li.tabIndex = 0;
    li.dataset.segment = r.segment_id;
    const whole = r.duration != null && r.end_s - r.start_s >= r.duration - 1e-6;
    const head = el("div", "meta");
    head.append(el("span", "rank", r.rank));
    const path = el("span", "path");
    path.title = r.path;
    path.append(el("span", "name", r.file_name), el("span", "folder", r.folder));
    head.append(path, el("span", "dur", fmt(r.duration)));
    if (!whole) head.append(el("span", "span", `match ${fmt(r.start_s)}–${fmt(r.end_s)}`));
    const score = el("span", "score", r.score.toFixed(3));
    score.title = "similarity score (higher is closer)";
    head.append(score);
    li.append(head);
    if (r.tags && r.tags.length) li.append(tagList(r.tags));
    const actions = el("div", "actions");
    const more = el("button", "more", "More like this");
    more.type = "button";
    more.addEventListener("click", () => go({ like: r.segment_id, k: k.value }));
    actions.append(more);
    if (r.missing) {
      li.classList.add("gone");
      li.append(missingNote(), actions);
      list.append(li);
      li.addEventListener("focus", () => select(li));
      continue;
    }
    const dl = el("a", "download", "Download");
    dl.href = `/api/audio/${r.file_id}`;
    dl.download = r.file_name;
    actions.append(dl);
    const wave = el("div", "wave");
    const img = el("img");
    img.loading = "lazy";
    img.alt = "waveform";
    img.src = `/api/waveform/${r.file_id}.png`;
    wave.append(img);
    if (!whole && r.duration) {
      const hl = el("div", "hl");
      hl.style.left = `${(100 * r.start_s) / r.duration}%`;
      hl.style.width = `${(100 * (r.end_s - r.start_s)) / r.duration}%`;
      wave.append(hl);
    }
    const cursor = el("div", "cursor");
    wave.append(cursor);
    const audio = el("audio");
    audio.controls = true;
    audio.preload = "none";
    audio.src = `/api/audio/${r.file_id}`;
    audio.addEventListener("error", () => {
      // the file went away after the search: say so instead of leaving a dead player
      fetch(audio.src, { method: "HEAD" }).then((resp) => {
        if (resp.status === 404) { wave.replaceWith(missingNote()); audio.remove(); dl.remove(); }
      }).catch(() => {});
    });
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
    li.append(wave, audio, actions);
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
  go(stateFromForm());
});

window.addEventListener("popstate", () => go(fromUrl(), true));

function searchByExample(file) {
  const fd = new FormData();
  fd.append("file", file, file.name);
  fd.append("k", k.value);
  run(fetch("/api/search", { method: "POST", body: fd }), `sounds like ${file.name}`,
    "No sounds in the library to compare with.");
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
  if (ev.target.tagName === "AUDIO" || ev.target.tagName === "BUTTON" || ev.target.tagName === "A") return;
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
    if (a) { if (a.paused) a.play(); else a.pause(); }
  } else if (ev.key === "m" && !inInput && cur) {
    ev.preventDefault();
    go({ like: cur.dataset.segment, k: k.value });
  }
});

// ---- start: offer the scorers this library can use (its best one first), then run the address's search
fetch("/api/stats").then((r) => r.json()).then((s) => {
  const info = s.scorers || { available: ["adapter"], unavailable: {} };
  for (const o of scorer.options) {
    o.disabled = !info.available.includes(o.value);
    if (info.unavailable[o.value]) o.title = `not available: ${info.unavailable[o.value]}`;
  }
  const best = info.default;
  if (best) scorer.value = best;
  const st = fromUrl();
  if (st) { go(st, true); return; }
  if (!s.files) setStatus("The library is empty: index a folder with atae index DIR --db LIB, then reload.");
  else if (!info.available.length) setStatus(`Ready: ${s.files} sounds. Text search needs a trained model or a tower with AudioSet tags; search by an example sound instead.`);
  else setStatus(`Ready: ${s.files} sounds. Describe a sound, or drop one to find similar ones.`);
}).catch(() => setStatus("The atae server cannot be reached: is `atae serve` running?", true));
