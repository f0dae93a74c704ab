// credbroker status page: the state of every credential, kept current from /v1/events.
// Everything is built from text nodes (no HTML parsing): paths and messages come from the
// broker's host and are shown, never interpreted.
"use strict";

const TYPES = [
  "credentials.refreshed", "credentials.expiring", "credentials.expired",
  "credentials.invalid", "credentials.missing", "credentials.refresh_failed",
  "credentials.action_failed", "credentials.lagging", "credentials.converged",
];
const RETRY_MAX_MS = 30000;
const BAR_MIN_MS = 12 * 3600 * 1000;

const states = new Map(); // credential name -> state document, in the broker's order
let lastId = null;        // the last event id seen, to resume after a broken stream
let source = null;
let retryMs = 1000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value); // CSSOM: allowed by the CSP
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function duration(seconds) {
  const sign = seconds < 0 ? "-" : "";
  let s = Math.abs(Math.round(seconds));
  const units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
  const parts = [];
  for (const [name, size] of units) {
    if (s >= size || (name === "s" && parts.length === 0)) {
      parts.push(Math.floor(s / size) + name);
      s %= size;
    }
    if (parts.length === 2) break;
  }
  return sign + parts.join(" ");
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  return seconds < 5 ? "just now" : duration(seconds) + " ago";
}

function local(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function expiryBlock(state) {
  if (!state.expires_at) {
    return el("div", { class: "expiry" }, el("span", {}, "no expiry known"));
  }
  const now = Date.now();
  const end = Date.parse(state.expires_at);
  // The bar spans the lifetime as far as the broker knows it (from when this content
  // appeared), but never less than BAR_MIN_MS: a token first seen minutes before it
  // expires must look nearly empty, not full.
  const start = Math.min(Date.parse(state.changed_at || state.expires_at), now);
  const span = Math.max(end - start, BAR_MIN_MS);
  const left = Math.min(Math.max((end - now) / span, 0), 1);
  const bar = el("div", { class: "bar", role: "meter", "aria-valuemin": "0",
    "aria-valuemax": "100", "aria-valuenow": String(Math.round(left * 100)),
    "aria-label": "time to expiry" }, el("div", { class: "left", style: { width: `${(left * 100).toFixed(1)}%` } }));
  if (state.expiring_at) {
    const at = (Date.parse(state.expiring_at) - start) / span;
    if (at > 0 && at < 1) bar.append(el("div", { class: "mark", style: { left: `${(at * 100).toFixed(1)}%` },
      title: "expiring from " + local(state.expiring_at) }));
  }
  const remaining = (end - now) / 1000;
  const text = remaining >= 0 ? "expires in " + duration(remaining) : "expired " + duration(-remaining) + " ago";
  return el("div", {},
    bar,
    el("div", { class: "expiry" },
      el("span", { class: "left-text" }, text),
      el("span", { class: "when", title: state.expires_at }, local(state.expires_at))));
}

function consumersBlock(state) {
  const consumers = state.consumers;
  if (!Array.isArray(consumers) || consumers.length === 0) return null;
  const rows = consumers.map((c) => el("tr", {},
    el("td", {}, String(c.id ?? c.consumer ?? "?")),
    el("td", { class: c.generation < state.generation ? "behind" : "" },
      "gen " + c.generation + (c.generation < state.generation ? " (behind)" : "")),
    el("td", {}, c.via ? String(c.via) : ""),
    el("td", { title: c.since || "" }, c.since ? ago(c.since) : "")));
  return el("div", { class: "consumers" },
    el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "consumer"), el("th", {}, "uses"),
        el("th", {}, "via"), el("th", {}, "since"))),
      el("tbody", {}, ...rows)));
}

function card(state) {
  const files = (state.files || []).map((f) => el("div", {},
    el("code", {}, f.path), f.present ? "" : " (absent)"));
  const problems = (state.problems || []).map((p) => el("li", {},
    el("span", { class: "code" }, p.code), ": ", p.message,
    p.remedy ? el("div", { class: "fix" }, "fix: ", el("code", {}, p.remedy)) : null));
  return el("article", { class: `card s-${state.status}`, id: "c-" + state.credential,
      "data-generation": String(state.generation), "data-status": state.status },
    el("h2", {}, el("span", {}, state.credential), el("span", { class: "badge" }, state.status)),
    expiryBlock(state),
    el("dl", {},
      el("dt", {}, "last change"),
      el("dd", { title: state.changed_at || "" }, ago(state.changed_at),
        state.reason ? " — " + state.reason : ""),
      el("dt", {}, "generation"), el("dd", { class: "generation" }, String(state.generation)),
      el("dt", {}, "fingerprint"), el("dd", {}, el("code", {}, state.fingerprint || "-")),
      el("dt", {}, files.length > 1 ? "files" : "file"), el("dd", {}, ...files)),
    problems.length ? el("ul", { class: "problems" }, ...problems) : null,
    consumersBlock(state));
}

function render(changed) {
  const main = document.getElementById("credentials");
  const cards = [...states.values()].map((state) => {
    const node = card(state);
    if (state.credential === changed) node.classList.add("updated"); // a brief highlight
    return node;
  });
  if (cards.length === 0) cards.push(el("p", { class: "empty" }, "No credentials configured."));
  main.replaceChildren(...cards);
  const counts = {};
  for (const s of states.values()) counts[s.status] = (counts[s.status] || 0) + 1;
  const parts = Object.entries(counts).map(([k, v]) => `${v} ${k}`);
  document.getElementById("summary").textContent =
    `${states.size} credential${states.size === 1 ? "" : "s"}` + (parts.length ? ": " + parts.join(", ") : "");
  document.title = (counts.valid === states.size ? "✓ " : "! ") + "credbroker";
}

function setLink(state, text) {
  const link = document.getElementById("link");
  link.dataset.state = state;
  link.textContent = text;
}

async function load() {
  const response = await fetch("/v1/credentials", { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    showLogin();
    return false;
  }
  if (!response.ok) throw new Error("HTTP " + response.status);
  const doc = await response.json();
  states.clear();
  for (const state of doc.credentials) states.set(state.credential, state);
  for (const state of doc.credentials) lastId = Math.max(lastId ?? 0, state.sequence);
  render(null);
  return true;
}

function showLogin() {
  document.getElementById("login").hidden = false;
  document.getElementById("credentials").hidden = true;
  document.getElementById("login-failed").hidden = location.hash !== "#login-failed";
  setLink("down", "signed out");
}

function follow() {
  // Resuming by ?since= as well as Last-Event-ID: a new EventSource (after a permanent
  // failure, e.g. a 503 while the daemon restarts) does not send the header.
  const url = "/v1/events" + (lastId !== null ? "?since=" + lastId : "");
  source = new EventSource(url);
  source.onopen = () => { retryMs = 1000; setLink("live", "live"); };
  for (const type of TYPES) {
    source.addEventListener(type, (message) => {
      const event = JSON.parse(message.data);
      lastId = Number(message.lastEventId) || lastId;
      states.set(event.subject, event.data);
      render(event.subject);
    });
  }
  source.addEventListener("reset", (message) => {
    // Events were missed (the daemon restarted or its ring moved on): re-read everything.
    lastId = Number(message.lastEventId) || lastId;
    load().catch(() => {});
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      setLink("down", "reconnecting…");
      source.close();
      setTimeout(() => start(), retryMs);
      retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
    } else {
      setLink("connecting", "reconnecting…");
    }
  };
}

async function start() {
  try {
    if (await load()) {
      document.getElementById("logout").hidden = false;
      follow();
    }
  } catch (error) {
    setLink("down", "unreachable; retrying");
    setTimeout(start, retryMs);
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("host").textContent = location.host;
  start();
  // Time left and "ago" move with the clock, not only with events.
  setInterval(() => { if (states.size) render(null); }, 1000);
});
