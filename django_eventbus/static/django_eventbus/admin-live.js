// "Follow live" for the event log changelist: new events are prepended to the list as they
// happen, without reloading. Loaded only for users who may see the log (the template gets
// its config from StoredEventAdmin.live_context); the websocket consumer authorizes each
// event again on the server, so this script never widens what a user can see.
//
// The connection is eventbus.js's client: after a lost connection it resubscribes with the
// last event id it saw as "since", so nothing is missed in between, and hands each event once.

import { connect } from "./eventbus.js";

const config = JSON.parse(document.getElementById("eventbus-live-config").textContent);
const toggle = document.getElementById("eventbus-live-toggle");
const statusLine = document.getElementById("eventbus-live-status");
const STORAGE_KEY = "django_eventbus.admin.follow-live";
const MAX_LIVE_ROWS = 500; // keep the page light when it stays open all day
const PAYLOAD_CHARS = 80; // as short_json() in admin.py

// ---- rendering: the same cells as the server-rendered rows -------------------------------------

const timeFormat = new Intl.DateTimeFormat("en-GB", {
  timeZone: config.time_zone || undefined,
  year: "numeric",
  month: "2-digit",
  day: "2-digit",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  fractionalSecondDigits: 3,
  hourCycle: "h23",
});

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const p = Object.fromEntries(timeFormat.formatToParts(date).map((part) => [part.type, part.value]));
  return `${p.year}-${p.month}-${p.day} ${p.hour}:${p.minute}:${p.second}.${p.fractionalSecond}`;
}

// JSON with a space after "," and ":" (Python's json.dumps default): where the column may wrap.
function spacedJson(value) {
  if (Array.isArray(value)) return `[${value.map(spacedJson).join(", ")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${spacedJson(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value) ?? "null";
}

function shortJson(value) {
  const text = spacedJson(value ?? {});
  return text.length <= PAYLOAD_CHARS ? text : text.slice(0, PAYLOAD_CHARS - 1) + "…";
}

// django.contrib.admin.utils.quote(): the admin's escaping of ids in URLs.
function adminQuote(value) {
  return value.replace(/[":/_#?;@&=+$,[\]<>%\n\\]/g, (c) => "_" + c.charCodeAt(0).toString(16).toUpperCase().padStart(2, "0"));
}

function cell(tag, field, text) {
  const element = document.createElement(tag);
  element.className = `field-${field}`;
  if (text !== undefined) element.textContent = text; // textContent: payloads are never parsed as HTML
  return element;
}

function buildRow(event) {
  const row = document.createElement("tr");
  row.className = "eventbus-live-row";
  row.dataset.eventId = event.event_id;
  if (config.actions) {
    // Live rows only know the event id, not the log id the actions need: not selectable.
    const box = document.createElement("td");
    box.className = "action-checkbox";
    row.append(box);
  }
  const time = cell("th", "time");
  const link = document.createElement("a");
  link.href = config.detail_url.replace("__id__", encodeURIComponent(adminQuote(event.event_id)));
  link.textContent = formatTime(event.timestamp);
  time.append(link);
  row.append(
    time,
    cell("td", "type", config.types[event.type] || event.type),
    cell("td", "topic", event.topic),
    cell("td", "source", event.source || "-"),
    cell("td", "short_payload", shortJson(event.payload)),
  );
  return row;
}

function tableBody() {
  let body = document.querySelector("#result_list tbody");
  if (body) return body;
  // An empty changelist has no table yet: build one with the same columns.
  const form = document.getElementById("changelist-form");
  const results = document.createElement("div");
  results.className = "results";
  const table = document.createElement("table");
  table.id = "result_list";
  const head = table.createTHead().insertRow();
  for (const title of [...(config.actions ? [""] : []), "Time", "Type", "Topic", "Source", "Payload"]) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = title;
    head.append(th);
  }
  body = table.createTBody();
  results.append(table);
  form.insertBefore(results, form.querySelector(".paginator"));
  return body;
}

// ---- which events belong on this page: the list's own filters and search ------------------------

function belongsHere(event) {
  const f = config.filters;
  if (f.type && event.type !== f.type) return false;
  if (f.topic && event.topic !== f.topic) return false;
  if (f.source && event.source !== f.source) return false;
  if (f.q && !(event.event_id === f.q || event.correlation_id === f.q || event.topic.startsWith(f.q))) return false;
  return true;
}

// ---- the connection: the project's browser client (reconnects, resumes with "since", dedups) ------

let client = null;

function setStatus(text, state) {
  statusLine.textContent = text;
  statusLine.dataset.state = state;
}

function show(event) {
  if (!belongsHere(event)) return;
  const body = tableBody();
  body.insertBefore(buildRow(event), body.firstChild);
  const live = body.querySelectorAll("tr.eventbus-live-row");
  if (live.length > MAX_LIVE_ROWS) live[live.length - 1].remove();
}

function start() {
  toggle.setAttribute("aria-pressed", "true");
  toggle.textContent = "Stop following";
  localStorage.setItem(STORAGE_KEY, "on");
  client = connect(config.url, {
    onEvent: show,
    onStatus: (status) => {
      if (status === "connecting") setStatus("connecting…", "connecting");
      else if (status === "closed" && client) setStatus("disconnected, reconnecting…", "reconnecting");
    },
    onSubscribed: () => setStatus("following new events", "live"),
    onError: (frame) => {
      // Not allowed, or no channel layer: retrying would not help.
      const fatal = frame.code === "forbidden" || frame.code === "unavailable";
      setStatus(frame.message || frame.code, fatal ? "error" : "warning");
      if (fatal) stop(false);
    },
  });
  client.subscribe(config.filters.topic || "*");
}

function stop(remember = true) {
  const closing = client;
  client = null; // first: the "closed" status of close() is not a disconnection
  if (closing) closing.close();
  toggle.setAttribute("aria-pressed", "false");
  toggle.textContent = "Follow live";
  if (remember) {
    localStorage.removeItem(STORAGE_KEY);
    setStatus("", "off");
  }
}

toggle.addEventListener("click", (click) => {
  click.preventDefault();
  if (client) stop();
  else start();
});

// Stay in live mode across filter changes and reloads until switched off.
if (localStorage.getItem(STORAGE_KEY) === "on") start();
