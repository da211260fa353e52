// Job page: poll the job once a second and show stage, progress, ETA, timings, errors; cancel.
"use strict";

const root = document.getElementById("job");
const jobId = root.dataset.jobId;
const STAGES = root.dataset.stages.split(",");
const FINISHED = ["succeeded", "failed", "cancelled"];
const POLL_MS = 1000;
let pollTimer = null;

function setRows(table, rows) {
  const body = table.querySelector("tbody");
  body.innerHTML = "";
  for (const [key, value] of rows) body.append(el("tr", {}, el("td", {}, key), el("td", {}, value)));
}

function renderStages(job) {
  const current = STAGES.indexOf(job.stage);
  for (const item of document.querySelectorAll("#stages li")) {
    const index = STAGES.indexOf(item.dataset.stage);
    const done = job.status === "succeeded" || (current >= 0 && index < current);
    item.classList.toggle("done", done);
    item.classList.toggle("current", !done && index === current && job.status === "running");
  }
}

/** Which route ran: the backbone and image size, and whether its features came from the cache. */
function routeRows(job) {
  const rows = [
    ["route", job.route === "pretrained" ? "pretrained backbone" : "SimCLR from scratch"],
  ];
  if (job.backbone) rows.push(["backbone", job.backbone]);
  if (job.image_size) rows.push(["image size", `${job.image_size} px`]);
  if (job.features_from_cache !== null && job.features_from_cache !== undefined) {
    rows.push(["features", job.features_from_cache ? "from the dataset's cache" : "computed by this job"]);
  }
  return rows;
}

function render(job) {
  const badge = document.getElementById("status-badge");
  badge.textContent = job.cancel_requested && job.status === "running" ? "stopping" : job.status;
  badge.dataset.status = job.status;
  renderStages(job);

  document.getElementById("progress-bar").style.width = percent(job.progress);
  document.getElementById("progress-percent").textContent = percent(job.progress, 0);
  const message = {
    queued: "Waiting for a worker…",
    succeeded: "Done.",
    cancelled: "Cancelled.",
    failed: "Failed.",
  }[job.status];
  document.getElementById("progress-message").textContent =
    job.status === "running" ? [job.stage, job.message].filter(Boolean).join(" · ") : message;
  const eta = document.getElementById("progress-eta");
  eta.textContent =
    job.status === "running"
      ? job.eta_s === null
        ? "estimating time left…"
        : `about ${formatDuration(job.eta_s)} left`
      : "";

  const timings = STAGES.filter((s) => job.timings[s] !== undefined).map((s) => [
    s,
    formatDuration(job.timings[s]),
  ]);
  if (job.timings.total !== undefined) timings.push(["total", formatDuration(job.timings.total)]);
  setRows(document.getElementById("timings"), timings.length ? timings : [["–", "not started"]]);

  const elapsed = job.started_at
    ? ((job.finished_at ? new Date(job.finished_at) : new Date()) - new Date(job.started_at)) / 1000
    : null;
  setRows(document.getElementById("details"), [
    ["created", new Date(job.created_at).toLocaleString()],
    ["started", job.started_at ? new Date(job.started_at).toLocaleString() : "–"],
    [job.finished_at ? "took" : "running for", formatDuration(elapsed)],
    ["clusterings", job.cluster_counts.join(", ")],
    ...routeRows(job),
    ["attempts", String(job.attempts)],
  ]);

  document.getElementById("error-box").hidden = job.status !== "failed";
  document.getElementById("error-text").textContent = job.error || "";
  const cancelNote = document.getElementById("cancel-note");
  cancelNote.hidden = !(job.cancel_requested && job.status === "running");
  cancelNote.textContent = "Stopping at the next step…";
  document.getElementById("cancel").hidden =
    FINISHED.includes(job.status) || job.cancel_requested;
  document.getElementById("open-gallery").hidden = job.status !== "succeeded";

  const notes = document.getElementById("notes");
  notes.innerHTML = "";
  if (job.notes.length) {
    notes.append(el("h3", {}, "Notes"), el("ul", {}, job.notes.map((n) => el("li", {}, n))));
  }
}

async function poll() {
  try {
    const job = await apiGet(`/jobs/${jobId}`);
    render(job);
    if (FINISHED.includes(job.status)) return;
  } catch (error) {
    document.getElementById("progress-message").textContent = `Cannot reach the server: ${error.message}`;
  }
  pollTimer = setTimeout(poll, POLL_MS);
}

document.getElementById("cancel").addEventListener("click", async (event) => {
  if (!confirm("Cancel this job? Its progress is lost.")) return;
  event.target.disabled = true;
  try {
    render(await apiPost(`/jobs/${jobId}/cancel`));
  } catch (error) {
    alert(error.message);
  } finally {
    event.target.disabled = false;
    clearTimeout(pollTimer);
    poll();
  }
});

poll();
