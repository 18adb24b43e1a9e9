// The retr page: search a photo, see the landmark, the results and their match pictures;
// list the index, add and remove photos. Plain DOM and fetch, no build step. Every piece of
// text from the server goes through textContent (never innerHTML).
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 50;
let offset = 0;

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

let service = { token_required: false, private_reads: false };  // from /info, once read

async function call(url, options = {}) {
  // Every request carries the token when one is entered: with --private-reads, reads need it.
  const response = await fetch(url, { ...options, headers: { ...authHeaders(), ...(options.headers ?? {}) } });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const retry = response.headers.get("retry-after");
    const why = body?.detail ?? response.statusText;
    throw new Error(`${response.status}: ${why}${retry ? ` (retry in ${retry} s)` : ""}`);
  }
  return body;
}

function authHeaders() {
  const token = $("token").value.trim();
  sessionStorage.setItem("retr-token", token);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// Object URLs this page made, by the <img> showing each: revoked when the image changes, so a
// long session holds only what it shows.
const objectUrls = new WeakMap();

function showBlob(img, blob) {
  const old = objectUrls.get(img);
  if (old) URL.revokeObjectURL(old);
  const url = URL.createObjectURL(blob);
  objectUrls.set(img, url);
  img.src = url;
}

// An image of the API: fetched with the token (an <img src> cannot send it) when reads are
// private, else loaded directly by the browser (lazily).
function setImage(img, url) {
  if (!service.private_reads) {
    img.src = url;
    return;
  }
  fetch(url, { headers: authHeaders() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
    .then((blob) => showBlob(img, blob))
    .catch(() => img.dispatchEvent(new Event("error")));
}

function image(url, props) {
  const img = el("img", props);
  setImage(img, url);
  return img;
}

function canWrite() {
  return !service.token_required || $("token").value.trim() !== "";
}

async function readService() {
  try {
    const info = await call("/info");
    service = info.service ?? service;
    $("k").max = String(Math.max(1, info.vectors));
  } catch (error) {
    // /info needs the token with --private-reads: the page asks for it when it is used
  }
}

// --- search ------------------------------------------------------------------------------

async function search(file) {
  const form = new FormData();
  form.append("image", file);
  const params = new URLSearchParams({ k: $("k").value, rerank: $("rerank").checked });
  $("status").textContent = `searching ${file.name}…`;
  showBlob($("query-preview"), file);
  try {
    const result = await call(`/search?${params}`, { method: "POST", body: form });
    show(result);
    $("status").textContent = "";
  } catch (error) {
    $("status").textContent = `error: ${error.message}`;
  }
}

function show(result) {
  $("outcome").hidden = false;
  $("landmark").textContent = result.landmark;
  $("confidence").textContent = `confidence ${result.confidence.toFixed(2)}`;
  const seconds = Object.values(result.timings).reduce((a, b) => a + b, 0);
  $("timing").textContent = `${seconds.toFixed(2)} s, index generation ${result.generation}`;
  const grid = $("results");
  grid.replaceChildren();
  $("match").hidden = true;
  result.results.forEach((m, i) => {
    const card = el("button", { type: "button", className: "card", title: m.path }, [
      image(`/images/${m.id}?size=256`, { alt: m.path, loading: "lazy" }),
      el("div", { className: "label", textContent: `${i + 1}. ${m.label ?? "—"}` }),
      el("div", { className: "muted", textContent: `global ${m.global_score.toFixed(3)}` }),
      el("div", {
        className: m.verified ? "inliers verified" : "inliers",
        textContent: `${m.inliers} inliers${m.verified ? " ✓" : ""}`,
      }),
      el("div", { className: "muted", textContent: m.matcher ? `by ${m.matcher}` : "global only" }),
    ]);
    card.dataset.id = m.id;
    card.addEventListener("click", () => showMatch(result.search_id, m, card));
    grid.append(card);
  });
  if (!result.results.length) grid.append(el("p", { textContent: "no results" }));
}

function showMatch(searchId, match, card) {
  for (const c of document.querySelectorAll(".card.selected")) c.classList.remove("selected");
  card.classList.add("selected");
  $("match").hidden = false;
  $("match-caption").textContent = `drawing the matches with ${match.path}…`;
  const img = $("match-img");
  img.onload = () => {
    $("match-caption").textContent = `query ↔ ${match.path} (${match.label ?? "no label"})`;
  };
  img.onerror = () => {
    $("match-caption").textContent = `no match picture for ${match.path} (search again?)`;
  };
  setImage(img, `/matches/${searchId}/${match.id}.png`);
}

// --- the index ---------------------------------------------------------------------------

async function loadIndex() {
  try {
    const info = await call("/info");
    service = info.service ?? service;
    const rows = [["generation", info.generation], ["vectors", info.vectors],
      ...Object.entries(info.images).map(([status, n]) => [`images ${status}`, n]),
      ["local features", info.config.local_method], ["global model", info.config.global_model]];
    $("info").replaceChildren(...rows.map(([k, v]) =>
      el("tr", {}, [el("th", { textContent: k }), el("td", { textContent: String(v) })])));
    const failed = await call("/images?status=failed&limit=1000");
    $("failed").replaceChildren(...failed.images.map((r) =>
      el("li", { textContent: `${r.path}: ${r.reason}` })));
    if (!failed.images.length) $("failed").append(el("li", { className: "muted", textContent: "none" }));
    await loadImages();
  } catch (error) {
    $("info").replaceChildren(el("tr", {}, [el("td", { textContent: `error: ${error.message}` })]));
  }
}

async function loadImages() {
  const list = await call(`/images?status=indexed&offset=${offset}&limit=${PAGE}`);
  $("page").textContent = `${list.total ? offset + 1 : 0}–${offset + list.images.length} of ${list.total}`;
  $("prev").disabled = offset === 0;
  $("next").disabled = offset + PAGE >= list.total;
  $("images").tBodies[0].replaceChildren(...list.images.map((r) => {
    // a remove button only where it can work: the service needs no token, or one is entered
    const remove = el("button", { type: "button", textContent: "remove", className: "remove" });
    remove.addEventListener("click", () => removeImage(r));
    return el("tr", {}, [
      el("td", { textContent: r.id }),
      el("td", {}, [image(`/images/${r.id}?size=64`, { alt: "", loading: "lazy" })]),
      el("td", { textContent: r.path }),
      el("td", { textContent: r.label ?? "" }),
      el("td", { textContent: r.status }),
      el("td", {}, canWrite() ? [remove] : []),
    ]);
  }));
}

async function removeImage(record) {
  if (!confirm(`Remove ${record.path} from the index?`)) return;
  try {
    await call(`/images/${record.id}`, { method: "DELETE" });
    await loadIndex();
  } catch (error) {
    alert(`not removed: ${error.message}`);
  }
}

async function addImages(event) {
  event.preventDefault();
  const files = $("add-files").files;
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("images", f);
  if ($("add-label").value.trim()) form.append("label", $("add-label").value.trim());
  const out = $("add-result");
  out.replaceChildren(el("li", { className: "muted", textContent: `indexing ${files.length} file(s)…` }));
  try {
    const result = await call("/images", { method: "POST", body: form });
    out.replaceChildren(...result.files.map((f) =>
      el("li", { textContent: `${f.name}: ${f.outcome}${f.id ? ` (id ${f.id})` : ""}${f.reason ? ` — ${f.reason}` : ""}` })));
    await loadIndex();
  } catch (error) {
    out.replaceChildren(el("li", { className: "error", textContent: error.message }));
  }
}

// --- wiring ------------------------------------------------------------------------------

function switchTo(view) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.view === view);
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("active", v.id === view);
  if (view === "index-view") loadIndex();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem("retr-token") ?? "";
  $("token").addEventListener("change", () => readService().then(() => {
    if ($("index-view").classList.contains("active")) loadIndex();
  }));
  readService();
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => switchTo(t.dataset.view));
  $("file").addEventListener("change", () => $("file").files[0] && search($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) search(e.dataTransfer.files[0]);
  });
  $("add-form").addEventListener("submit", addImages);
  $("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); loadImages(); });
  $("next").addEventListener("click", () => { offset += PAGE; loadImages(); });
  call("/health").then((h) => { $("health").textContent = `${h.images} images, generation ${h.generation}`; })
    .catch((e) => { $("health").textContent = `service unreachable: ${e.message}`; });
});
