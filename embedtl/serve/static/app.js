// The search page. The query is an uploaded or dropped image, or a store row (a click on a
// result or a sample, or a /?store=S&row=N link); Search runs the current query with the
// current filters. Each query is a history entry (Back returns to the previous one); a row
// query's address holds the row and its filters. Results come from POST /api/search, the
// head's classes of an upload from POST /api/predict; everything is drawn with DOM nodes and
// textContent (no HTML is built from the server's strings).
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const fileInput = $("file");
  const drop = $("drop");
  const storeSel = $("store");
  const labelSel = $("label");
  const splitSel = $("split");
  const kInput = $("k");
  const headSel = $("head");
  const status = $("status");
  const results = $("results");
  const queryBox = $("query");
  const panel = $("query-panel");
  const prediction = $("prediction");
  const note = $("score-note");
  const sampleBox = $("sample");
  const samplePanel = $("sample-panel");
  const DEFAULT_K = "12";
  const KEPT_UPLOADS = 20;

  const uploads = new Map(); // history entries of uploads: id -> query (a File is not in a URL)
  let nextUpload = 1;
  let current = null; // {kind: "row", store, row} | {kind: "file", id, file}
  let generation = 0; // a newer query makes the answers to older ones moot

  const enc = encodeURIComponent;
  const storeInfo = (id) => data.stores.find((s) => String(s.id) === String(id));

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function setStatus(text, isError) {
    status.textContent = text;
    status.className = isError ? "status error" : "status";
  }

  function fillLabels() {
    const keep = labelSel.value;
    const s = storeInfo(storeSel.value);
    labelSel.replaceChildren(new Option("any", ""));
    for (const c of (s && s.classes) || []) labelSel.add(new Option(c, c));
    labelSel.value = Array.from(labelSel.options).some((o) => o.value === keep) ? keep : "";
  }

  function filters() {
    return { store: storeSel.value, k: kInput.value || DEFAULT_K, split: splitSel.value, label: labelSel.value };
  }

  function setFilters(p) {
    if (p.get("store") !== null && storeInfo(p.get("store"))) storeSel.value = String(storeInfo(p.get("store")).id);
    fillLabels();
    kInput.value = p.get("k") || DEFAULT_K;
    splitSel.value = ["train", "val", "test"].includes(p.get("split")) ? p.get("split") : "";
    const label = p.get("label") || "";
    labelSel.value = Array.from(labelSel.options).some((o) => o.value === label) ? label : "";
  }

  function address(q, f) {
    const p = new URLSearchParams();
    p.set("store", String(q && q.kind === "row" ? q.store : f.store));
    if (q && q.kind === "row") p.set("row", String(q.row));
    if (f.k && f.k !== DEFAULT_K) p.set("k", f.k);
    if (f.split) p.set("split", f.split);
    if (f.label) p.set("label", f.label);
    return "/?" + p.toString();
  }

  const thumbUrl = (store, row) => "/api/stores/" + enc(store) + "/rows/" + enc(row) + "/thumbnail";

  // a store row as a tile: a link to the search by it; its image opens large (tiles.js)
  function rowTile(r, lines, cls, f, extra) {
    const a = el("a", "tile" + (cls ? " " + cls : ""));
    a.href = address({ kind: "row", store: r.store, row: r.row }, f || filters());
    a.title = "search by this image";
    Object.assign(a.dataset, {
      store: String(r.store), row: String(r.row), path: r.path || "", label: r.label || "", split: r.split || "",
    }, extra || {});
    const img = el("img");
    img.loading = "lazy";
    img.src = thumbUrl(r.store, r.row);
    img.alt = (r.path || "").split("/").pop();
    a.appendChild(img);
    a.appendChild(caption(lines));
    return a;
  }

  function caption(lines) {
    const cap = el("span", "cap");
    lines.forEach((t, i) => {
      const line = el(i === 0 && lines.length > 2 ? "b" : "span", "line" + (i === lines.length - 1 ? " name" : ""));
      if (Array.isArray(t)) { // [text, badge]
        line.append(t[0]);
        if (t[1]) { line.append(" "); line.appendChild(el("span", "badge weak", t[1])); }
        line.title = t[0] + (t[1] ? " " + t[1] : "");
      } else {
        line.textContent = t;
        line.title = t;
      }
      cap.appendChild(line);
    });
    return cap;
  }

  function uploadTile(file) {
    const fig = el("div", "tile");
    const img = el("img");
    img.alt = file.name;
    img.onerror = () => img.replaceWith(el("span", "noimage", "no preview"));
    img.src = URL.createObjectURL(file);
    img.onload = () => URL.revokeObjectURL(img.src);
    fig.appendChild(img);
    fig.appendChild(caption(["query: " + file.name, "uploaded"]));
    return fig;
  }

  async function getJSON(url, init) {
    const resp = await fetch(url, Object.assign({ credentials: "same-origin" }, init || {}));
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) throw new Error((body && body.error) || resp.status + " " + resp.statusText);
    return body;
  }

  const fmt = (x) => (typeof x === "number" ? x.toFixed(2) : "-");

  function scoreNote(s, neighbours) {
    if (!s || s.typical === null) return s ? "Score: " + s.meaning + "." : "";
    const worse = s.higher_is_better ? "below" : "above";
    let text = "Score: " + s.meaning + ". In this store an image's nearest neighbour typically scores " +
      fmt(s.typical) + "; a match " + worse + " " + fmt(s.weak) +
      " (where only 5% of the store's own images have their nearest neighbour) is marked weak.";
    if (neighbours.length && neighbours.every((n) => n.weak)) {
      text += " Every match is weak: nothing in the store is as close to this image as its images are to each other.";
    }
    return text;
  }

  async function run(q, f) {
    const gen = ++generation;
    window.embedtlViewer && window.embedtlViewer.close();
    samplePanel.hidden = true;
    panel.hidden = false;
    results.replaceChildren();
    prediction.replaceChildren();
    note.textContent = "";
    setStatus("searching…");
    const fd = new FormData();
    fd.append("store", String(q.kind === "row" ? q.store : f.store));
    fd.append("k", f.k);
    if (f.split) fd.append("split", f.split);
    if (f.label) fd.append("label", f.label);
    let record = Promise.resolve(null);
    if (q.kind === "row") {
      fd.append("row", String(q.row));
      fd.append("exclude_self", "true");
      queryBox.replaceChildren(rowTile({ store: q.store, row: q.row, path: "" }, ["query: row " + q.row, "…", ""], "", f));
      record = getJSON("/api/stores/" + enc(q.store) + "/rows/" + enc(q.row)).catch(() => null);
    } else {
      fd.append("file", q.file, q.file.name);
      queryBox.replaceChildren(uploadTile(q.file));
      if (data.heads.length) predict(q.file, gen);
    }
    const t0 = performance.now();
    let body, rec;
    try {
      [body, rec] = await Promise.all([getJSON("/api/search", { method: "POST", body: fd }), record]);
    } catch (err) {
      if (gen === generation) setStatus(err.message, true);
      return;
    }
    if (gen !== generation) return;
    let qLabel = null;
    if (rec) { // the row's path, label and split, as a click on it shows them
      qLabel = rec.label;
      const name = rec.path.split("/").pop();
      queryBox.replaceChildren(rowTile(rec, ["query: row " + rec.row, (rec.label || "-") + " · " + rec.split, name], "", f));
    }
    const r = body.results[0];
    const ms = Math.round(performance.now() - t0);
    setStatus(r.neighbors.length + " neighbours in " + ms + " ms (" + body.index + " index, " + body.metric + ")" +
      (f.label ? " · label " + f.label : "") + (f.split ? " · split " + f.split : ""));
    note.textContent = scoreNote(body.scores, r.neighbors);
    for (const n of r.neighbors) {
      const cls = [qLabel && n.label ? (n.label === qLabel ? "same" : "differ") : "", n.weak ? "weak" : ""].filter(Boolean).join(" ");
      const score = "#" + n.rank + "  " + n.score.toFixed(4);
      results.appendChild(rowTile(n, [[score, n.weak ? "weak" : ""], (n.label || "-") + " · " + n.split, n.path.split("/").pop()], cls, f,
        { score: n.score.toFixed(4), rank: String(n.rank), weak: n.weak ? "1" : "" }));
    }
    // a search started from the keyboard (Enter on a result) goes on from the first result
    const lost = !document.activeElement || document.activeElement === document.body;
    if (lost && results.firstElementChild) results.firstElementChild.focus({ preventScroll: true });
  }

  async function predict(file, gen) {
    const head = data.heads.find((h) => String(h.id) === (headSel ? headSel.value : String(data.heads[0].id)));
    const title = el("h2", null, "Predicted class (head " + head.name + "): …");
    prediction.replaceChildren(title);
    const fd = new FormData();
    fd.append("file", file, file.name);
    fd.append("head", String(head.id));
    fd.append("topk", "3");
    let body;
    try {
      body = await getJSON("/api/predict", { method: "POST", body: fd });
    } catch (err) {
      if (gen === generation) prediction.replaceChildren(el("p", "error", "Head " + head.name + ": " + err.message));
      return;
    }
    if (gen !== generation) return;
    const p = body.predictions[0];
    title.textContent = "Predicted class (head " + head.name + ")";
    const list = el("ol");
    for (const t of p.topk) {
      const li = el("li");
      li.appendChild(el("span", "cls", t.label)).title = t.label;
      li.appendChild(el("span", "p", t.p.toFixed(3)));
      const m = el("meter");
      m.min = 0;
      m.max = 1;
      m.value = t.p;
      li.appendChild(m);
      list.appendChild(li);
    }
    prediction.appendChild(list);
  }

  async function showSample() {
    generation++;
    panel.hidden = true;
    results.replaceChildren();
    samplePanel.hidden = false;
    const id = storeSel.value;
    if (id === "" || sampleBox.dataset.store === id) return;
    let body;
    try {
      body = await getJSON("/api/stores/" + enc(id) + "/sample");
    } catch (err) {
      setStatus(err.message, true);
      return;
    }
    if (storeSel.value !== id) return;
    sampleBox.replaceChildren(...body.rows.map((r) =>
      rowTile(r, [(r.label || "-") + " · " + r.split, r.path.split("/").pop()], "", filters())));
    sampleBox.dataset.store = id;
  }

  // how: "push" (a new history entry), "replace", or "none" (Back and Forward)
  function go(q, how) {
    current = q;
    const f = filters();
    const url = address(q, f);
    const state = q && q.kind === "file" ? { upload: q.id } : null;
    if (how === "push") history.pushState(state, "", url);
    else if (how === "replace") history.replaceState(state, "", url);
    if (!q) return showSample();
    return run(q, f);
  }

  function upload(file) {
    const q = { kind: "file", id: nextUpload++, file };
    uploads.set(q.id, q);
    if (uploads.size > KEPT_UPLOADS) uploads.delete(uploads.keys().next().value);
    return go(q, "push");
  }

  function restore(state) {
    const p = new URLSearchParams(location.search);
    setFilters(p);
    if (state && state.upload && uploads.has(state.upload)) return go(uploads.get(state.upload), "none");
    const row = Number(p.get("row"));
    if (p.get("row") !== null && Number.isInteger(row) && row >= 0) {
      return go({ kind: "row", store: storeSel.value, row }, "none");
    }
    setStatus(state && state.upload ? "the uploaded image is not kept when the page reloads: choose it again" : "");
    return go(null, "none");
  }

  document.addEventListener("click", (ev) => {
    if (ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
    const a = ev.target.closest("a.tile[data-row], a.row-link[data-row]");
    if (!a) return;
    ev.preventDefault();
    go({ kind: "row", store: a.dataset.store, row: Number(a.dataset.row) }, "push");
    window.scrollTo(0, 0);
  });
  window.addEventListener("popstate", (ev) => restore(ev.state));
  storeSel.addEventListener("change", () => {
    fillLabels();
    if (!current || current.kind === "row") go(null, "push"); // a row belongs to its store
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (current) go(current, "push"); // whatever the query is: upload, drop, row or link
    else setStatus("choose or drop an image first, or click an image below", true);
  });
  fileInput.addEventListener("change", () => {
    const f = fileInput.files[0];
    fileInput.value = ""; // the query holds the file; choosing it again is a new query
    if (f) upload(f);
  });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (ev) => {
    const f = ev.dataTransfer && ev.dataTransfer.files[0];
    if (f) upload(f);
  });

  fillLabels();
  restore(history.state);
})();
