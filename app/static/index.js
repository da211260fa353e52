// Start page: upload a zip (with progress), start a job, list datasets and jobs.
"use strict";

const form = document.getElementById("job-form");
const fileInput = document.getElementById("zip-file");
const dropzone = document.getElementById("dropzone");
const formError = document.getElementById("form-error");
const startButton = document.getElementById("start");
const PAGE = 20;
const datasetNames = new Map();

function showError(message) {
  formError.textContent = message;
  formError.hidden = !message;
}

function sourceMode() {
  return form.querySelector('input[name="source"]:checked').value;
}

function updateSourceMode() {
  const existing = sourceMode() === "existing";
  form.querySelector(".source-upload").hidden = existing;
  form.querySelector(".source-existing").hidden = !existing;
  startButton.textContent = existing ? "Start" : "Upload and start";
}

for (const radio of form.querySelectorAll('input[name="source"]')) {
  radio.addEventListener("change", updateSourceMode);
}

function showChosenFile() {
  const file = fileInput.files[0];
  document.getElementById("dropzone-text").innerHTML = "";
  document
    .getElementById("dropzone-text")
    .append(
      file
        ? el("span", {}, el("strong", {}, file.name), ` · ${formatBytes(file.size)}`)
        : el("span", {}, el("strong", {}, "Choose a zip"), " or drop it here"),
    );
}

fileInput.addEventListener("change", showChosenFile);
dropzone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropzone.classList.add("over");
});
dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropzone.classList.remove("over");
  if (event.dataTransfer.files.length) {
    fileInput.files = event.dataTransfer.files;
    showChosenFile();
  }
});

/** "" -> null, "2" / "1.5" -> factor, "20, 30" -> list of counts. */
function parseOvercluster(text) {
  text = text.trim();
  if (!text) return null;
  if (/[,;\s]/.test(text)) {
    const counts = text.split(/[,;\s]+/).filter(Boolean).map(Number);
    if (counts.some((c) => !Number.isInteger(c) || c < 2)) {
      throw new Error("Overclustering: a list of whole cluster counts, each at least 2.");
    }
    return counts;
  }
  const factor = Number(text);
  if (!isFinite(factor) || factor < 1) {
    throw new Error("Overclustering: a factor of at least 1 (e.g. 2), or a list like 20, 30.");
  }
  return factor;
}

function readJobSettings() {
  const numClusters = Number(document.getElementById("num-clusters").value);
  if (!Number.isInteger(numClusters) || numClusters < 2) {
    throw new Error("The number of clusters must be a whole number of at least 2.");
  }
  const overridesText = document.getElementById("overrides").value.trim();
  let overrides = {};
  if (overridesText) {
    try {
      overrides = JSON.parse(overridesText);
    } catch (error) {
      throw new Error(`The overrides are not valid JSON: ${error.message}`);
    }
    if (typeof overrides !== "object" || Array.isArray(overrides) || overrides === null) {
      throw new Error("The overrides must be a JSON object.");
    }
  }
  const preset = document.getElementById("preset").value;
  const settings = {
    num_clusters: numClusters,
    overcluster: parseOvercluster(document.getElementById("overcluster").value),
    preset,
    overrides,
  };
  const backbone = document.getElementById("backbone");
  if (presetIsPretrained(preset) && backbone.value) settings.backbone = backbone.value;
  return settings;
}

/** Presets of the pretrained route take a backbone; the SimCLR ones train their own features. */
function presetIsPretrained(preset) {
  const names = (document.getElementById("backbone").dataset.pretrainedPresets || "").split(",");
  return names.includes(preset);
}

function updateBackboneChoice() {
  const backbone = document.getElementById("backbone");
  const pretrained = presetIsPretrained(document.getElementById("preset").value);
  backbone.disabled = !pretrained;
  document.getElementById("backbone-hint").textContent = pretrained
    ? "The pretrained route's feature extractor; features are computed once per dataset and reused by later jobs."
    : "This preset trains its own features from scratch (SimCLR): no backbone.";
}
document.getElementById("preset").addEventListener("change", updateBackboneChoice);
updateBackboneChoice();

/** POST the zip with XMLHttpRequest: fetch cannot report upload progress. */
function uploadZip(file, name, labelsFromFolders) {
  const progress = document.getElementById("upload-progress");
  const bar = document.getElementById("upload-bar");
  const status = document.getElementById("upload-status");
  progress.hidden = false;
  bar.style.width = "0";
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", `${API}/datasets`);
    for (const [name, value] of Object.entries(csrfHeaders())) request.setRequestHeader(name, value);
    request.upload.onprogress = (event) => {
      if (!event.lengthComputable) return;
      bar.style.width = percent(event.loaded / event.total);
      status.textContent = `Uploading ${percent(event.loaded / event.total, 0)} · ${formatBytes(event.loaded)} of ${formatBytes(event.total)}`;
    };
    request.upload.onload = () => {
      bar.style.width = "100%";
      status.textContent = "Uploaded. Checking the images and making thumbnails…";
    };
    request.onload = () => {
      let data = null;
      try {
        data = JSON.parse(request.responseText);
      } catch (_) {
        data = null;
      }
      if (request.status === 201) {
        status.textContent = `${data.image_count} images ready.`;
        resolve(data);
      } else {
        status.textContent = "";
        reject(new Error(errorText(data) || `Upload failed (${request.status}).`));
      }
    };
    request.onerror = () => reject(new Error("The upload was interrupted (network error)."));
    const body = new FormData();
    body.append("file", file, file.name);
    if (name) body.append("name", name);
    body.append("labels_from_folders", labelsFromFolders ? "true" : "false");
    request.send(body);
  });
}

function showSkipped(dataset) {
  const notice = document.getElementById("skipped-notice");
  if (!dataset.skipped_count) {
    notice.hidden = true;
    return;
  }
  notice.innerHTML = "";
  notice.append(
    el("strong", {}, `${dataset.skipped_count} files were skipped.`),
    el(
      "ul",
      {},
      dataset.skipped.slice(0, 5).map((s) => el("li", {}, `${s.path}: ${s.reason}`)),
    ),
  );
  notice.hidden = false;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  let settings;
  try {
    settings = readJobSettings();
  } catch (error) {
    showError(error.message);
    return;
  }
  startButton.disabled = true;
  try {
    let datasetId;
    if (sourceMode() === "existing") {
      datasetId = document.getElementById("dataset-select").value;
      if (!datasetId) throw new Error("Choose a dataset.");
    } else {
      const file = fileInput.files[0];
      if (!file) throw new Error("Choose a zip file of images first.");
      const dataset = await uploadZip(
        file,
        document.getElementById("dataset-name").value.trim(),
        document.getElementById("labels-from-folders").checked,
      );
      showSkipped(dataset);
      datasetId = dataset.id;
      loadDatasets(true);
    }
    const job = await apiPost("/jobs", { dataset_id: datasetId, ...settings });
    location.href = `/jobs/${job.id}`;
  } catch (error) {
    showError(error.message);
    startButton.disabled = false;
  }
});

// ---------------------------------------------------------------------------------------------
// Lists

let jobsShown = 0;
let datasetsShown = 0;
let refreshTimer = null;

function clusterText(job) {
  const extra = job.cluster_counts.filter((c) => c !== job.num_clusters);
  return extra.length ? `${job.num_clusters} (+ ${extra.join(", ")})` : `${job.num_clusters}`;
}

function jobRow(job) {
  const name = datasetNames.get(job.dataset_id) || job.dataset_id.slice(0, 8);
  const running = job.status === "running";
  return el(
    "tr",
    { dataset: { jobId: job.id } },
    el(
      "td",
      {},
      el("span", { class: "badge", "data-status": job.status }, job.status),
      running ? el("span", { class: "muted small" }, ` ${percent(job.progress, 0)}`) : null,
    ),
    el("td", {}, name),
    el("td", {}, clusterText(job)),
    el("td", {}, job.preset),
    el("td", {}, job.backbone ? `${job.backbone} · ${job.image_size} px` : `from scratch · ${job.image_size} px`),
    el("td", { title: job.created_at }, formatDate(job.created_at)),
    el("td", {}, formatDuration(job.duration_s)),
    el(
      "td",
      { class: "actions-cell" },
      el("a", { href: `/jobs/${job.id}` }, "Progress"),
      job.status === "succeeded" ? el("a", { href: `/jobs/${job.id}/gallery` }, "Gallery") : null,
    ),
  );
}

async function loadJobs(reset) {
  const body = document.querySelector("#jobs-table tbody");
  const limit = reset ? Math.max(PAGE, jobsShown) : PAGE;
  const offset = reset ? 0 : jobsShown;
  const page = await apiGet("/jobs", { offset, limit });
  if (reset) body.innerHTML = "";
  body.append(...page.items.map(jobRow));
  jobsShown = offset + page.items.length;
  document.getElementById("jobs-total").textContent = page.total ? `${page.total} in all` : "";
  document.getElementById("jobs-empty").hidden = page.total > 0;
  document.getElementById("jobs-table").hidden = page.total === 0;
  document.getElementById("jobs-more").hidden = jobsShown >= page.total;
  // Keep the list live while something is queued or running.
  const unfinished = page.items.some((j) => j.status === "queued" || j.status === "running");
  clearTimeout(refreshTimer);
  if (unfinished) refreshTimer = setTimeout(() => loadJobs(true).catch(() => {}), 3000);
}

function datasetRow(dataset) {
  return el(
    "tr",
    {},
    el("td", {}, dataset.name),
    el("td", {}, dataset.image_count.toLocaleString()),
    el("td", {}, formatBytes(dataset.total_bytes)),
    el("td", {}, dataset.has_labels ? (dataset.class_names || []).length : "–"),
    el("td", {}, dataset.skipped_count || "–"),
    el("td", { title: dataset.created_at }, formatDate(dataset.created_at)),
    el(
      "td",
      { class: "actions-cell" },
      el(
        "a",
        {
          href: "#upload",
          onclick: () => {
            document.getElementById("source-existing").checked = true;
            updateSourceMode();
            document.getElementById("dataset-select").value = dataset.id;
          },
        },
        "Cluster again",
      ),
    ),
  );
}

async function loadDatasets(reset) {
  const body = document.querySelector("#datasets-table tbody");
  const offset = reset ? 0 : datasetsShown;
  const limit = reset ? Math.max(PAGE, datasetsShown) : PAGE;
  const page = await apiGet("/datasets", { offset, limit });
  if (reset) body.innerHTML = "";
  body.append(...page.items.map(datasetRow));
  datasetsShown = offset + page.items.length;
  for (const dataset of page.items) datasetNames.set(dataset.id, dataset.name);
  document.getElementById("datasets-total").textContent = page.total ? `${page.total} in all` : "";
  document.getElementById("datasets-empty").hidden = page.total > 0;
  document.getElementById("datasets-table").hidden = page.total === 0;
  document.getElementById("datasets-more").hidden = datasetsShown >= page.total;

  const select = document.getElementById("dataset-select");
  const chosen = select.value;
  select.innerHTML = "";
  select.append(
    el("option", { value: "" }, page.total ? "Choose…" : "No datasets yet"),
    ...[...datasetNames.entries()].map(([id, name]) => el("option", { value: id }, name)),
  );
  select.value = chosen;
}

document.getElementById("jobs-more").addEventListener("click", () => loadJobs(false));
document.getElementById("datasets-more").addEventListener("click", () => loadDatasets(false));

(async () => {
  updateSourceMode();
  try {
    await loadDatasets(true); // first: the job rows show dataset names
    await loadJobs(true);
  } catch (error) {
    showError(`Could not load the lists: ${error.message}`);
  }
})();
