"use strict";
// The isif search page: plain DOM, no build step. It talks to the JSON API documented in the README.
const $ = (id) => document.getElementById(id);
let info = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(url, options) {
  const res = await fetch(url, options);
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function k() {
  const v = parseInt($("k").value, 10);
  return Number.isFinite(v) ? v : info.default_k;
}

function card(item, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "result";
  b.dataset.id = item.id;
  b.title = item.path;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = item.path;
  img.src = `/api/thumb/${item.id}?size=256`;
  const meta = document.createElement("div");
  meta.className = "meta";
  const sim = document.createElement("div");
  sim.className = "sim";
  sim.textContent = item.similarity !== undefined ? item.similarity.toFixed(3)
    : (item.distance_to_centre !== undefined ? `d ${item.distance_to_centre.toFixed(3)}` : `#${item.id}`);
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = item.label ? `${item.label} · ${item.path.split("/").pop()}` : item.path;
  meta.append(sim, name);
  if (item.assigned !== undefined || item.rank !== undefined) {
    const lab = document.createElement("div");
    lab.className = "labelled";
    const parts = [];
    if (item.rank !== undefined) parts.push(`next #${item.rank}`);
    if (item.assigned !== undefined) {
      parts.push(`${item.assigned} ${item.given ? "(given)" : (100 * item.confidence).toFixed(0) + "%"}`);
    }
    if (item.suspect !== undefined) parts.push(`suspect ${item.suspect.toFixed(2)}`);
    lab.textContent = parts.join(" · ");
    meta.append(lab);
  }
  if (item.issues !== undefined && (item.issues.length || item.score !== undefined)) {
    const au = document.createElement("div");
    au.className = "issues";
    au.textContent = (item.score !== undefined ? `score ${item.score.toFixed(2)} · ` : "") + item.issues.join(", ");
    meta.append(au);
  }
  b.append(img, meta);
  b.addEventListener("click", () => onClick(item));
  return b;
}

function showResults(out, querySrc) {
  showTab("search");
  $("query").hidden = false;
  $("query-img").src = querySrc;
  $("query-name").textContent = out.query.path + (out.query.id !== null ? ` (#${out.query.id})` : "");
  const grid = $("results");
  grid.replaceChildren(...out.results.map((r) => card(r, (item) => { location.hash = `id=${item.id}`; })));
  setStatus(`${out.results.length} nearest of ${info.images} images in ${out.ms} ms (${info.index.kind})`);
}

async function searchId(id) {
  setStatus("searching…");
  try {
    const out = await api(`/api/search?id=${id}&k=${k()}`);
    showResults(out, `/api/thumb/${id}?size=256`);
  } catch (e) { setStatus(e.message, true); }
}

async function searchFile(file) {
  setStatus(`embedding ${file.name}…`);
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const out = await api(`/api/search?k=${k()}`, { method: "POST", body: form });
    history.replaceState(null, "", location.pathname);
    showResults(out, URL.createObjectURL(file));
  } catch (e) { setStatus(e.message, true); }
}

function showTab(name) {
  if (name !== "map") cancelMapHash();
  for (const tab of ["search", "clusters", "map", "labels", "audit"]) {
    $(`tab-${tab}`).classList.toggle("active", name === tab);
  }
  $("results").hidden = name !== "search" && name !== "labels" && name !== "audit";
  $("labels-panel").hidden = name !== "labels";
  $("audit-panel").hidden = name !== "audit";
  $("query-panel").hidden = name !== "search";
  $("clusters").hidden = name !== "clusters";
  $("map").hidden = name !== "map";
}

// The map tab: isif map's map-full.png (thumbnails on a grid) in a viewport; drag pans, the wheel zooms around the
// pointer, +/- around the centre; a click on a thumbnail searches with it. The view is kept in the address as
// #map=ZOOM,X,Y (screen pixels per map pixel; the map pixel at the centre of the view), plain #map when fitted.
const MAX_THUMB_PX = 256;  // zoomed in at most until a thumbnail is this wide on screen (or twice its pixels)
const DRAG_PX = 4;  // a press that moves less is a click
const view = { layout: null, cells: null, loading: null, zoom: 1, cx: 0, cy: 0, fit: true, drag: null, timer: null };

function loadMap() {
  if (!view.loading) {
    view.loading = (async () => {
      const layout = await api("/api/map");
      view.cells = new Map(layout.cells.map(([c, r], j) => [r * layout.cols + c, j]));
      const img = $("map-img");
      await new Promise((resolve, reject) => {
        img.addEventListener("load", resolve, { once: true });
        img.addEventListener("error", () => reject(new Error("the map picture did not load")), { once: true });
        img.src = `/api/map.png?v=${encodeURIComponent(layout.version)}`;
      });
      view.layout = layout;
      return layout;
    })();
    view.loading.catch(() => { view.loading = null; });  // a later visit tries again
  }
  return view.loading;
}

function viewSize() {
  const v = $("map-view");
  return [v.clientWidth, v.clientHeight];
}

function fitZoom() {
  const [w, h] = viewSize();
  return Math.min(w / view.layout.width, h / view.layout.height);
}

function clampZoom(z) {
  return Math.min(Math.max(z, Math.min(fitZoom(), 1) / 2), Math.max(2, MAX_THUMB_PX / view.layout.tile, fitZoom()));
}

function applyView() {
  const [w, h] = viewSize();
  if (view.fit) {
    view.zoom = fitZoom();
    [view.cx, view.cy] = [view.layout.width / 2, view.layout.height / 2];
  }
  const tx = w / 2 - view.cx * view.zoom, ty = h / 2 - view.cy * view.zoom;
  $("map-img").style.transform = `translate(${tx}px, ${ty}px) scale(${view.zoom})`;
}

function mapHash() {
  return view.fit ? "#map" : `#map=${+view.zoom.toPrecision(4)},${view.cx.toFixed(1)},${view.cy.toFixed(1)}`;
}

function saveMapHash(now = false) {
  // replaceState, not a new history entry per step; at most every 200 ms (browsers throttle it)
  cancelMapHash();
  if (now) history.replaceState(null, "", mapHash());
  else view.timer = setTimeout(() => { view.timer = null; history.replaceState(null, "", mapHash()); }, 200);
}

function cancelMapHash() {
  clearTimeout(view.timer);
  view.timer = null;
}

function flushMapHash() {
  if (view.timer !== null) saveMapHash(true);
}

function parseMapHash(hash) {
  const m = hash.match(/^#map(?:=([^,]+),([^,]+),([^,]+))?$/);
  if (!m) return null;
  const [z, x, y] = m.slice(1).map(Number);
  return m[1] !== undefined && z > 0 && Number.isFinite(z) && Number.isFinite(x) && Number.isFinite(y)
    ? { zoom: z, cx: x, cy: y } : {};
}

async function showMap(wanted) {
  showTab("map");
  if (!view.layout) setStatus("loading the map…");
  let layout;
  try {
    layout = await loadMap();
  } catch (e) { setStatus(e.message, true); return; }
  if ($("map").hidden) return;  // the user went elsewhere while it loaded
  view.fit = wanted.zoom === undefined;
  if (!view.fit) {
    view.zoom = clampZoom(wanted.zoom);
    [view.cx, view.cy] = [wanted.cx, wanted.cy];
  }
  applyView();
  const colour = layout.colour === "none" ? "" : `, framed by ${layout.colour}`;
  setStatus(`${layout.method.toUpperCase()} map of ${layout.cells.length} thumbnails${colour}: drag to pan, ` +
    "wheel or +/− to zoom, click a thumbnail to search with it");
}

function zoomAt(sx, sy, factor) {
  const z = clampZoom(view.zoom * factor);
  const [w, h] = viewSize();
  // the map pixel under (sx, sy) stays there
  view.cx += (sx - w / 2) * (1 / view.zoom - 1 / z);
  view.cy += (sy - h / 2) * (1 / view.zoom - 1 / z);
  view.zoom = z;
  view.fit = false;
  applyView();
  saveMapHash();
}

function pan(dx, dy) {
  view.cx -= dx / view.zoom;
  view.cy -= dy / view.zoom;
  view.fit = false;
  applyView();
  saveMapHash();
}

function local(e) {
  const v = $("map-view"), r = v.getBoundingClientRect();
  return [e.clientX - r.left - v.clientLeft, e.clientY - r.top - v.clientTop];
}

function cellAt(sx, sy) {
  // the index into layout.cells of the thumbnail under view point (sx, sy), or undefined
  const g = view.layout;
  if (!g || $("map").hidden) return undefined;
  const [w, h] = viewSize();
  const x = view.cx + (sx - w / 2) / view.zoom, y = view.cy + (sy - h / 2) / view.zoom;
  const c = Math.floor((x - g.left) / g.tile), r = Math.floor((y - g.top) / g.tile);
  return c >= 0 && c < g.cols && r >= 0 && r < g.rows ? view.cells.get(r * g.cols + c) : undefined;
}

function hover(sx, sy) {
  const j = cellAt(sx, sy), label = $("map-label"), v = $("map-view");
  v.classList.toggle("over-cell", j !== undefined);
  if (j === undefined) { label.hidden = true; return; }
  label.textContent = view.layout.paths[j];
  label.hidden = false;
  const [w, h] = viewSize();
  label.style.left = `${Math.max(0, Math.min(sx + 14, w - label.offsetWidth - 4))}px`;
  label.style.top = `${sy + 18 + label.offsetHeight < h ? sy + 18 : sy - 10 - label.offsetHeight}px`;
}

function setupMap() {
  const v = $("map-view");
  v.tabIndex = 0;
  v.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || !view.layout) return;
    const [sx, sy] = local(e);
    view.drag = { id: e.pointerId, sx, sy, x: sx, y: sy, moved: false };
    v.setPointerCapture(e.pointerId);
  });
  v.addEventListener("pointermove", (e) => {
    const [sx, sy] = local(e), d = view.drag;
    if (!d || d.id !== e.pointerId) { hover(sx, sy); return; }
    if (!d.moved && Math.hypot(sx - d.sx, sy - d.sy) < DRAG_PX) return;
    d.moved = true;
    v.classList.add("dragging");
    $("map-label").hidden = true;
    pan(sx - d.x, sy - d.y);
    [d.x, d.y] = [sx, sy];
  });
  v.addEventListener("pointerup", (e) => {
    const d = view.drag;
    if (!d || d.id !== e.pointerId) return;
    view.drag = null;
    v.classList.remove("dragging");
    if (d.moved) return;
    const j = cellAt(...local(e));
    if (j === undefined) return;
    flushMapHash();  // the map entry keeps this view, so Back returns to it
    location.hash = `id=${view.layout.cells[j][2]}`;
  });
  v.addEventListener("pointercancel", () => { view.drag = null; v.classList.remove("dragging"); });
  v.addEventListener("pointerleave", () => { $("map-label").hidden = true; });
  v.addEventListener("wheel", (e) => {
    if (!view.layout) return;
    e.preventDefault();
    const dy = e.deltaY * (e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? viewSize()[1] : 1);
    zoomAt(...local(e), Math.pow(2, -Math.max(-300, Math.min(300, dy)) / 300));
  }, { passive: false });
  v.addEventListener("keydown", (e) => {
    if (!view.layout) return;
    const [w, h] = viewSize();
    const keys = { "+": () => zoomAt(w / 2, h / 2, 1.5), "=": () => zoomAt(w / 2, h / 2, 1.5),
      "-": () => zoomAt(w / 2, h / 2, 1 / 1.5), "0": fitMap, ArrowLeft: () => pan(60, 0),
      ArrowRight: () => pan(-60, 0), ArrowUp: () => pan(0, 60), ArrowDown: () => pan(0, -60) };
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
  });
  $("map-in").addEventListener("click", () => { if (view.layout) zoomAt(viewSize()[0] / 2, viewSize()[1] / 2, 1.5); });
  $("map-out").addEventListener("click", () => {
    if (view.layout) zoomAt(viewSize()[0] / 2, viewSize()[1] / 2, 1 / 1.5);
  });
  $("map-fit").addEventListener("click", fitMap);
  window.addEventListener("resize", () => { if (view.layout && !$("map").hidden) applyView(); });
}

function fitMap() {
  if (!view.layout) return;
  view.fit = true;
  applyView();
  saveMapHash(true);
}

function leaveMap() {
  // a tab other than the map: a new history entry without the map's hash, so Back returns to the map
  if (location.hash.startsWith("#map")) {
    flushMapHash();
    history.pushState(null, "", location.pathname + location.search);
  }
}

function go(hash) {
  if (location.hash === `#${hash}`) route(); else location.hash = hash;
}

async function showClusters() {
  showTab("clusters");
  setStatus("loading clusters…");
  try {
    const out = await api("/api/clusters");
    $("clusters").replaceChildren(...out.clusters.map((c) => {
      const row = document.createElement("div");
      row.className = "cluster";
      row.dataset.cluster = c.cluster;
      const title = document.createElement("div");
      title.className = "title";
      title.textContent = `cluster ${c.cluster} · ${c.size}`;
      row.append(title, ...c.preview.map((id) => {
        const img = document.createElement("img");
        img.loading = "lazy";
        img.src = `/api/thumb/${id}?size=128`;
        return img;
      }));
      row.addEventListener("click", () => { location.hash = `cluster=${c.cluster}`; });
      return row;
    }));
    setStatus(`${out.k} clusters (isif cluster); click one to see its images, most central first`);
  } catch (e) { setStatus(e.message, true); }
}

async function showCluster(c) {
  setStatus("loading cluster…");
  try {
    const out = await api(`/api/clusters/${c}?limit=200`);
    showTab("search");
    $("query").hidden = true;
    $("results").replaceChildren(...out.images.map((r) => card(r, (item) => { location.hash = `id=${item.id}`; })));
    setStatus(`cluster ${c}: ${out.size} images, the ${out.images.length} most central; click one to search`);
  } catch (e) { setStatus(e.message, true); }
}

// The labels tab: isif select's Label next list, isif label's suspects (likeliest wrong first) and its labels, one
// class at a time (most confident first); routed as #labels=next, #labels=suspects and #labels=class-J.
const LIST_TITLES = { next: "label next (isif select), in pick order", suspects: "given labels, likeliest wrong first" };

async function showLabels(which) {
  showTab("labels");
  $("query").hidden = true;
  for (const w of ["next", "suspects"]) $(`list-${w}`).classList.toggle("active", which === w);
  if (which.startsWith("class-")) $("class-select").value = which.slice(6);
  setStatus("loading…");
  try {
    const out = await api(`/api/labels/${which}?limit=200`);
    $("results").replaceChildren(...out.images.map((r) => card(r, (item) => { location.hash = `id=${item.id}`; })));
    const title = LIST_TITLES[which] || `labelled ${info.labelling.classes[+which.slice(6)].label}, most confident first`;
    setStatus(`${title}: ${out.total} images` + (out.total > out.images.length ? `, the first ${out.images.length}` : "") +
      "; click one to search");
  } catch (e) { setStatus(e.message, true); }
}

function setupLabels() {
  const lab = info.labelling;
  $("tab-labels").hidden = !lab;
  if (!lab) return;
  $("list-next").hidden = !lab.next;
  $("list-suspects").hidden = !lab.suspects;
  $("class-filter").hidden = !lab.classes.length;
  $("class-select").replaceChildren(...lab.classes.map((c, j) => {
    const o = document.createElement("option");
    o.value = j;
    o.textContent = `${c.label} (${c.count})`;
    return o;
  }));
  $("list-next").addEventListener("click", () => go("labels=next"));
  $("list-suspects").addEventListener("click", () => go("labels=suspects"));
  $("class-select").addEventListener("change", (e) => go(`labels=class-${e.target.value}`));
  const first = lab.next ? "next" : (lab.suspects ? "suspects" : "class-0");
  $("tab-labels").addEventListener("click", () => { leaveMap(); go(`labels=${first}`); });
}

// The audit tab: isif audit's flagged images of one issue, the worst first, or every image whose score for it is at
// least a number; routed as #audit=ISSUE and #audit=ISSUE@MIN.
async function showAudit(issue, min) {
  showTab("audit");
  $("query").hidden = true;
  $("audit-issue").value = issue;
  $("audit-min").value = min === undefined ? "" : min;
  setStatus("loading…");
  try {
    const q = min === undefined ? "" : `&min_score=${encodeURIComponent(min)}`;
    const out = await api(`/api/audit/${encodeURIComponent(issue)}?limit=200${q}`);
    $("results").replaceChildren(...out.images.map((r) => card(r, (item) => { location.hash = `id=${item.id}`; })));
    const what = min === undefined ? "flagged" : `with a score of at least ${min}`;
    setStatus(`${issue}: ${out.total} images ${what}` + (out.total > out.images.length ? `, the worst ${out.images.length}` :
      "") + "; click one to search");
  } catch (e) { setStatus(e.message, true); }
}

function auditHash() {
  const min = $("audit-min").value.trim();
  return `audit=${$("audit-issue").value}` + (min === "" ? "" : `@${min}`);
}

function setupAudit() {
  const issues = info.audit;
  $("tab-audit").hidden = !issues;
  if (!issues) return;
  $("audit-issue").replaceChildren(...issues.map((c) => {
    const o = document.createElement("option");
    o.value = c.issue;
    o.textContent = `${c.issue} (${c.count})`;
    return o;
  }));
  $("audit-issue").addEventListener("change", () => go(auditHash()));
  $("audit-min").addEventListener("change", () => go(auditHash()));
  const first = (issues.find((c) => c.count) || issues[0]).issue;
  $("tab-audit").addEventListener("click", () => { leaveMap(); go(`audit=${first}`); });
}

function route() {
  const wanted = parseMapHash(location.hash);
  if (wanted) { showMap(wanted); return; }
  cancelMapHash();
  const l = location.hash.match(/^#labels=(next|suspects|class-\d+)$/);
  if (l) { showLabels(l[1]); return; }
  const a = location.hash.match(/^#audit=([a-z_]+)(?:@(-?[0-9.]+))?$/);
  if (a) { showAudit(a[1], a[2]); return; }
  const m = location.hash.match(/^#(id|cluster)=(\d+)$/);
  if (m) {
    if (m[1] === "id") searchId(m[2]); else showCluster(m[2]);
  } else if (location.hash === "" || location.hash === "#") {
    showTab("search");
  }
}

async function start() {
  try {
    info = await api("/api/info");
  } catch (e) { setStatus(e.message, true); return; }
  $("k").value = info.default_k;
  $("k").max = info.max_k;
  const recall = info.index.kind.startsWith("exact") ? "" : `, Recall@10 ${info.index["recall@10"].toFixed(3)}`;
  $("info").textContent = `${info.images} images · ${info.dim}-d · ${info.index.kind}${recall}` +
    (info.clusters ? ` · ${info.clusters} clusters` : "") + (info.map ? ` · a map` : "") +
    (info.labelling && info.labelling.classes.length ? ` · ${info.labelling.classes.length} labels` : "");
  $("tab-clusters").hidden = !info.clusters;
  $("tab-map").hidden = !info.map;
  setupLabels();
  setupAudit();
  $("tab-search").addEventListener("click", () => { leaveMap(); showTab("search"); });
  $("tab-clusters").addEventListener("click", () => { leaveMap(); showClusters(); });
  $("tab-map").addEventListener("click", () => go(view.layout ? mapHash().slice(1) : "map"));  // the last view
  setupMap();
  $("file").addEventListener("change", (e) => { if (e.target.files[0]) searchFile(e.target.files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) searchFile(e.dataTransfer.files[0]);
  });
  window.addEventListener("hashchange", route);
  setStatus(["drop an image", info.clusters && "open a cluster", info.map && "explore the map"].filter(Boolean)
    .join(", or "));
  route();
}

start();
