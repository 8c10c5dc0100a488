// The kiln console: one page, views by URL hash, the REST API through the session cookie
// (and the CSRF token, kept only in this module's memory), live updates from the
// /v1/events/stream server-sent events. Everything a guest or a client wrote (names, logs,
// labels) goes into the page as text, never as HTML.
import { Terminal } from "/console/vendor/xterm.mjs";
import { FitAddon } from "/console/vendor/addon-fit.mjs";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const flashBox = document.getElementById("flash");
let csrf = null;
let ingress = null;
let events = null;
/** Called with every lifecycle event while the current view is shown. */
const listeners = new Set();
/** Run when the view is left (streams, timers, sockets). */
let cleanups = [];

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, { json, body, type } = {}) {
  const headers = {};
  if (method !== "GET") headers["X-Kiln-Csrf"] = csrf ?? "";
  let payload = body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  } else if (body !== undefined) {
    headers["Content-Type"] = type ?? "application/octet-stream";
  }
  const r = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  if (!r.ok) {
    let e = {};
    try { e = await r.json(); } catch { /* not JSON */ }
    if (r.status === 401 && csrf && !path.startsWith("/console/")) signedOut(e.message);
    throw new ApiError(r.status, e.code ?? "Error", e.message ?? `${r.status} ${r.statusText}`);
  }
  if (r.status === 204) return null;
  return (r.headers.get("content-type") ?? "").includes("json") ? r.json() : r;
}

/** An element: attributes (`on…` are listeners), then children (text, nodes, arrays, null). */
function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

const enc = encodeURIComponent;
const when = (ms) => (ms ? new Date(ms).toLocaleString() : "—");
/** The API's `…At` fields are Unix seconds; `…Ms` ones milliseconds. */
const whenS = (s) => when(s * 1000);
const bytes = (n) => {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
};
const labelsText = (labels) => Object.entries(labels ?? {}).map(([k, v]) => (v ? `${k}=${v}` : k)).join(", ") || "—";

function flash(message, ok = false) {
  flashBox.textContent = message;
  flashBox.className = ok ? "ok" : "";
  flashBox.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { flashBox.hidden = true; }, ok ? 4000 : 10000);
}

/** Replaces `el`'s children, leaving out the nulls of optional parts. */
function fill(el, ...nodes) {
  el.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined && n !== false));
}

function show(...nodes) {
  fill(main, ...nodes);
  main.focus();
}

/** Runs `f`, showing what went wrong (the API's message says what to do). */
async function attempt(f) {
  try {
    return await f();
  } catch (e) {
    flash(e.message);
    return undefined;
  }
}

function button(text, onclick, cls) {
  return h("button", { type: "button", class: cls, onclick: (ev) => attempt(() => onclick(ev)) }, text);
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "—")]));
}

// ---- signing in and out ----------------------------------------------------------------

function signInView(message) {
  nav.hidden = true;
  const key = h("input", { type: "password", name: "apiKey", autocomplete: "off", required: true, "aria-describedby": "key-help" });
  const form = h("form", { class: "stack", onsubmit: (ev) => {
    ev.preventDefault();
    attempt(async () => {
      const s = await api("POST", "/console/session", { json: { apiKey: key.value } });
      key.value = "";
      await start(s.csrfToken);
    });
  } },
  h("label", {}, "API key", key),
  h("p", { id: "key-help", class: "muted" }, "The key in KILN_HOME/api-key on the host. It is exchanged for a session cookie and not kept in the browser."),
  h("div", {}, h("button", { type: "submit", class: "primary" }, "Sign in")));
  show(h("h1", {}, "Sign in to kiln"), message ? h("p", { class: "warning" }, message) : null, form);
  key.focus();
}

function signedOut(message) {
  csrf = null;
  events?.close();
  events = null;
  leave();
  signInView(message ?? "Signed out.");
}

async function start(token) {
  csrf = token;
  nav.hidden = false;
  const health = await api("GET", "/health");
  const dev = document.getElementById("dev-mode");
  dev.hidden = !health.devMode;
  dev.textContent = health.devMode ? `TCG dev mode: ${health.warning ?? "not a security boundary"}` : "";
  ingress = await api("GET", "/v1/ingress");
  events?.close();
  events = new EventSource("/v1/events/stream");
  events.addEventListener("event", (e) => {
    const ev = JSON.parse(e.data);
    for (const f of [...listeners]) f(ev);
  });
  await route();
}

document.getElementById("sign-out").addEventListener("click", () => attempt(async () => {
  await api("DELETE", "/console/session");
  signedOut("Signed out.");
}));

// ---- routing ----------------------------------------------------------------------------

function leave() {
  for (const f of cleanups) f();
  cleanups = [];
  listeners.clear();
}

const routes = [
  [/^#\/images$/, imagesView],
  [/^#\/images\/new$/, newImageView],
  [/^#\/images\/([^/?]+)$/, imageView],
  [/^#\/microvms$/, microvmsView],
  [/^#\/microvms\/new(?:\?image=(.*))?$/, runView],
  [/^#\/microvms\/([^/?]+)$/, microvmView],
];

async function route() {
  leave();
  if (!csrf) return signInView();
  const hash = location.hash || "#/microvms";
  for (const [re, view] of routes) {
    const m = hash.match(re);
    if (m) {
      for (const a of nav.querySelectorAll("a")) {
        a.toggleAttribute("aria-current", hash.startsWith(a.getAttribute("href")));
      }
      return attempt(() => view(...m.slice(1).map((x) => (x === undefined ? undefined : decodeURIComponent(x)))));
    }
  }
  location.hash = "#/microvms";
}

window.addEventListener("hashchange", route);

/** Calls `f` at most every `ms` however many events ask for it. */
function debounced(f, ms = 300) {
  let t = null;
  return () => {
    if (t) return;
    t = setTimeout(() => { t = null; attempt(f); }, ms);
  };
}

// ---- images -----------------------------------------------------------------------------

async function imagesView() {
  const body = h("tbody");
  const refresh = async () => {
    const { images } = await api("GET", "/v1/images");
    body.replaceChildren(...images.map((img) => h("tr", {},
      h("td", {}, h("a", { href: `#/images/${enc(img.name)}` }, img.name)),
      h("td", {}, h("span", { class: `status status-${img.status}` }, img.status)),
      h("td", {}, `${img.memorySizeMib ?? "—"} MiB · ${img.vcpus ?? "—"} vCPU`),
      h("td", { class: "wide" }, labelsText(img.labels)),
      h("td", { class: "wide" }, whenS(img.createdAt)))));
    if (!images.length) body.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No images yet.")));
  };
  await refresh();
  const again = debounced(refresh);
  listeners.add((ev) => { if (ev.kind === "image") again(); });
  show(h("h1", {}, "Images"),
    h("div", { class: "actions" }, h("a", { class: "button primary", href: "#/images/new" }, "New image")),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Status"), h("th", {}, "Size"),
        h("th", { class: "wide" }, "Labels"), h("th", { class: "wide" }, "Created"))), body)));
}

/** A ustar archive of [path, bytes, mode] entries (directories are implied by the paths). */
function tar(files) {
  const parts = [];
  const header = (path, size, mode) => {
    const b = new Uint8Array(512);
    const put = (text, at, len) => { const t = new TextEncoder().encode(text).slice(0, len); b.set(t, at); };
    const octal = (n, len) => n.toString(8).padStart(len - 1, "0") + "\0";
    let name = path, prefix = "";
    if (new TextEncoder().encode(path).length > 100) {
      const cut = path.lastIndexOf("/", 155);
      prefix = path.slice(0, cut);
      name = path.slice(cut + 1);
    }
    put(name, 0, 100); put(octal(mode, 8), 100, 8); put(octal(0, 8), 108, 8); put(octal(0, 8), 116, 8);
    put(octal(size, 12), 124, 12); put(octal(Math.floor(Date.now() / 1000), 12), 136, 12);
    b.fill(32, 148, 156); put("0", 156, 1); put("ustar\0", 257, 6); put("00", 263, 2); put(prefix, 345, 155);
    const sum = b.reduce((a, x) => a + x, 0);
    put(sum.toString(8).padStart(6, "0") + "\0 ", 148, 8);
    return b;
  };
  for (const [path, data, mode] of files) {
    parts.push(header(path, data.length, mode), data, new Uint8Array((512 - (data.length % 512)) % 512));
  }
  parts.push(new Uint8Array(1024));
  return new Blob(parts);
}

async function contextOf(dirFiles) {
  const files = [];
  for (const f of dirFiles) {
    // webkitRelativePath is "picked-dir/sub/file": the context is the picked directory.
    const path = f.webkitRelativePath.split("/").slice(1).join("/");
    files.push([path, new Uint8Array(await f.arrayBuffer()), /\.(sh|py)$/.test(path) ? 0o755 : 0o644]);
  }
  return tar(files);
}

function newImageView() {
  const name = h("input", { name: "name", required: true, autocomplete: "off" });
  const archive = h("input", { type: "file", name: "archive", accept: ".zip,.tar,application/zip,application/x-tar" });
  const dir = h("input", { type: "file", name: "directory", webkitdirectory: true, multiple: true });
  const status = h("p", { class: "muted", "aria-live": "polite" });
  const form = h("form", { class: "stack", onsubmit: (ev) => {
    ev.preventDefault();
    attempt(async () => {
      let context;
      if (archive.files.length) context = archive.files[0];
      else if (dir.files.length) context = await contextOf([...dir.files]);
      else throw new Error("choose a build context: a .zip or .tar with a Dockerfile, or a directory");
      status.textContent = `Uploading ${bytes(context.size)}…`;
      const art = await api("POST", "/v1/artifacts", { body: context });
      status.textContent = "Starting the build…";
      const img = await api("POST", "/v1/images", { json: { name: name.value, codeArtifact: { artifactId: art.artifactId } } });
      location.hash = `#/images/${enc(img.name)}`;
    });
  } },
  h("label", {}, "Name", name),
  h("label", {}, "Build context (.zip or .tar with a Dockerfile)", archive),
  h("label", {}, "…or a directory", dir),
  h("p", { class: "muted" }, "From a directory, files ending in .sh or .py are made executable; upload a tar to keep modes exactly."),
  h("div", {}, h("button", { type: "submit", class: "primary" }, "Build")), status);
  show(h("h1", {}, "New image"), form);
  name.focus();
}

async function imageView(id) {
  let img = await api("GET", `/v1/images/${enc(id)}`);
  const info = h("div", { class: "panel" });
  const steps = h("ol", { class: "steps" });
  const log = h("pre", { class: "log", "aria-label": "build log", tabindex: 0 });
  const actions = h("div", { class: "actions" });
  const render = () => {
    fill(actions,
      h("a", { class: "button primary", href: `#/microvms/new?image=${enc(img.name)}` }, "Run a microVM"),
      // Recorded once the build has ended.
      img.buildRequest ? button("Rebuild", async () => {
        const again = await api("POST", "/v1/images", { json: img.buildRequest });
        flash(`Rebuilding ${again.name}: ${again.imageIdentifier}`, true);
        await route();
      }) : null,
      button("Delete", async () => {
        if (!confirm(`Delete image ${img.name}?`)) return;
        await api("DELETE", `/v1/images/${enc(img.name)}`);
        flash(`Deleted ${img.name}`, true);
        location.hash = "#/images";
      }, "danger"));
    info.replaceChildren(facts([
      ["Status", h("span", { class: `status status-${img.status}`, "data-testid": "image-status" }, img.status)],
      ["Reason", img.statusReason],
      ["Build", h("code", {}, img.imageIdentifier)],
      ["Memory", `${img.memorySizeMib} MiB`], ["vCPUs", img.vcpus], ["CPU baseline", img.cpuBaseline],
      ["Ports", (img.exposedPorts ?? []).join(", ") || "—"], ["Labels", labelsText(img.labels)],
      ["Created", whenS(img.createdAt)],
    ]));
    steps.replaceChildren(...(img.steps ?? []).map((s) => h("li", { class: "done" },
      `${s.text}${s.cached ? " (cached)" : ""} — ${(s.millis / 1000).toFixed(1)} s`)));
  };
  render();
  const reload = async () => { img = await api("GET", `/v1/images/${enc(id)}`); render(); };
  listeners.add(debounced(reload));
  const abort = new AbortController();
  cleanups.push(() => abort.abort());
  (async () => {
    const r = await fetch(`/v1/images/${enc(id)}/logs?follow=true`, { signal: abort.signal, credentials: "same-origin" });
    if (!r.ok) return;
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(value);
      if (atEnd) log.scrollTop = log.scrollHeight;
    }
    await reload();
  })().catch(() => {});
  show(h("h1", {}, `Image ${img.name}`), actions, info, h("h2", {}, "Steps"), steps, h("h2", {}, "Build log"), log);
}

// ---- microVMs ---------------------------------------------------------------------------

const STATES = ["PENDING", "RUNNING", "SUSPENDED", "RESUMING", "TERMINATED"];
const filters = { state: "", image: "", label: "" };

async function microvmsView() {
  const body = h("tbody");
  const refresh = async () => {
    const q = new URLSearchParams();
    if (filters.state) q.set("state", filters.state);
    if (filters.image) q.set("image", filters.image);
    for (const l of filters.label.split(",").map((s) => s.trim()).filter(Boolean)) q.append("label", l);
    const { microvms } = await api("GET", `/v1/microvms?${q}`);
    body.replaceChildren(...microvms.map((vm) => h("tr", { "data-id": vm.microvmId },
      h("td", {}, h("a", { href: `#/microvms/${enc(vm.microvmId)}` }, h("code", {}, vm.microvmId))),
      h("td", {}, vm.imageName),
      h("td", {}, h("span", { class: `state state-${vm.state}` }, vm.state)),
      h("td", { class: "wide" }, labelsText(vm.labels)),
      h("td", { class: "wide" }, whenS(vm.lastActivityAt)))));
    if (!microvms.length) body.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No microVMs match.")));
  };
  const field = (key, input) => {
    input.value = filters[key];
    input.addEventListener("change", () => { filters[key] = input.value; attempt(refresh); });
    return input;
  };
  await refresh();
  const again = debounced(refresh);
  listeners.add((ev) => { if (ev.kind === "microvm") again(); });
  show(h("h1", {}, "microVMs"),
    h("div", { class: "actions" }, h("a", { class: "button primary", href: "#/microvms/new" }, "Run a microVM")),
    h("div", { class: "filters" },
      h("label", {}, "State", field("state", h("select", { name: "state" }, h("option", { value: "" }, "any"), STATES.map((s) => h("option", { value: s }, s))))),
      h("label", {}, "Image", field("image", h("input", { name: "image", placeholder: "name or build id" }))),
      h("label", {}, "Labels", field("label", h("input", { name: "label", placeholder: "team=a, env" })))),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "microVM"), h("th", {}, "Image"), h("th", {}, "State"),
        h("th", { class: "wide" }, "Labels"), h("th", { class: "wide" }, "Last activity"))), body)));
}

function parseLabels(text) {
  const out = {};
  for (const part of text.split(/[,\n]/).map((s) => s.trim()).filter(Boolean)) {
    const [k, ...v] = part.split("=");
    out[k] = v.join("=");
  }
  return out;
}

async function runView(image) {
  const { images } = await api("GET", "/v1/images");
  const ready = images.filter((i) => i.status === "SUCCESSFUL");
  const pick = h("select", { name: "image", required: true }, ready.map((i) => h("option", { value: i.name, selected: i.name === image }, i.name)));
  const idle = h("input", { type: "number", name: "maxIdle", min: 1, value: 300 });
  const kept = h("input", { type: "number", name: "suspended", min: 1, value: 3600 });
  const auto = h("input", { type: "checkbox", name: "autoResume", checked: true });
  const maxDur = h("input", { type: "number", name: "maxDuration", min: 1, placeholder: "no limit" });
  const labels = h("input", { name: "labels", placeholder: "team=a, env=dev" });
  const payload = h("textarea", { name: "payload", rows: 3, placeholder: "given to the image's /run hook" });
  const form = h("form", { class: "stack", onsubmit: (ev) => {
    ev.preventDefault();
    attempt(async () => {
      const req = {
        imageIdentifier: pick.value,
        idlePolicy: { maxIdleDurationSeconds: Number(idle.value), suspendedDurationSeconds: Number(kept.value), autoResumeEnabled: auto.checked },
        labels: parseLabels(labels.value),
      };
      if (maxDur.value) req.maxDurationSeconds = Number(maxDur.value);
      if (payload.value) req.runHookPayload = payload.value;
      const vm = await api("POST", "/v1/microvms", { json: req });
      location.hash = `#/microvms/${enc(vm.microvmId)}`;
    });
  } },
  h("label", {}, "Image", pick),
  h("label", {}, "Suspend after idle (seconds)", idle),
  h("label", {}, "Keep suspended for (seconds)", kept),
  h("label", { class: "inline" }, h("span", {}, auto, " Resume on the next request")),
  h("label", {}, "Terminate after (seconds)", maxDur),
  h("label", {}, "Labels", labels),
  h("label", {}, "Run hook payload", payload),
  h("div", {}, h("button", { type: "submit", class: "primary", disabled: !ready.length }, "Run")));
  show(h("h1", {}, "Run a microVM"), ready.length ? null : h("p", { class: "warning" }, "No image has built yet."), form);
}

async function microvmView(id) {
  let vm = await api("GET", `/v1/microvms/${enc(id)}`);
  const info = h("div", { class: "panel" });
  const actions = h("div", { class: "actions" });
  const tokenBox = h("div");
  const timeline = h("ol", { class: "timeline", "aria-label": "events" });
  const charts = h("div", { class: "grid2" });
  const logs = h("pre", { class: "log", tabindex: 0, "aria-label": "app logs" });
  const termBox = h("div");
  const files = h("div");
  const act = (verb) => async () => {
    await api("POST", `/v1/microvms/${enc(id)}/${verb}`, { json: {} });
    flash(`${verb}: asked`, true);
  };
  const render = () => {
    info.replaceChildren(facts([
      ["State", h("span", { class: `state state-${vm.state}`, "data-testid": "microvm-state" }, vm.state)],
      ["Reason", vm.stateReason ?? vm.resumeBlockedReason],
      ["Image", h("a", { href: `#/images/${enc(vm.imageName)}` }, vm.imageName)],
      ["Endpoint", h("code", {}, vm.endpoint)],
      ["Idle policy", `suspend after ${vm.idlePolicy.maxIdleDurationSeconds} s idle; kept ${vm.idlePolicy.suspendedDurationSeconds} s; auto-resume ${vm.idlePolicy.autoResumeEnabled ? "on" : "off"}`],
      ["Connectors", (vm.connectors ?? []).map((c) => c.type + (c.name ? ` ${c.name}` : "") + (c.destinations ? ` (${c.destinations.length})` : "")).join(", ") || "—"],
      ["Labels", labelsText(vm.labels)],
      ["Created", whenS(vm.createdAt)], ["Last activity", whenS(vm.lastActivityAt)],
      ["Running", `${vm.usage?.runningSeconds ?? 0} s`],
    ]));
    const running = vm.state === "RUNNING";
    actions.replaceChildren(
      button("Suspend", act("suspend")), button("Resume", act("resume")),
      button("Fork", async () => {
        const r = await api("POST", `/v1/microvms/${enc(id)}/fork`, { json: { count: 1 } });
        const child = r.microvms[0];
        flash(`Forked: ${child.microvmId}`, true);
        location.hash = `#/microvms/${enc(child.microvmId)}`;
      }),
      button("Create a token", async () => {
        const t = await api("POST", "/v1/auth-tokens", { json: { microvmIdentifier: id, expirationInMinutes: 60 } });
        const scheme = ingress.tls ? "https" : "http";
        const line = `curl -H 'X-Kiln-Auth: ${t.authToken["X-Kiln-Auth"]}' ${scheme}://${t.endpoint}/`;
        tokenBox.replaceChildren(h("div", { class: "panel" },
          h("p", {}, `A token for an hour (until ${whenS(t.expiresAt)}):`),
          h("pre", { class: "log", "data-testid": "curl-line" }, line),
          button("Copy", async () => { await navigator.clipboard.writeText(line); flash("Copied", true); })));
      }),
      button("Terminate", async () => {
        if (!confirm(`Terminate ${id}? Its memory and disk are gone after.`)) return;
        await act("terminate")();
      }, "danger"));
    const [suspend, resume, fork, token, terminate] = actions.children;
    suspend.disabled = !running;
    resume.disabled = vm.state !== "SUSPENDED";
    fork.disabled = !running;
    token.disabled = vm.state === "TERMINATED";
    terminate.disabled = vm.state === "TERMINATED";
  };
  const addEvent = (ev) => {
    const what = ev.toState ? `${ev.fromState ?? "—"} → ${ev.toState}` : ev.reason;
    timeline.prepend(h("li", {}, h("span", { class: "muted" }, when(ev.atMs)), " ", what, ev.toState && ev.reason ? ` (${ev.reason})` : ""));
  };
  render();
  const past = await api("GET", "/v1/events?limit=1000");
  for (const ev of past.events.filter((e) => e.microvmId === id)) addEvent(ev);
  listeners.add(async (ev) => {
    if (ev.microvmId !== id) return;
    addEvent(ev);
    const was = vm.state;
    vm = await api("GET", `/v1/microvms/${enc(id)}`);
    render();
    // The files API needs it RUNNING: show them once it is.
    if (vm.state === "RUNNING" && was !== "RUNNING") {
      await fileBrowser(id, files, "/");
      await whileRunning();
    }
  });
  const refreshLogs = async () => { logs.textContent = (await api("GET", `/v1/microvms/${enc(id)}/logs?maxBytes=65536`)).logs || "(nothing yet)"; };
  const refreshMetrics = async () => drawCharts(charts, await api("GET", `/v1/microvms/${enc(id)}/metrics`));
  const whileRunning = async () => {
    if (vm.state !== "RUNNING") return;
    await attempt(refreshLogs);
    await attempt(refreshMetrics);
  };
  await whileRunning();
  const timer = setInterval(() => { if (vm.state === "RUNNING") attempt(refreshMetrics); }, 5000);
  cleanups.push(() => clearInterval(timer));
  termBox.append(button("Open a terminal", () => openTerminal(id, termBox)));
  show(h("h1", {}, h("span", {}, "microVM "), h("code", {}, id)), actions, tokenBox, info,
    h("h2", {}, "Terminal"), termBox,
    h("h2", {}, "Files"), files,
    h("h2", {}, "Metrics"), charts,
    h("h2", {}, "App logs"), h("div", { class: "actions" }, button("Refresh", refreshLogs)), logs,
    h("h2", {}, "Events"), timeline);
  await fileBrowser(id, files, "/");
}

function chart(title, series, fmt) {
  const w = 300, hgt = 100;
  const all = series.flatMap((s) => s.values);
  const max = Math.max(1e-9, ...all);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${title}: now ${fmt(series[0].values.at(-1) ?? 0)}`);
  series.forEach((s, i) => {
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    const n = Math.max(1, s.values.length - 1);
    line.setAttribute("points", s.values.map((v, j) => `${(j / n) * w},${hgt - (v / max) * (hgt - 4) - 2}`).join(" "));
    if (i) line.setAttribute("class", "second");
    svg.append(line);
  });
  const now = series.map((s) => `${s.name} ${fmt(s.values.at(-1) ?? 0)}`).join(" · ");
  return h("figure", { class: "chart panel" }, h("figcaption", {}, h("strong", {}, title), " ", h("span", { class: "muted" }, now)), svg);
}

function drawCharts(box, history) {
  const s = history.samples;
  if (s.length < 2) {
    box.replaceChildren(h("p", { class: "muted" }, "Metrics appear after a few samples while it runs."));
    return;
  }
  const rate = (key) => s.slice(1).map((x, i) => Math.max(0, (x[key] - s[i][key]) / Math.max(0.001, (x.atMs - s[i].atMs) / 1000)));
  box.replaceChildren(
    chart("CPU", [{ name: "now", values: s.map((x) => x.cpuPercent) }], (v) => `${v.toFixed(1)} %`),
    chart("Memory", [{ name: "host", values: s.map((x) => x.hostMemoryBytes) }], bytes),
    chart("Network", [{ name: "in", values: rate("networkBytesIn") }, { name: "out", values: rate("networkBytesOut") }], (v) => `${bytes(v)}/s`));
}

// ---- files ------------------------------------------------------------------------------

async function fileBrowser(id, box, dir) {
  const base = `/v1/microvms/${enc(id)}/files`;
  const at = h("input", { name: "path", value: dir, "aria-label": "directory" });
  const upload = h("input", { type: "file", name: "upload", "aria-label": "upload a file here" });
  const body = h("tbody");
  const child = (name) => (dir.endsWith("/") ? dir : `${dir}/`) + name;
  const go = (path) => attempt(() => fileBrowser(id, box, path));
  let list;
  try {
    list = await api("GET", `${base}?path=${enc(dir)}&limit=500`);
  } catch (e) {
    box.replaceChildren(h("p", { class: "muted" }, `Files: ${e.message}`));
    return;
  }
  const parent = dir === "/" ? null : dir.replace(/\/[^/]*\/?$/, "") || "/";
  if (parent) body.append(h("tr", {}, h("td", { colspan: 4 }, button("..", () => go(parent), "link"))));
  for (const e of list.entries) {
    const path = child(e.name);
    body.append(h("tr", {},
      h("td", {}, e.kind === "directory" ? button(`${e.name}/`, () => go(path), "link") : e.name),
      h("td", {}, e.kind === "file" ? bytes(e.size) : e.kind),
      h("td", { class: "wide" }, when(e.modifiedMs)),
      h("td", {},
        e.kind === "file" ? h("a", { href: `${base}/content?path=${enc(path)}`, download: e.name }, "Download") : null, " ",
        button("Delete", async () => {
          if (!confirm(`Delete ${path}?`)) return;
          await api("DELETE", `${base}?path=${enc(path)}&recursive=true`);
          await go(dir);
        }, "link"))));
  }
  upload.addEventListener("change", () => attempt(async () => {
    const f = upload.files[0];
    if (!f) return;
    await api("PUT", `${base}/content?path=${enc(child(f.name))}`, { body: f });
    flash(`Uploaded ${child(f.name)}`, true);
    await go(dir);
  }));
  fill(box,
    h("form", { class: "filters", onsubmit: (ev) => { ev.preventDefault(); go(at.value || "/"); } },
      h("label", {}, "Directory", at), h("button", { type: "submit" }, "Open"), h("label", {}, "Upload", upload)),
    list.truncated ? h("p", { class: "muted" }, "Only the first 500 entries.") : null,
    h("div", { class: "table-wrap" }, h("table", { "aria-label": `files in ${dir}` },
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Size"), h("th", { class: "wide" }, "Modified"), h("th", {}, ""))), body)));
}

// ---- terminal ---------------------------------------------------------------------------

async function openTerminal(id, box) {
  const t = await api("POST", "/v1/auth-tokens", { json: { microvmIdentifier: id, expirationInMinutes: 5, kind: "shell" } });
  const screen = h("div", { id: "terminal", "data-testid": "terminal" });
  box.replaceChildren(screen);
  const term = new Terminal({ cursorBlink: true, fontSize: 14, convertEol: false });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  fit.fit();
  const scheme = ingress.tls ? "wss" : "ws";
  // The token goes as a WebSocket subprotocol (a browser cannot set headers on one); the
  // ingress answers with the other, `kiln-shell`.
  const ws = new WebSocket(`${scheme}://${t.endpoint}/.kiln/shell?cols=${term.cols}&rows=${term.rows}`,
    ["kiln-shell", `kiln-auth.${t.authToken["X-Kiln-Auth"]}`]);
  ws.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  ws.addEventListener("message", (m) => {
    if (typeof m.data === "string") {
      const ctl = JSON.parse(m.data);
      if (ctl.type === "exit") term.write(`\r\n[the shell exited${ctl.code === null ? "" : ` with ${ctl.code}`}]\r\n`);
    } else {
      term.write(new Uint8Array(m.data));
    }
  });
  ws.addEventListener("close", () => term.write("\r\n[disconnected]\r\n"));
  // Keys pressed before the socket opens are sent once it does.
  const early = [];
  term.onData((d) => (ws.readyState === WebSocket.OPEN ? ws.send(encoder.encode(d)) : early.push(d)));
  ws.addEventListener("open", () => { for (const d of early.splice(0)) ws.send(encoder.encode(d)); });
  const resize = () => {
    fit.fit();
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
  };
  const observer = new ResizeObserver(resize);
  observer.observe(screen);
  cleanups.push(() => { observer.disconnect(); ws.close(); term.dispose(); });
  term.focus();
}

// ---- start ------------------------------------------------------------------------------

api("GET", "/console/session")
  .then((s) => start(s.csrfToken))
  .catch(() => signInView());
