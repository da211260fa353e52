// Gallery: one card per cluster (largest first), members page by page, metrics with a confusion
// matrix, a 2-D map of the collection, downloads. Every list is paged by the API: no request
// asks for every image of a large job.
"use strict";

const root = document.getElementById("gallery");
const jobId = root.dataset.jobId;
const datasetId = root.dataset.datasetId;
const classNames = JSON.parse(root.dataset.classNames || "[]");
const MEMBERS_PAGE = 60;
const MAP_POINTS = 5000;
const JSON_PAGE = 10000; // the assignments endpoint's largest page

const state = {
  job: null,
  numClusters: Number(root.dataset.numClusters),
  resultSet: null,
  clusters: [],
  members: { cluster: null, offset: 0, total: 0 },
  map: null,
};

function showError(message) {
  const box = document.getElementById("gallery-error");
  box.textContent = message;
  box.hidden = !message;
}

// ---------------------------------------------------------------------------------------------
// Result sets (K and the overclusterings)

function renderTabs() {
  const tabs = document.getElementById("result-tabs");
  tabs.innerHTML = "";
  const sets = state.job.result_sets;
  tabs.hidden = sets.length < 2;
  for (const set of sets) {
    const label = set.num_clusters === state.job.num_clusters ? `K = ${set.num_clusters}` : `C = ${set.num_clusters}`;
    tabs.append(
      el(
        "button",
        {
          class: "tab",
          role: "tab",
          "aria-selected": String(set.num_clusters === state.numClusters),
          dataset: { numClusters: set.num_clusters },
          onclick: () => selectResultSet(set.num_clusters),
        },
        label,
      ),
    );
  }
}

async function selectResultSet(numClusters) {
  state.numClusters = numClusters;
  const url = new URL(location.href);
  url.searchParams.set("c", numClusters);
  history.replaceState(null, "", url);
  state.resultSet = state.job.result_sets.find((r) => r.num_clusters === numClusters);
  renderTabs();
  updateDownloads();
  renderSummary();
  renderMetrics();
  await Promise.all([loadClusters(), loadMap()]);
}

function renderSummary() {
  const job = state.job;
  const set = state.resultSet;
  const images = state.imageCount;
  const parts = [
    images !== undefined ? `${images.toLocaleString()} images` : null,
    `${set.num_clusters} clusters`,
    set.cluster_count !== set.num_clusters ? `${set.cluster_count} non-empty` : null,
    `final stage ${set.stage}`,
    job.backbone ? `backbone ${job.backbone}` : "SimCLR from scratch",
    job.image_size ? `${job.image_size} px` : null,
    job.features_from_cache === true ? "features from the cache" : null,
    job.features_from_cache === false ? "features computed" : null,
    job.duration_s !== null ? `took ${formatDuration(job.duration_s)}` : null,
  ];
  document.getElementById("gallery-summary").textContent = parts.filter(Boolean).join(" · ");
}

function updateDownloads() {
  const base = `${API}/jobs/${jobId}/assignments?num_clusters=${state.numClusters}`;
  const csv = document.getElementById("download-csv");
  csv.href = `${base}&format=csv`;
  csv.setAttribute("download", `job-${jobId}-C${state.numClusters}.csv`);
}

/** Every assignment as one JSON file, fetched page by page (the API caps a page at 10,000). */
async function downloadJson(event) {
  event.preventDefault();
  const button = event.currentTarget;
  const label = button.textContent;
  button.setAttribute("aria-busy", "true");
  try {
    const items = [];
    let total = Infinity;
    while (items.length < total) {
      const page = await apiGet(`/jobs/${jobId}/assignments`, {
        num_clusters: state.numClusters,
        offset: items.length,
        limit: JSON_PAGE,
      });
      total = page.total;
      if (!page.items.length) break;
      items.push(...page.items);
      button.textContent = `${percent(items.length / total, 0)}…`;
    }
    const body = { job_id: jobId, num_clusters: state.numClusters, total: items.length, items };
    saveText(JSON.stringify(body), `job-${jobId}-C${state.numClusters}.json`, "application/json");
  } catch (error) {
    showError(`Download failed: ${error.message}`);
  } finally {
    button.textContent = label;
    button.removeAttribute("aria-busy");
  }
}

// ---------------------------------------------------------------------------------------------
// Cluster cards

/** "matched to cat" (Hungarian, one cluster per class) or "mostly cat" (majority vote). */
function mappedClass(cluster) {
  const metrics = stageMetrics();
  if (!metrics || !metrics.mapping) return null;
  const cls = metrics.mapping[cluster];
  if (cls === null || cls === undefined) return null;
  const name = classNames[cls] || `class ${cls}`;
  return metrics.method === "hungarian" ? `matched to ${name}` : `mostly ${name}`;
}

function card(cluster) {
  const proto = el("img", {
    class: "prototype",
    src: thumbnailUrl(datasetId, cluster.prototype_image_id),
    alt: `Prototype of cluster ${cluster.index}`,
    width: 128,
    height: 128,
  });
  const strip = cluster.top_members
    .filter((id) => id !== cluster.prototype_image_id)
    .slice(0, 4)
    .map((id) => el("img", { src: thumbnailUrl(datasetId, id), alt: "", loading: "lazy" }));
  const cls = mappedClass(cluster.index);
  return el(
    "button",
    {
      class: "card",
      type: "button",
      dataset: { cluster: cluster.index, size: cluster.size },
      title: `Open cluster ${cluster.index}`,
      onclick: () => openMembers(cluster),
    },
    proto,
    el(
      "div",
      { class: "card-body" },
      el(
        "div",
        { class: "card-title" },
        el("span", { class: "swatch", style: { background: clusterColor(cluster.index) } }),
        `Cluster ${cluster.index}`,
      ),
      el(
        "div",
        { class: "card-stats" },
        el("span", { class: "card-size" }, `${cluster.size.toLocaleString()} images`),
        el("span", { title: "mean confidence" }, percent(cluster.mean_confidence, 0)),
      ),
      el(
        "div",
        { class: "confbar", title: `mean confidence ${percent(cluster.mean_confidence)}` },
        el("div", { style: { width: percent(cluster.mean_confidence) } }),
      ),
      cls ? el("div", { class: "card-class", title: cls }, cls) : null,
      strip.length ? el("div", { class: "card-strip" }, strip) : null,
    ),
  );
}

/** Resolves when every image has loaded or failed; marks the page for tests and timing. */
function whenLoaded(images) {
  return Promise.all(
    images.map(
      (img) =>
        new Promise((resolve) => {
          if (img.complete) resolve();
          else {
            img.addEventListener("load", resolve, { once: true });
            img.addEventListener("error", resolve, { once: true });
          }
        }),
    ),
  );
}

async function loadClusters() {
  const cards = document.getElementById("cards");
  document.body.dataset.prototypesLoaded = "false";
  const numClusters = state.numClusters;
  const data = await apiGet(`/jobs/${jobId}/clusters`, { num_clusters: numClusters });
  if (numClusters !== state.numClusters) return; // another tab was chosen meanwhile
  state.clusters = data.clusters;
  const shown = data.clusters
    .filter((c) => c.size > 0 && c.prototype_image_id)
    .sort((a, b) => b.size - a.size || a.index - b.index);
  cards.innerHTML = "";
  cards.append(...shown.map(card));
  const empty = data.clusters.length - shown.length;
  document.getElementById("clusters-count").textContent = `${shown.length}`;
  const emptyNote = document.getElementById("empty-clusters");
  emptyNote.hidden = empty === 0;
  emptyNote.textContent = `${empty} ${empty === 1 ? "cluster is" : "clusters are"} empty and not shown.`;
  await whenLoaded([...cards.querySelectorAll("img.prototype")]);
  if (numClusters !== state.numClusters) return;
  performance.mark("prototypes-loaded");
  document.body.dataset.prototypesLoaded = "true";
}

// ---------------------------------------------------------------------------------------------
// Members of one cluster

const dialog = document.getElementById("members");

function openMembers(cluster) {
  state.members = { cluster, offset: 0, total: cluster.size };
  const cls = mappedClass(cluster.index);
  document.getElementById("members-title").textContent =
    `Cluster ${cluster.index}${cls ? ` · ${cls}` : ""}`;
  if (!dialog.open) dialog.showModal();
  loadMembers();
}

async function loadMembers() {
  const { cluster, offset } = state.members;
  const grid = document.getElementById("members-grid");
  grid.setAttribute("aria-busy", "true");
  try {
    const page = await apiGet(`/jobs/${jobId}/clusters/${cluster.index}/members`, {
      num_clusters: state.numClusters,
      offset,
      limit: MEMBERS_PAGE,
    });
    state.members.total = page.total;
    grid.innerHTML = "";
    grid.append(
      ...page.items.map((item) =>
        el(
          "figure",
          { class: "thumb", dataset: { imageId: item.image_id } },
          el(
            "a",
            { href: imageUrl(datasetId, item.image_id), target: "_blank", rel: "noopener", title: item.filename },
            el("img", { src: thumbnailUrl(datasetId, item.image_id), alt: item.filename, loading: "lazy", width: 128, height: 128 }),
          ),
          el(
            "figcaption",
            {},
            el("span", {}, item.filename.split("/").pop()),
            el("span", { title: "confidence" }, percent(item.confidence, 0)),
          ),
        ),
      ),
    );
    const last = Math.min(offset + MEMBERS_PAGE, page.total);
    document.getElementById("members-range").textContent =
      `${page.total.toLocaleString()} images, most confident first · showing ${page.total ? offset + 1 : 0}–${last}`;
    document.getElementById("members-prev").disabled = offset === 0;
    document.getElementById("members-next").disabled = last >= page.total;
  } catch (error) {
    grid.innerHTML = "";
    grid.append(el("p", { class: "error" }, error.message));
  } finally {
    grid.removeAttribute("aria-busy");
  }
}

document.getElementById("members-prev").addEventListener("click", () => {
  state.members.offset = Math.max(0, state.members.offset - MEMBERS_PAGE);
  loadMembers();
});
document.getElementById("members-next").addEventListener("click", () => {
  state.members.offset += MEMBERS_PAGE;
  loadMembers();
});
document.getElementById("members-close").addEventListener("click", () => dialog.close());
dialog.addEventListener("click", (event) => {
  if (event.target === dialog) dialog.close(); // a click on the backdrop
});
document.addEventListener("keydown", (event) => {
  if (!dialog.open) return;
  if (event.key === "ArrowRight" && !document.getElementById("members-next").disabled) {
    document.getElementById("members-next").click();
  } else if (event.key === "ArrowLeft" && !document.getElementById("members-prev").disabled) {
    document.getElementById("members-prev").click();
  }
});

// ---------------------------------------------------------------------------------------------
// Metrics and the confusion matrix

function stageMetrics() {
  const metrics = state.resultSet && state.resultSet.metrics;
  if (!metrics) return null;
  return metrics[state.resultSet.stage] || metrics.selflabel || metrics.scan || null;
}

function renderMetrics() {
  const panel = document.getElementById("metrics");
  const metrics = stageMetrics();
  panel.hidden = !metrics;
  if (!metrics) return;
  const cards = document.getElementById("metric-cards");
  cards.innerHTML = "";
  for (const [key, name] of [["acc", "ACC"], ["nmi", "NMI"], ["ari", "ARI"]]) {
    cards.append(el("div", { class: "metric", dataset: { metric: key } }, el("b", {}, percent(metrics[key])), el("span", {}, name)));
  }
  const extra = document.getElementById("metric-extra");
  extra.innerHTML = "";
  extra.append(
    el("p", {}, `Against the ${metrics.num_classes} folder classes; clusters mapped to classes by ${metrics.method === "hungarian" ? "Hungarian matching" : "majority vote"}.`),
  );
  const scan = state.resultSet.metrics.scan;
  if (state.resultSet.stage !== "scan" && scan) {
    extra.append(el("p", {}, `After the SCAN step, before self-labeling: ACC ${percent(scan.acc)}.`));
  }
  const kmeans = state.job.metrics && state.job.metrics.kmeans;
  if (kmeans && state.numClusters === state.job.num_clusters) {
    extra.append(el("p", {}, `k-means on the pretext features: ACC ${percent(kmeans.acc)}.`));
  }
  drawConfusion(metrics);
}

function setupCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return context;
}

function drawConfusion(metrics) {
  const counts = metrics.confusion; // (K classes, C clusters)
  const numClasses = counts.length;
  const numClusters = counts[0] ? counts[0].length : 0;
  const mapping = metrics.mapping || [];
  // Columns grouped by mapped class, so a good clustering shows a diagonal band.
  const columns = [...Array(numClusters).keys()].sort((a, b) => {
    const ca = mapping[a] ?? Infinity;
    const cb = mapping[b] ?? Infinity;
    return ca - cb || a - b;
  });
  const rowTotals = counts.map((row) => row.reduce((s, v) => s + v, 0) || 1);
  const canvas = document.getElementById("confusion-canvas");
  const labelWidth = 110;
  const top = 28;
  const available = Math.max(200, canvas.parentElement.clientWidth - labelWidth - 8);
  const cell = Math.max(12, Math.min(44, Math.floor(available / Math.max(1, numClusters))));
  const rowHeight = Math.max(18, Math.min(44, cell));
  const width = labelWidth + cell * numClusters + 4;
  const height = top + rowHeight * numClasses + 4;
  const context = setupCanvas(canvas, width, height);
  context.font = "12px system-ui, sans-serif";
  context.textBaseline = "middle";
  columns.forEach((cluster, column) => {
    const x = labelWidth + column * cell;
    if (cell >= 16 || column % 2 === 0) {
      context.fillStyle = clusterColor(cluster);
      context.textAlign = "center";
      context.fillText(String(cluster), x + cell / 2, top / 2);
    }
  });
  for (let row = 0; row < numClasses; row++) {
    const y = top + row * rowHeight;
    context.fillStyle = "#1d2330";
    context.textAlign = "right";
    const name = classNames[row] || `class ${row}`;
    context.fillText(name.length > 16 ? `${name.slice(0, 15)}…` : name, labelWidth - 8, y + rowHeight / 2);
    columns.forEach((cluster, column) => {
      const value = counts[row][cluster];
      const share = value / rowTotals[row];
      const x = labelWidth + column * cell;
      context.fillStyle = `rgba(59, 91, 219, ${value ? 0.08 + 0.92 * share : 0.03})`;
      context.fillRect(x + 1, y + 1, cell - 2, rowHeight - 2);
      if (value && cell >= 26) {
        context.fillStyle = share > 0.5 ? "#fff" : "#1d2330";
        context.textAlign = "center";
        context.fillText(value > 999 ? `${(value / 1000).toFixed(1)}k` : String(value), x + cell / 2, y + rowHeight / 2);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// The 2-D map

async function loadMap() {
  const note = document.getElementById("map-note");
  const numClusters = state.numClusters;
  try {
    const map = await apiGet(`/jobs/${jobId}/map`, { num_clusters: numClusters, limit: MAP_POINTS });
    if (numClusters !== state.numClusters) return;
    state.map = prepareMap(map);
    note.hidden = map.total <= map.x.length;
    note.textContent = `A sample of ${map.x.length.toLocaleString()} of the ${map.total.toLocaleString()} images.`;
    document.getElementById("map-canvas").hidden = false;
    drawMap();
  } catch (error) {
    state.map = null;
    document.getElementById("map-canvas").hidden = true;
    note.hidden = false;
    note.textContent = `No map for this job: ${error.message}`;
  }
}

function prepareMap(map) {
  const n = map.x.length;
  const bounds = { minX: Infinity, maxX: -Infinity, minY: Infinity, maxY: -Infinity };
  for (let i = 0; i < n; i++) {
    bounds.minX = Math.min(bounds.minX, map.x[i]);
    bounds.maxX = Math.max(bounds.maxX, map.x[i]);
    bounds.minY = Math.min(bounds.minY, map.y[i]);
    bounds.maxY = Math.max(bounds.maxY, map.y[i]);
  }
  // A fixed shuffle of the drawing order: images come sorted by folder, which would otherwise
  // paint one cluster over the others.
  const order = [...Array(n).keys()];
  let seed = 12345;
  for (let i = n - 1; i > 0; i--) {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    const j = seed % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  return { ...map, bounds, order, screen: new Float32Array(2 * n), hover: -1 };
}

function drawMap() {
  const map = state.map;
  if (!map) return;
  const canvas = document.getElementById("map-canvas");
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  const context = setupCanvas(canvas, width, height);
  canvas.style.width = "";
  canvas.style.height = "";
  const pad = 16;
  const { minX, maxX, minY, maxY } = map.bounds;
  const sx = (width - 2 * pad) / (maxX - minX || 1);
  const sy = (height - 2 * pad) / (maxY - minY || 1);
  const n = map.x.length;
  const radius = n > 20000 ? 1.4 : n > 4000 ? 2.2 : n > 1000 ? 3 : 4;
  for (let i = 0; i < n; i++) {
    map.screen[2 * i] = pad + (map.x[i] - minX) * sx;
    map.screen[2 * i + 1] = height - pad - (map.y[i] - minY) * sy;
  }
  context.clearRect(0, 0, width, height);
  for (const i of map.order) {
    context.fillStyle = clusterColor(map.cluster[i], 0.78);
    context.beginPath();
    context.arc(map.screen[2 * i], map.screen[2 * i + 1], radius, 0, 2 * Math.PI);
    context.fill();
  }
  if (map.hover >= 0) {
    const i = map.hover;
    context.strokeStyle = "#1d2330";
    context.lineWidth = 2;
    context.beginPath();
    context.arc(map.screen[2 * i], map.screen[2 * i + 1], radius + 3, 0, 2 * Math.PI);
    context.stroke();
  }
}

function nearestPoint(x, y, within) {
  const map = state.map;
  let best = -1;
  let bestDistance = within * within;
  for (let i = 0; i < map.x.length; i++) {
    const dx = map.screen[2 * i] - x;
    const dy = map.screen[2 * i + 1] - y;
    const distance = dx * dx + dy * dy;
    if (distance < bestDistance) {
      bestDistance = distance;
      best = i;
    }
  }
  return best;
}

let hoverFrame = 0;
const mapCanvas = document.getElementById("map-canvas");
mapCanvas.addEventListener("mousemove", (event) => {
  if (!state.map || hoverFrame) return;
  hoverFrame = requestAnimationFrame(() => {
    hoverFrame = 0;
    const rect = mapCanvas.getBoundingClientRect();
    const x = event.clientX - rect.left;
    const y = event.clientY - rect.top;
    const i = nearestPoint(x, y, 12);
    const tip = document.getElementById("map-tip");
    if (i !== state.map.hover) {
      state.map.hover = i;
      drawMap();
    }
    if (i < 0) {
      tip.hidden = true;
      return;
    }
    const map = state.map;
    tip.querySelector("img").src = thumbnailUrl(datasetId, map.image_id[i]);
    tip.querySelector("span").textContent = `cluster ${map.cluster[i]} · ${percent(map.confidence[i], 0)}`;
    tip.hidden = false;
    const left = Math.min(map.screen[2 * i] + 14, rect.width - 130);
    const topPx = map.screen[2 * i + 1] > 150 ? map.screen[2 * i + 1] - 150 : map.screen[2 * i + 1] + 14;
    tip.style.left = `${left}px`;
    tip.style.top = `${topPx}px`;
  });
});
mapCanvas.addEventListener("mouseleave", () => {
  document.getElementById("map-tip").hidden = true;
  if (state.map && state.map.hover >= 0) {
    state.map.hover = -1;
    drawMap();
  }
});
mapCanvas.addEventListener("click", () => {
  const map = state.map;
  if (!map || map.hover < 0) return;
  const cluster = state.clusters.find((c) => c.index === map.cluster[map.hover]);
  if (cluster) openMembers(cluster);
});

let resizeTimer = 0;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    drawMap();
    const metrics = stageMetrics();
    if (metrics) drawConfusion(metrics);
  }, 150);
});

// ---------------------------------------------------------------------------------------------

async function main() {
  document.getElementById("download-json").addEventListener("click", downloadJson);
  try {
    const [job, dataset] = await Promise.all([
      apiGet(`/jobs/${jobId}`),
      apiGet(`/datasets/${datasetId}`).catch(() => null),
    ]);
    state.job = job;
    state.imageCount = dataset ? dataset.image_count : undefined;
    if (job.status !== "succeeded") {
      for (const id of ["clusters-panel", "map-panel", "download-csv", "download-json"]) {
        document.getElementById(id).hidden = true;
      }
      const link = el("a", { href: `/jobs/${jobId}` }, "its progress page");
      const box = document.getElementById("gallery-error");
      box.innerHTML = "";
      box.append(`This job is ${job.status}; clusters appear once it succeeds. See `, link, ".");
      box.hidden = false;
      return;
    }
    const wanted = Number(new URL(location.href).searchParams.get("c"));
    const available = job.result_sets.map((r) => r.num_clusters);
    await selectResultSet(available.includes(wanted) ? wanted : job.num_clusters);
  } catch (error) {
    showError(`Could not load the gallery: ${error.message}`);
  }
}

main();
