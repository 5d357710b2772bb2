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
  $("tab-search").classList.toggle("active", name === "search");
  $("tab-clusters").classList.toggle("active", name === "clusters");
  $("results").hidden = name !== "search";
  $("query-panel").hidden = name !== "search";
  $("clusters").hidden = name !== "clusters";
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

function route() {
  const m = location.hash.match(/^#(id|cluster)=(\d+)$/);
  if (!m) return;
  if (m[1] === "id") searchId(m[2]); else showCluster(m[2]);
}

async function start() {
  try {
    info = await api("/api/info");
  } catch (e) { setStatus(e.message, true); return; }
  $("k").value = info.default_k;
  $("k").max = info.max_k;
  const recall = info.index.kind.startsWith("exact") ? "" : `, Recall@10 ${info.index["recall@10"].toFixed(3)}`;
  $("info").textContent = `${info.images} images · ${info.dim}-d · ${info.index.kind}${recall}` +
    (info.clusters ? ` · ${info.clusters} clusters` : "");
  $("tab-clusters").hidden = !info.clusters;
  $("tab-search").addEventListener("click", () => showTab("search"));
  $("tab-clusters").addEventListener("click", showClusters);
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
  setStatus("drop an image, or open a cluster");
  route();
}

start();
