// The p2pshare dashboard: polls the peer's control API and draws what it answers.
// Every name and address comes from other peers: it is only ever set as text (textContent),
// never parsed as markup, and direction or invisible marks in it are shown as visible escapes.
"use strict";

const POLL_MS = 1000;        // while the page is visible
const HIDDEN_POLL_MS = 10000; // while it is in a background tab
const MAX_ROWS = 500;        // shared files drawn at once (the filter narrows the rest)
const TOKEN_KEY = "p2pshare-token";

const state = {
  token: "",
  filesVersion: -1,
  files: [],
  searches: [],             // the latest first: {query, hits, error, running}
  rates: new Map(),         // fetch id -> {t, received, rate}
  failures: 0,
  timer: 0,
};

const $ = (id) => document.getElementById(id);

// Bidirectional overrides and isolates, zero-width and other format characters, controls: shown as
// <U+XXXX> so that a name cannot pretend to end in another extension or hide part of itself.
const INVISIBLE = /[\u0000-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]/g;
function shown(name) {
  return String(name).replace(INVISIBLE, (c) => "<U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") + ">");
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function nameNode(name) {
  return el("span", {class: "name", text: shown(name), title: shown(name), "data-name": "1"});
}

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : String(n)) + " " + units[i];
}

function duration(s) {
  if (!isFinite(s) || s < 0) return "?";
  if (s < 60) return Math.ceil(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function parseSize(text) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$/i.exec(text);
  if (!m) return null;
  return Number(m[1]) * 1024 ** " kmgt".indexOf((m[2] || " ").toLowerCase());
}

// -- the token ----------------------------------------------------------------------------------

function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);  // out of the address bar and history
  }
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function showLogin(why) {
  $("main").hidden = true;
  $("login").hidden = false;
  if (why) $("login-why").textContent = why;
  setConn("refused", "no token");
}

function setConn(stateName, text) {
  const badge = $("conn");
  badge.dataset.state = stateName;
  badge.textContent = text;
}

async function api(path, options) {
  const opts = Object.assign({headers: {}}, options || {});
  opts.headers["Authorization"] = "Bearer " + state.token;
  if (opts.body !== undefined) opts.headers["Content-Type"] = "application/json";
  opts.cache = "no-store";
  const response = await fetch(path, opts);
  if (response.status === 401) {
    const error = new Error("the peer refused the token");
    error.refused = true;
    throw error;
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.message || ("HTTP " + response.status));
  return body;
}

// -- polling ------------------------------------------------------------------------------------

function schedule() {
  clearTimeout(state.timer);
  const base = document.hidden ? HIDDEN_POLL_MS : POLL_MS;
  const backoff = Math.min(5000, base * 2 ** Math.min(state.failures, 3));
  state.timer = setTimeout(poll, state.failures ? backoff : base);
}

async function poll() {
  try {
    const status = await api("/v1/status");
    state.failures = 0;
    setConn("connected", "connected");
    $("main").hidden = false;
    $("login").hidden = true;
    drawStatus(status);
    if (status.files_version !== state.filesVersion) {
      const listing = await api("/v1/files");
      state.files = listing.files;
      state.filesVersion = listing.version;
      drawFiles();
    }
  } catch (error) {
    if (error.refused) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("The peer refused this token (it may have been made anew). Open the address that " +
                "p2pshare ui prints, or paste the token from .p2pshare/control.token.");
      return;  // until a new token is given
    }
    state.failures++;
    setConn("reconnecting", "peer unreachable, retrying");
  }
  schedule();
}

// -- drawing ------------------------------------------------------------------------------------

function drawStatus(s) {
  $("peer-id").textContent = s.peer;
  $("peer-addr").textContent = `${s.host} (UDP ${s.udp}, TCP ${s.tcp})`;
  $("peer-dir").textContent = shown(s.dir);
  $("peer-tracker").textContent = s.tracker === null ? "none (static neighbours only)"
    : s.tracker.connected ? "registered" : "not connected (retrying)";
  $("neighbour-count").textContent = String(s.neighbours.length);
  $("neighbours").replaceChildren(...s.neighbours.map((a) => el("li", {text: `${a[0]}:${a[1]}`})));
  drawFetching(s.fetching);
  drawFetched(s.fetched || []);
  $("counter-rows").replaceChildren(...Object.entries(s.counters).map(([k, v]) =>
    el("tr", {}, el("td", {text: k}), el("td", {class: "num", text: String(v)}))));
}

function progressBar(pct) {
  const bar = el("div", {class: "bar", role: "progressbar"}, el("div", {}));
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.setAttribute("aria-valuenow", String(pct));
  bar.firstChild.style.width = pct + "%";
  return bar;
}

function drawFetching(fetching) {
  const now = performance.now() / 1000;
  const items = Object.values(fetching);
  $("no-downloads").hidden = items.length > 0;
  const seen = new Set();
  $("fetching").replaceChildren(...items.map((f) => {
    seen.add(f.id);
    const prev = state.rates.get(f.id);
    let rate = prev ? prev.rate : 0;
    if (prev && now > prev.t) {
      const instant = (f.received - prev.received) / (now - prev.t);
      rate = prev.rate ? 0.7 * prev.rate + 0.3 * instant : instant;
    }
    state.rates.set(f.id, {t: now, received: f.received, rate});
    const pct = f.size ? Math.floor(100 * f.received / f.size) : (f.size === 0 ? 100 : 0);
    const label = f.name || ("sha256:" + f.sha256);
    return el("li", {"data-fetch": String(f.id)},
      nameNode(label),
      progressBar(pct),
      el("div", {class: "meta"},
        el("span", {class: "pct", text: pct + "%"}),
        el("span", {text: `${bytes(f.received)} of ${bytes(f.size)}`}),
        el("span", {text: f.state === "searching" ? "searching" : `${f.sources} source${f.sources === 1 ? "" : "s"}`}),
        el("span", {text: `${bytes(Math.max(0, rate))}/s`}),
        el("span", {text: "ETA " + (rate > 0 && f.size ? duration((f.size - f.received) / rate) : "?")}),
        el("span", {text: `pieces ${f.verified}/${f.pieces} verified`}),
        el("button", {class: "secondary cancel", type: "button", text: "Cancel", onclick: () => cancel(f.id)})));
  }));
  for (const id of state.rates.keys()) if (!seen.has(id)) state.rates.delete(id);
}

function drawFetched(fetched) {
  $("fetched").replaceChildren(...fetched.map((f) => el("li", {"data-fetch": String(f.id)},
    nameNode(f.name || ("sha256:" + f.sha256)), " ",
    el("span", {class: "outcome outcome-" + f.outcome, text: f.outcome}),
    f.outcome === "completed" ? progressBar(100) : null,
    el("div", {class: "meta"},
      el("span", {text: bytes(f.size)}),
      el("span", {text: duration(f.seconds)}),
      f.error ? el("span", {class: "error reason", text: shown(f.error)}) : null))));
}

function filtered() {
  const name = $("filter-name").value.toLowerCase();
  const min = parseSize($("filter-min").value);
  const max = parseSize($("filter-max").value);
  const hash = $("filter-hash").value.trim().toLowerCase().replace(/^sha256:/, "");
  return state.files.filter((f) => (!name || f.name.toLowerCase().includes(name))
    && (min === null || f.size >= min) && (max === null || f.size <= max) && (!hash || f.sha256.startsWith(hash)));
}

function drawFiles() {
  const matching = filtered();
  $("file-count").textContent = `(${state.files.length})`;
  $("files-shown").textContent = matching.length > MAX_ROWS ? `showing ${MAX_ROWS} of ${matching.length}; filter to see others`
    : `${matching.length} shown`;
  $("file-rows").replaceChildren(...matching.slice(0, MAX_ROWS).map((f) => el("tr", {},
    el("td", {}, nameNode(f.name)),
    el("td", {class: "num", text: bytes(f.size)}),
    el("td", {class: "mono", text: f.sha256.slice(0, 16) + "…", title: f.sha256}),
    el("td", {}, el("button", {class: "secondary copy", type: "button", text: "Copy sha256:",
      onclick: (e) => copy("sha256:" + f.sha256, e.target)})))));
}

function drawSearches() {
  $("searches").replaceChildren(...state.searches.map((s) => el("li", {"data-state": s.running ? "running" : "done"},
    el("div", {}, "“", nameNode(s.query), "” ",
      el("span", {class: "quiet", text: s.running ? "searching…" : s.error ? "" : `${s.hits.length} hit${s.hits.length === 1 ? "" : "s"}`}),
      s.error ? el("span", {class: "error", text: " " + s.error}) : null),
    ...s.hits.map((h) => el("div", {class: "hit"},
      nameNode(h.name),
      el("span", {text: bytes(h.size)}),
      el("span", {class: "mono", text: h.sha256.slice(0, 12) + "…", title: h.sha256}),
      el("span", {class: "mono quiet", text: h.tcp}),
      el("button", {type: "button", class: "fetch", text: h.started ? "Started" : "Fetch", disabled: !!h.started,
        onclick: (e) => startFetch(h, e.target)}))))));
}

// -- actions ------------------------------------------------------------------------------------

async function search() {
  const query = $("search-input").value.trim();
  if (!query) return;
  const params = new URLSearchParams({timeout: "3"});
  if (/^sha256:[0-9a-f]{64}$/i.test(query)) params.set("sha256", query.slice(7).toLowerCase());
  else params.set("name", query);
  const entry = {query, hits: [], error: "", running: true};
  state.searches.unshift(entry);
  state.searches.length = Math.min(state.searches.length, 20);
  drawSearches();
  try {
    entry.hits = (await api("/v1/search?" + params)).hits;
  } catch (error) {
    entry.error = error.message;
  }
  entry.running = false;
  drawSearches();
}

async function startFetch(hit, button) {
  button.disabled = true;
  try {
    await api("/v1/fetches", {method: "POST", body: JSON.stringify({name: hit.name, sha256: hit.sha256, timeout: 30})});
    hit.started = true;
    button.textContent = "Started";
    poll();
  } catch (error) {
    button.disabled = false;
    $("search-error").hidden = false;
    $("search-error").textContent = shown(error.message);
  }
}

async function cancel(id) {
  try {
    await api("/v1/cancel", {method: "POST", body: JSON.stringify({id})});
  } catch (error) {
    // it may have ended meanwhile: the next poll shows how
  }
  poll();
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (error) {
    const field = el("input", {value: text, readOnly: true, class: "mono"});
    button.replaceWith(field);
    field.select();
  }
}

function start() {
  state.token = takeTokenFromFragment();
  $("token-use").addEventListener("click", () => {
    const token = $("token-input").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    state.token = token;
    $("token-input").value = "";
    poll();
  });
  $("search-go").addEventListener("click", search);
  $("search-input").addEventListener("keydown", (e) => { if (e.key === "Enter") search(); });
  for (const id of ["filter-name", "filter-min", "filter-max", "filter-hash"]) $(id).addEventListener("input", drawFiles);
  document.addEventListener("visibilitychange", () => { if (!document.hidden && state.token) poll(); });
  if (!state.token) {
    showLogin("");
    return;
  }
  poll();
}

start();
