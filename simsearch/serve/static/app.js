// simsearch serve: the page. Plain JS, no dependencies. State lives in the URL:
//   /?id=N            neighbours of indexed image N      /?view=clusters       the clusters
//   /?path=P          neighbours of an indexed path      /?cluster=C&page=P    a cluster's members
//   /?view=duplicates&page=P   groups of near-duplicates  /?view=labels         the classes
//   /?label=L&source=S&page=P  one class's images (S: given, predicted, or absent for both)
// An upload's results are kept in the history entry's state (an upload has no URL of its own).
"use strict";

const $ = (sel) => document.querySelector(sel);
const token = new URLSearchParams(location.search).get("token");
const PAGE = 48;
const GROUPS = 12;  // duplicate groups per page
const VIEWS = ["search", "clusters", "duplicates", "labels"];

function withToken(url) {
  if (!token) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}

function pageUrl(params) {
  const q = new URLSearchParams(params);
  if (token) q.set("token", token);
  const s = q.toString();
  return "/" + (s ? "?" + s : "");
}

async function api(url, options) {
  const res = await fetch(withToken(url), options);
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
  return body;
}

function thumb(id, size) { return withToken(`/api/images/${id}/thumbnail?size=${size || 256}`); }

function setStatus(text, isError) {
  const el = $("#status");
  el.textContent = text || "";
  el.classList.toggle("error", !!isError);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function showView(view) {
  for (const v of VIEWS) $(`#${v}-view`).hidden = view !== v;
  for (const a of document.querySelectorAll("nav a[data-view]")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const grid = $("#grid");
  grid.replaceChildren();
  grid.className = "grid";
  $("#pager").replaceChildren();
}

function pager(params, page, pages) {
  const nav = $("#pager");
  nav.replaceChildren();
  if (page > 0) nav.append(el("a", { href: pageUrl({ ...params, page: page - 1 }), "data-nav": "", rel: "prev" }, "← previous"));
  if (pages > 1) nav.append(el("span", { class: "muted" }, `page ${page + 1} of ${pages}`));
  if (page + 1 < pages) nav.append(el("a", { href: pageUrl({ ...params, page: page + 1 }), "data-nav": "", rel: "next" }, "next →"));
}

function card(item, caption, extraClass) {
  const label = `${item.name}${caption ? ", " + caption : ""}`;
  const link = el("a", { href: pageUrl({ id: item.id }), "data-nav": "", "data-id": item.id, title: item.path, "aria-label": label },
    el("img", { src: thumb(item.id), alt: item.name, loading: "lazy", width: 256, height: 256 }),
    el("span", { class: "cap" }, el("span", { class: "name" }, item.name), el("span", { class: "score" }, caption || "")));
  return el("li", { class: extraClass || "" }, link);
}

function showQuery(query, src) {
  const box = $("#query");
  box.hidden = false;
  const title = query.path ? "Neighbours of" : "Neighbours of your image";
  box.replaceChildren(el("img", { src, alt: "query image" }),
    el("div", {}, el("strong", {}, title), el("div", { class: "path" }, query.path || query.upload || "")));
}

function showResults(body) {
  const grid = $("#grid");
  grid.setAttribute("aria-label", "results");
  grid.replaceChildren(...body.results.map((r) => card(r, r.score.toFixed(3), "result")));
  setStatus(body.results.length ? `${body.results.length} most similar images` : "no results");
}

async function searchIndexed(params) {
  showView("search");
  setStatus("searching…");
  const q = new URLSearchParams(params);
  q.set("k", $("#k").value);
  const body = await api(`/api/search?${q}`);
  showQuery(body.query, thumb(body.query.id));
  showResults(body);
}

async function upload(file) {
  if (!file) return;
  showView("search");
  setStatus(`searching with ${file.name || "the pasted image"}…`);
  const form = new FormData();
  form.append("image", file, file.name || "pasted.png");
  try {
    const body = await api(`/api/search?k=${$("#k").value}`, { method: "POST", body: form });
    const src = URL.createObjectURL(file);
    history.pushState({ upload: body, src }, "", pageUrl({}));
    renderUpload(body, src);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function renderUpload(body, src) {
  showView("search");
  showQuery(body.query, src || "");
  showResults(body);
}

async function showClusters() {
  showView("clusters");
  setStatus("loading clusters…");
  const view = $("#clusters-view");
  const body = await api("/api/clusters?representatives=4");
  view.replaceChildren(el("h2", {}, `${body.clusters.length} clusters of ${body.clustering.n} images`));
  const grid = $("#grid");
  grid.setAttribute("aria-label", "clusters");
  grid.replaceChildren(...body.clusters.map((c) => {
    const reps = c.representatives.length >= 4 ? c.representatives.slice(0, 4) : c.representatives.slice(0, 1);
    const mosaic = el("span", { class: reps.length === 4 ? "mosaic" : "mosaic one" },
      ...reps.map((m) => el("img", { src: thumb(m.id, reps.length === 4 ? 160 : 256), alt: m.name })));
    const link = el("a", { href: pageUrl({ cluster: c.cluster }), "data-nav": "", "aria-label": `cluster ${c.cluster}, ${c.size} images` },
      mosaic, el("span", { class: "cap" }, el("span", { class: "name" }, `cluster ${c.cluster}`), el("span", { class: "score" }, `${c.size}`)));
    return el("li", { class: "cluster" }, link);
  }));
  setStatus("open a cluster to see its members");
}

async function showCluster(cluster, page) {
  showView("clusters");
  setStatus("loading members…");
  const body = await api(`/api/clusters/${cluster}?offset=${page * PAGE}&limit=${PAGE}`);
  const pages = Math.max(1, Math.ceil(body.size / PAGE));
  $("#clusters-view").replaceChildren(el("h2", {}, `Cluster ${cluster}: ${body.size} images`),
    el("a", { href: pageUrl({ view: "clusters" }), "data-nav": "" }, "← all clusters"));
  const grid = $("#grid");
  grid.setAttribute("aria-label", "cluster members");
  grid.replaceChildren(...body.members.map((m) => card(m, m.distance.toFixed(3), "member")));
  pager({ cluster }, page, pages);
  setStatus("");
}

async function showDuplicates(page) {
  showView("duplicates");
  setStatus("finding duplicates…");
  const view = $("#duplicates-view");
  let body;
  try {
    body = await api(`/api/duplicates?offset=${page * GROUPS}&limit=${GROUPS}`);
  } catch (e) {
    view.replaceChildren(el("h2", {}, "Duplicates"));
    throw e;
  }
  const pages = Math.max(1, Math.ceil(body.total / GROUPS));
  view.replaceChildren(el("h2", {}, `${body.total} groups of near-duplicates, ${body.duplicates} copies`),
    el("p", { class: "muted" }, `cosine ≥ ${body.threshold} (${body.threshold_source}); the first image of each group is the one to keep. ` +
      "Read-only: move copies with simsearch duplicates --move-to."));
  const grid = $("#grid");
  grid.className = "groups";
  grid.setAttribute("aria-label", "duplicate groups");
  grid.replaceChildren(...body.groups.map((g, n) => {
    const members = el("ol", { class: "grid" }, ...g.members.map((m) =>
      card(m, m.keeper ? "keep" : (m.identical ? "identical" : m.score.toFixed(3)), m.keeper ? "member keeper" : "member")));
    return el("li", { class: "group" }, el("h3", {}, `group ${page * GROUPS + n + 1} · ${g.members.length} images`), members);
  }));
  pager({ view: "duplicates" }, page, pages);
  setStatus(body.total ? "" : "no near-duplicates at this threshold");
}

async function showLabels() {
  showView("labels");
  setStatus("loading labels…");
  const body = await api("/api/labels");
  $("#labels-view").replaceChildren(el("h2", {}, `${body.classes.length} classes`),
    el("p", { class: "muted" }, `${body.given} given and ${body.predicted} predicted labels on ${body.indexed} images` +
      (body.classes.length ? "" : ": import some with simsearch labels import, predict with simsearch classify --write")));
  const grid = $("#grid");
  grid.setAttribute("aria-label", "classes");
  grid.replaceChildren(...body.classes.map((c) => {
    const counts = [c.given ? `${c.given} given` : "", c.predicted ? `${c.predicted} predicted` : ""].filter(Boolean).join(", ");
    const link = el("a", { href: pageUrl({ label: c.label }), "data-nav": "", "aria-label": `${c.label}: ${counts}` },
      c.example === null ? el("span", { class: "noimg" }) : el("img", { src: thumb(c.example), alt: c.label, loading: "lazy", width: 256, height: 256 }),
      el("span", { class: "cap" }, el("span", { class: "name" }, c.label), el("span", { class: "score" }, `${c.given + c.predicted}`)));
    return el("li", { class: "class" }, link);
  }));
  setStatus(body.classes.length ? "open a class to see its images" : "");
}

async function showLabel(label, source, page) {
  showView("labels");
  setStatus("loading images…");
  const q = new URLSearchParams({ label, offset: page * PAGE, limit: PAGE });
  if (source) q.set("source", source);
  const body = await api(`/api/labels/images?${q}`);
  const pages = Math.max(1, Math.ceil(body.total / PAGE));
  const filters = el("p", { class: "filters" }, ...[["", "all"], ["given", "given"], ["predicted", "predicted"]].map(([s, text]) => {
    const params = s ? { label, source: s } : { label };
    const a = el("a", { href: pageUrl(params), "data-nav": "" }, text);
    if ((source || "") === s) a.setAttribute("aria-current", "true");
    return a;
  }));
  $("#labels-view").replaceChildren(el("h2", {}, `${label}: ${body.total} images`),
    el("a", { href: pageUrl({ view: "labels" }), "data-nav": "" }, "← all classes"), filters,
    el("p", { class: "muted" }, "Given labels first, then predictions with their confidence."));
  const grid = $("#grid");
  grid.setAttribute("aria-label", `images labelled ${label}`);
  grid.replaceChildren(...body.members.map((m) =>
    card(m, m.source === "given" ? "given" : `${m.confidence === null ? "predicted" : m.confidence.toFixed(2)}`, `member ${m.source}`)));
  pager(source ? { label, source } : { label }, page, pages);
  setStatus("");
}

// Render whatever the URL (and the history entry) says.
async function route() {
  const q = new URLSearchParams(location.search);
  try {
    if (history.state && history.state.upload) return renderUpload(history.state.upload, history.state.src);
    if (q.has("id")) return await searchIndexed({ id: q.get("id") });
    if (q.has("path")) return await searchIndexed({ path: q.get("path") });
    if (q.has("cluster")) return await showCluster(Number(q.get("cluster")), Number(q.get("page") || 0));
    if (q.get("view") === "clusters") return await showClusters();
    if (q.get("view") === "duplicates") return await showDuplicates(Number(q.get("page") || 0));
    if (q.has("label")) return await showLabel(q.get("label"), q.get("source"), Number(q.get("page") || 0));
    if (q.get("view") === "labels") return await showLabels();
    showView("search");
    $("#query").hidden = true;
    setStatus("");
  } catch (e) {
    setStatus(e.message, true);
  }
}

function navigate(href) {
  history.pushState(null, "", href);
  route();
  window.scrollTo(0, 0);
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-nav]");
  if (!a || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);

const drop = $("#drop");
$("#file").addEventListener("change", (e) => upload(e.target.files[0]));
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("#file").click(); }
});
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); upload(e.dataTransfer.files[0]); });
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
  if (item) upload(item.getAsFile());
});
$("#k").addEventListener("change", () => { if (!(history.state && history.state.upload)) route(); });

api("/api/info").then((info) => {
  $("#info").textContent = `${info.indexed.toLocaleString()} images · ${info.model} · ${info.dim}-d`;
}).catch((e) => setStatus(e.message, true));
route();
