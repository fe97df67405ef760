// Every page with images: a tile is a link to the search by its image (Enter, a click on its
// caption, or a new tab), and a click on its image (or Space on the tile) opens the image large
// in a viewer with its path, label, split and score; arrow keys step through the tile's grid.
// Text goes in with textContent only.
"use strict";
(function () {
  const dlg = document.getElementById("viewer");
  if (!dlg || typeof dlg.showModal !== "function") return;
  const $ = (id) => document.getElementById(id);
  const img = $("viewer-img");
  let tiles = [];
  let at = -1;

  function plainClick(ev) {
    return ev.button === 0 && !ev.metaKey && !ev.ctrlKey && !ev.shiftKey && !ev.altKey;
  }

  function rowUrl(store, row, size) {
    const base = "/api/stores/" + encodeURIComponent(store) + "/rows/" + encodeURIComponent(row);
    return size ? base + "/thumbnail?size=" + size : base + "/image";
  }

  function show(i) {
    if (i < 0 || i >= tiles.length) return;
    at = i;
    const t = tiles[i];
    const d = t.dataset;
    img.onerror = () => { // a format the browser cannot show (TIFF): the largest thumbnail
      img.onerror = null;
      img.src = rowUrl(d.store, d.row, 512);
    };
    img.src = rowUrl(d.store, d.row);
    img.alt = d.path || "";
    $("viewer-caption").textContent = d.caption || "";
    $("viewer-path").textContent = d.path || "";
    $("viewer-label").textContent = d.label || "-";
    $("viewer-split").textContent = d.split || "";
    $("viewer-row").textContent = "store " + d.store + ", row " + d.row;
    const hasScore = d.score !== undefined && d.score !== "";
    $("viewer-score-name").hidden = !hasScore;
    $("viewer-score").hidden = !hasScore;
    $("viewer-score").textContent = hasScore ? d.score + (d.weak ? " (weak match)" : "") + (d.rank ? ", rank " + d.rank : "") : "";
    const search = $("viewer-search");
    search.href = t.getAttribute("href");
    search.dataset.store = d.store;
    search.dataset.row = d.row;
    $("viewer-open").href = rowUrl(d.store, d.row);
    $("viewer-count").textContent = (i + 1) + " of " + tiles.length;
    $("viewer-prev").disabled = i === 0;
    $("viewer-next").disabled = i === tiles.length - 1;
  }

  function open(tile) {
    const grid = tile.closest(".grid");
    tiles = grid ? Array.from(grid.querySelectorAll("a.tile[data-row]")) : [tile];
    show(Math.max(0, tiles.indexOf(tile)));
    if (!dlg.open) dlg.showModal();
  }

  function close() {
    if (dlg.open) dlg.close();
  }

  document.addEventListener("click", (ev) => {
    if (!plainClick(ev)) return;
    const im = ev.target.closest("a.tile[data-row] img");
    if (!im) return;
    ev.preventDefault();
    open(im.closest("a.tile"));
  });
  document.addEventListener("keydown", (ev) => {
    const el = document.activeElement;
    if (ev.key === " " && !dlg.open && el && el.matches("a.tile[data-row]")) {
      ev.preventDefault();
      open(el);
    }
  });
  dlg.addEventListener("keydown", (ev) => {
    if (ev.key === "ArrowLeft") { ev.preventDefault(); show(at - 1); }
    else if (ev.key === "ArrowRight") { ev.preventDefault(); show(at + 1); }
  });
  dlg.addEventListener("click", (ev) => { if (ev.target === dlg) close(); }); // the backdrop
  dlg.addEventListener("close", () => {
    img.removeAttribute("src");
    if (tiles[at] && document.contains(tiles[at])) tiles[at].focus();
  });
  $("viewer-prev").addEventListener("click", () => show(at - 1));
  $("viewer-next").addEventListener("click", () => show(at + 1));
  $("viewer-close").addEventListener("click", close);
  window.embedtlViewer = { close };
})();
