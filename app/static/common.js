// Shared helpers for the pages: REST calls, formatting, cluster colours, element building.
"use strict";

const API = document.body.dataset.api || "/api/v1";
// A signed-in browser's session token for requests that change state (empty without a session).
const CSRF_TOKEN = document.querySelector('meta[name="csrf-token"]')?.content || "";

/** Headers every state-changing request carries: the CSRF token where there is a session. */
function csrfHeaders() {
  return CSRF_TOKEN ? { "X-CSRF-Token": CSRF_TOKEN } : {};
}

/** fetch JSON from the API; throws an Error carrying the API's `detail` text on failure. */
async function apiGet(path, params) {
  const url = new URL(API + path, location.origin);
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== null && value !== undefined) url.searchParams.set(key, value);
  }
  const response = await fetch(url);
  return readJson(response);
}

async function apiPost(path, body) {
  const response = await fetch(API + path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...csrfHeaders() },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return readJson(response);
}

async function readJson(response) {
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const error = new Error(errorText(data) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

/** The human message of a FastAPI error body ({detail: "..."} or a validation list). */
function errorText(data) {
  if (!data || data.detail === undefined) return "";
  if (typeof data.detail === "string") return data.detail;
  if (Array.isArray(data.detail)) {
    return data.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return JSON.stringify(data.detail);
}

/** el("div", {class: "x", onclick: f}, child, "text", ...) */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style" && typeof value === "object") Object.assign(node.style, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function thumbnailUrl(datasetId, imageId) {
  return `${API}/datasets/${datasetId}/images/${imageId}?thumbnail=true`;
}

function imageUrl(datasetId, imageId) {
  return `${API}/datasets/${datasetId}/images/${imageId}`;
}

/** A distinct, stable colour per cluster index (golden-angle hues, two lightness bands). */
function clusterColor(index, alpha) {
  const hue = (index * 137.508 + 210) % 360;
  const light = index % 2 ? 42 : 52;
  return alpha === undefined
    ? `hsl(${hue.toFixed(1)} 70% ${light}%)`
    : `hsl(${hue.toFixed(1)} 70% ${light}% / ${alpha})`;
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.max(0, seconds);
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 90) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 90) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function formatBytes(bytes) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value < 10 && unit ? 1 : 0)} ${units[unit]}`;
}

function formatDate(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  const now = new Date();
  const sameDay = date.toDateString() === now.toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric", year: "numeric" });
}

function percent(value, digits) {
  return `${(100 * value).toFixed(digits === undefined ? 1 : digits)}%`;
}

/** Save `text` as a file named `name` in the browser (downloads made from API pages). */
function saveText(text, name, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
