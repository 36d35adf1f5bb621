// The snakepool dashboard: draws what the server pushes (server-sent events).
// No library: tables are rebuilt from each state, charts are SVG polylines.
"use strict";

const CHART_SECONDS = 300; // the charts show the last five minutes
const LOG_LINES_KEPT = 1000;
const EVENTS_KEPT = 200;

const view = {
  history: {}, // pool -> [[time, calls/s, p50, p99, failures/s], ...]
  events: [],
  log: null, // "pool/worker" whose log is shown
  lines: [],
  source: null,
};

function $(selector) {
  return document.querySelector(selector);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function td(value, cls) {
  return el("td", { class: cls || null }, value === null || value === undefined ? "" : value);
}

function seconds(value) {
  if (value === null || value === undefined) return "";
  if (value < 0.001) return (value * 1e6).toFixed(0) + " µs";
  if (value < 1) return (value * 1e3).toFixed(1) + " ms";
  return value.toFixed(2) + " s";
}

function duration(value) {
  if (value === null || value === undefined) return "";
  if (value < 120) return value.toFixed(0) + " s";
  if (value < 7200) return (value / 60).toFixed(0) + " min";
  return (value / 3600).toFixed(1) + " h";
}

function bytes(value) {
  if (value === null || value === undefined) return "";
  return (value / 1048576).toFixed(1) + " MiB";
}

function rate(value) {
  return value === null || value === undefined ? "" : value.toFixed(value < 10 ? 1 : 0);
}

function clock(time) {
  return new Date(time * 1000).toLocaleTimeString();
}

function replaceRows(table, rows) {
  const body = $(table + " tbody");
  body.replaceChildren(...rows);
}

// --- tables --------------------------------------------------------------------------

function drawPools(state) {
  replaceRows(
    "#pools",
    state.pools.map((pool) => {
      const ready = pool.workers.filter((w) => w.state === "idle" || w.state === "busy").length;
      const last = pool.last || [];
      const row = el(
        "tr",
        { "data-pool": pool.name },
        td(pool.name),
        td(pool.enabled ? `${ready}/${pool.size}` : "disabled", "ready"),
        td(pool.queued, "queued"),
        td(pool.sessions, "sessions"),
        td(pool.breaker_state, "breaker breaker-" + pool.breaker_state),
        td(pool.completed, "completed"),
        td(pool.failed_total, "failed"),
        td(rate(last[1]), "rate"),
        td(seconds(last[2]), "p50"),
        td(seconds(last[3]), "p99"),
        td(pool.start_method.split(" ")[0], "start"),
      );
      row.lastChild.title = pool.start_method;
      return row;
    }),
  );
}

function drawWorkers(state) {
  const rows = [];
  for (const pool of state.pools) {
    for (const w of pool.workers) {
      const key = `${pool.name}/${w.id}`;
      const row = el(
        "tr",
        { "data-worker": key, class: key === view.log ? "chosen" : null },
        td(key),
        td(w.state, "state state-" + w.state),
        td(w.pid, "pid"),
        td(pool.node, "node"),
        td(w.gpu, "gpu"),
        td(w.inflight, "inflight"),
        td(w.requests, "requests"),
        td(w.restarts, "restarts"),
        td(bytes(w.rss_bytes), "rss"),
        td(rate(w.calls_per_s), "rate"),
        td(seconds(w.p50_seconds), "p50"),
        td(seconds(w.p99_seconds), "p99"),
        td(duration(w.uptime_seconds), "uptime"),
      );
      row.addEventListener("click", () => chooseLog(key));
      rows.push(row);
    }
  }
  replaceRows("#workers", rows);
}

function drawErrors(state) {
  const rows = [];
  const commands = [];
  for (const pool of state.pools) {
    for (const [category, count] of Object.entries(pool.failed)) {
      rows.push(el("tr", { "data-category": category }, td(pool.name), td(category), td(count)));
    }
    for (const command of pool.commands) {
      const failed = Object.values(command.failed).reduce((a, b) => a + b, 0);
      commands.push(
        el(
          "tr",
          {},
          td(pool.name),
          td(command.command),
          td(command.calls),
          td(failed),
          td(seconds(command.p50)),
          td(seconds(command.p99)),
        ),
      );
    }
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 3, class: "empty" }, "no failures")));
  replaceRows("#errors", rows);
  replaceRows("#commands", commands);
}

function drawServer(state) {
  $("#node").textContent = state.node ? "on " + state.node : "";
  const server = state.server;
  $("#server").textContent = server
    ? `${server.clients} client(s) connected, ${server.accepted} accepted, ${server.dropped} dropped`
    : "";
}

// --- DSPy runs -----------------------------------------------------------------------

function drawRuns(state) {
  const box = $("#runs");
  if (!state.runs.length) {
    box.replaceChildren(el("p", { class: "empty" }, "none yet"));
    return;
  }
  box.replaceChildren(
    ...state.runs.map((run) => {
      const fields = run.fields || {};
      const parts = [];
      const done = fields.done;
      const total = fields.total;
      const title = `${run.kind} ${run.run || ""} on ${run.pool}`;
      const node = el("div", { class: "run", "data-run": `${run.pool}/${run.kind}/${run.run}` });
      node.append(el("div", { class: "title" }, title, el("span", { class: "hint" }, "  " + clock(run.updated))));
      if (typeof done === "number" && typeof total === "number" && total > 0) {
        const bar = el("div", { class: "bar" }, el("div", {}));
        bar.firstChild.style.width = Math.min(100, (100 * done) / total).toFixed(1) + "%";
        node.append(bar);
        parts.push(`${done}/${total}`);
      }
      for (const [key, value] of Object.entries(fields)) {
        if (key === "instructions" || value === null || typeof value === "object") continue;
        parts.push(`${key}=${typeof value === "number" && !Number.isInteger(value) ? value.toFixed(4) : value}`);
      }
      node.append(el("div", { class: "fields" }, parts.join("  ")));
      if (run.scores && run.scores.length > 1) node.append(chart([run.scores.map((s, i) => [i, s])], ["score"], 40));
      return node;
    }),
  );
}

// --- events and logs -----------------------------------------------------------------

function addEvents(events) {
  if (!events || !events.length) {
    if (!view.events.length) $("#events").replaceChildren(el("li", { class: "empty" }, "none yet"));
    return;
  }
  view.events = view.events.concat(events).slice(-EVENTS_KEPT);
  const list = $("#events");
  list.replaceChildren(
    ...view.events
      .slice()
      .reverse()
      .map((event) => {
        const data = Object.entries(event.data || {})
          .filter(([, value]) => value !== null && typeof value !== "object")
          .map(([key, value]) => `${key}=${typeof value === "number" && !Number.isInteger(value) ? value.toFixed(3) : value}`)
          .join(" ");
        const where = event.worker === null ? event.pool : `${event.pool}/${event.worker}`;
        return el(
          "li",
          { class: "ev-" + event.name.replace(/\./g, "-") },
          clock(event.time) + " ",
          el("span", { class: "name" }, event.name),
          ` ${where} ${data}`,
        );
      }),
  );
}

function addLines(lines) {
  if (!lines || !lines.length) return;
  view.lines = view.lines.concat(lines).slice(-LOG_LINES_KEPT);
  const box = $("#log");
  const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  box.textContent = view.lines
    .map((line) => (line.level === "INFO" ? line.line : `${line.level}: ${line.line}`))
    .join("\n");
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function chooseLog(key) {
  if (key === view.log) return;
  view.log = key;
  view.lines = [];
  $("#log").textContent = "";
  $("#log-title").textContent = "Worker log: " + key;
  for (const row of document.querySelectorAll("#workers tbody tr")) {
    row.classList.toggle("chosen", row.dataset.worker === key);
  }
  connect();
}

// --- charts --------------------------------------------------------------------------

const COLORS = ["#2f6f4f", "#b45309", "#1d4ed8", "#b91c1c"];

// A line chart of series (each [[x, y], ...]) as an SVG element.
function chart(series, names, height) {
  const width = 400;
  const h = height || 100;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const points = series.flat().filter((p) => p[1] !== null && Number.isFinite(p[1]));
  if (!points.length) return svg;
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs, x0 + 1);
  const y1 = Math.max(...ys, 1e-9) * 1.1;
  const pad = 14;
  const sx = (x) => ((x - x0) / (x1 - x0)) * (width - 4) + 2;
  const sy = (y) => h - pad - (y / y1) * (h - pad - 4);
  const axis = document.createElementNS(ns, "line");
  axis.setAttribute("class", "axis");
  axis.setAttribute("x1", 0);
  axis.setAttribute("x2", width);
  axis.setAttribute("y1", h - pad);
  axis.setAttribute("y2", h - pad);
  svg.append(axis);
  series.forEach((points, i) => {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute(
      "points",
      points
        .filter((p) => p[1] !== null && Number.isFinite(p[1]))
        .map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`)
        .join(" "),
    );
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[i % COLORS.length]);
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(line);
  });
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", 2);
  label.setAttribute("y", 10);
  label.textContent = "max " + (names && names[0] === "latency" ? seconds(y1 / 1.1) : (y1 / 1.1).toPrecision(3));
  svg.append(label);
  return svg;
}

function legend(names) {
  return el(
    "div",
    { class: "legend" },
    ...names.map((name, i) => {
      const span = el("span", {}, "— " + name);
      span.style.color = COLORS[i % COLORS.length];
      return span;
    }),
  );
}

function drawCharts() {
  const boxes = [];
  for (const [pool, points] of Object.entries(view.history)) {
    const now = points.length ? points[points.length - 1][0] : 0;
    const recent = points.filter((p) => p[0] >= now - CHART_SECONDS);
    const calls = el("div", { class: "chart", "data-chart": pool + "/rate" });
    calls.append(el("h3", {}, `${pool}: calls/s and failures/s, last ${CHART_SECONDS / 60} min`));
    calls.append(chart([recent.map((p) => [p[0], p[1]]), recent.map((p) => [p[0], p[4]])], ["calls"]));
    calls.append(legend(["calls/s", "failures/s"]));
    const latency = el("div", { class: "chart", "data-chart": pool + "/latency" });
    latency.append(el("h3", {}, `${pool}: latency p50 and p99`));
    latency.append(chart([recent.map((p) => [p[0], p[2]]), recent.map((p) => [p[0], p[3]])], ["latency"]));
    latency.append(legend(["p50", "p99"]));
    boxes.push(calls, latency);
  }
  $("#charts").replaceChildren(...boxes);
}

function addHistory(lastByPool) {
  for (const [pool, point] of Object.entries(lastByPool || {})) {
    const points = (view.history[pool] = view.history[pool] || []);
    if (!points.length || points[points.length - 1][0] < point[0]) points.push(point);
    while (points.length && points[0][0] < point[0] - 3600) points.shift();
  }
}

// --- the stream ----------------------------------------------------------------------

function draw(state) {
  drawServer(state);
  drawPools(state);
  drawWorkers(state);
  drawErrors(state);
  drawRuns(state);
  drawCharts();
}

function connect() {
  if (view.source) view.source.close();
  const url = "api/stream" + (view.log ? "?log=" + encodeURIComponent(view.log) : "");
  const source = (view.source = new EventSource(url));
  source.addEventListener("hello", (message) => {
    const state = JSON.parse(message.data);
    view.history = state.history || {};
    view.events = [];
    addEvents(state.events);
    if (!view.log && state.pools.length && state.pools[0].workers.length) {
      // The first worker's log, once the page knows the workers.
      view.log = `${state.pools[0].name}/${state.pools[0].workers[0].id}`;
      $("#log-title").textContent = "Worker log: " + view.log;
      draw(state);
      connect();
      return;
    }
    view.lines = [];
    addLines(state.lines);
    draw(state);
    $("#status").textContent = "live";
    $("#status").className = "status live";
  });
  source.addEventListener("state", (message) => {
    const state = JSON.parse(message.data);
    addHistory(state.last_by_pool);
    addEvents(state.events);
    addLines(state.lines);
    draw(state);
  });
  source.addEventListener("error", () => {
    $("#status").textContent = "reconnecting";
    $("#status").className = "status down";
  });
}

connect();
