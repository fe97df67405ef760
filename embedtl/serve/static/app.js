// The search page: upload, drop or click an image; results come from POST /api/search and are
// drawn with DOM nodes and textContent (no HTML is built from the server's strings).
"use strict";
(function () {
  const stores = JSON.parse(document.getElementById("store-data").textContent);
  const form = document.getElementById("search-form");
  const fileInput = document.getElementById("file");
  const drop = document.getElementById("drop");
  const storeSel = document.getElementById("store");
  const labelSel = document.getElementById("label");
  const status = document.getElementById("status");
  const results = document.getElementById("results");
  const query = document.getElementById("query");

  function fillLabels() {
    const s = stores.find((x) => String(x.id) === storeSel.value);
    labelSel.replaceChildren(new Option("any", ""));
    for (const c of (s && s.classes) || []) labelSel.add(new Option(c, c));
  }

  function thumbUrl(store, row) {
    return "/api/stores/" + encodeURIComponent(store) + "/rows/" + row + "/thumbnail";
  }

  function tile(src, lines, cls, onClick) {
    const fig = document.createElement("figure");
    fig.className = "tile" + (cls ? " " + cls : "");
    const img = document.createElement("img");
    img.src = src;
    img.loading = "lazy";
    img.alt = lines[lines.length - 1] || "";
    if (onClick) {
      img.style.cursor = "pointer";
      img.title = "search by this image";
      img.addEventListener("click", onClick);
    }
    fig.appendChild(img);
    const cap = document.createElement("figcaption");
    lines.forEach((t, i) => {
      if (i) cap.appendChild(document.createElement("br"));
      const span = document.createElement("span");
      span.textContent = t;
      if (i === 0) span.className = "score";
      cap.appendChild(span);
    });
    fig.appendChild(cap);
    return fig;
  }

  function params() {
    const fd = new FormData();
    fd.append("store", storeSel.value);
    fd.append("k", document.getElementById("k").value || "12");
    const split = document.getElementById("split").value;
    if (split) fd.append("split", split);
    if (labelSel.value) fd.append("label", labelSel.value);
    return fd;
  }

  async function run(fd, shown) {
    status.textContent = "searching…";
    results.replaceChildren();
    query.replaceChildren(shown);
    const t0 = performance.now();
    let body;
    try {
      const resp = await fetch("/api/search", { method: "POST", body: fd, credentials: "same-origin" });
      body = await resp.json();
      if (!resp.ok) throw new Error(body.error || resp.statusText);
    } catch (err) {
      status.textContent = "error: " + err.message;
      status.className = "status error";
      return;
    }
    status.className = "status";
    const r = body.results[0];
    const ms = Math.round(performance.now() - t0);
    status.textContent = r.neighbors.length + " neighbours in " + ms + " ms (" + body.index + " index, " + body.metric + ")";
    const qLabel = shown.dataset.label || null;
    for (const n of r.neighbors) {
      const cls = qLabel && n.label ? (n.label === qLabel ? "same" : "differ") : "";
      const name = n.path.split("/").pop();
      results.appendChild(
        tile(thumbUrl(n.store, n.row), ["#" + n.rank + "  " + n.score.toFixed(4), (n.label || "-") + " · " + n.split, name], cls,
          () => searchRow(n.store, n.row, n.label, name)),
      );
    }
  }

  function searchRow(store, row, label, name) {
    storeSel.value = String(store);
    const fd = params();
    fd.append("row", String(row));
    fd.append("exclude_self", "true");
    const shown = tile(thumbUrl(store, row), ["query: row " + row, (label || "-"), name || ""], "", null);
    if (label) shown.dataset.label = label;
    history.replaceState(null, "", "?store=" + encodeURIComponent(store) + "&row=" + row);
    return run(fd, shown);
  }

  function searchFile(file) {
    const fd = params();
    fd.append("file", file, file.name);
    const shown = tile(URL.createObjectURL(file), ["query: " + file.name], "", null);
    history.replaceState(null, "", "?");
    return run(fd, shown);
  }

  storeSel.addEventListener("change", fillLabels);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (fileInput.files.length) searchFile(fileInput.files[0]);
    else status.textContent = "choose or drop an image first";
  });
  fileInput.addEventListener("change", () => { if (fileInput.files.length) searchFile(fileInput.files[0]); });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (ev) => { const f = ev.dataTransfer.files[0]; if (f) searchFile(f); });

  fillLabels();
  const q = new URLSearchParams(location.search);
  if (q.has("row")) {
    if (q.has("store")) storeSel.value = q.get("store");
    fillLabels();
    searchRow(storeSel.value, parseInt(q.get("row"), 10), null, "");
  }
})();
