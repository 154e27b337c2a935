// The h264edge status page: polls status.json (figures from the same metrics /metrics shows) and
// draws them.  No libraries; the charts are plain SVG.
"use strict";

const REFRESH_MS = 2000;
const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

function bytes(n) {
  let i = 0;
  while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i += 1; }
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + UNITS[i];
}

function percent(ratio) { return (100 * ratio).toFixed(1) + " %"; }

function duration(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = Math.floor(seconds % 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

// a figure: its text for people, its exact value in data-value (what the tests compare with /metrics)
function show(id, value, text) {
  const el = document.getElementById(id);
  el.dataset.value = String(value);
  el.textContent = text;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells);
    return tr;
  }));
}

const SVG = "http://www.w3.org/2000/svg";

function chart(id, series, maximum, label) {
  const svg = document.getElementById(id);
  const width = 600, height = 160, left = 56, bottom = 18, top = 8;
  const nodes = [];
  const y = (v) => top + (height - top - bottom) * (1 - (maximum > 0 ? v / maximum : 0));
  for (const fraction of [0, 0.5, 1]) {
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("class", "grid");
    line.setAttribute("x1", left); line.setAttribute("x2", width);
    line.setAttribute("y1", y(maximum * fraction)); line.setAttribute("y2", y(maximum * fraction));
    const text = document.createElementNS(SVG, "text");
    text.setAttribute("x", 2); text.setAttribute("y", y(maximum * fraction) + 4);
    text.textContent = label(maximum * fraction);
    nodes.push(line, text);
  }
  for (const [className, points] of series) {
    if (points.length < 2) continue;
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    const x = (t) => left + (width - left) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
    const path = document.createElementNS(SVG, "polyline");
    path.setAttribute("class", className);
    path.setAttribute("points", points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "));
    nodes.push(path);
  }
  svg.replaceChildren(...nodes);
}

function render(data) {
  const t = data.totals;
  show("version", data.version, "version " + data.version);
  show("uptime", data.uptime, "up " + duration(data.uptime));
  show("requests", t.requests, t.requests.toLocaleString("en"));
  show("hit-ratio", t.hit_ratio, percent(t.hit_ratio));
  show("sent-bytes", t.sent_bytes, bytes(t.sent_bytes));
  show("origin-bytes", t.origin_bytes, bytes(t.origin_bytes));
  show("offload", t.sent_bytes ? 1 - t.origin_bytes / t.sent_bytes : 0,
       t.sent_bytes ? "offload " + percent(Math.max(0, 1 - t.origin_bytes / t.sent_bytes)) : "");
  show("connections", t.connections, String(t.connections));
  show("cut", t.cut, t.cut.toLocaleString("en"));
  show("cache-bytes", t.cache_bytes, bytes(t.cache_bytes));
  show("cache-max", t.cache_max_bytes, bytes(t.cache_max_bytes));
  show("cache-objects", t.cache_objects, t.cache_objects.toLocaleString("en"));
  const used = t.cache_max_bytes ? Math.min(1, t.cache_bytes / t.cache_max_bytes) : 0;
  document.getElementById("disk-bar").style.width = (100 * used).toFixed(1) + "%";

  const history = data.history;
  const sent = history.map((p) => [p.time, p.sent_bytes_per_second]);
  const origin = history.map((p) => [p.time, p.origin_bytes_per_second]);
  const peak = Math.max(1, ...sent.map((p) => p[1]), ...origin.map((p) => p[1]));
  chart("chart-throughput", [["sent", sent], ["origin", origin]], peak, (v) => bytes(v) + "/s");
  chart("chart-hits", [["hits", history.map((p) => [p.time, p.hit_ratio])]], 1, (v) => percent(v));
  const last = history[history.length - 1];
  document.getElementById("throughput-now").textContent = last ? "now " + bytes(last.sent_bytes_per_second) + "/s" : "";
  document.getElementById("hits-now").textContent = last ? "now " + percent(last.hit_ratio) : "";

  const topRow = ([path, requests, sent]) => [cell(path, "path"), cell(requests.toLocaleString("en"), "num"),
                                              cell(bytes(sent), "num")];
  fillTable("top-requests", data.top.by_requests.map(topRow));
  fillTable("top-bytes", data.top.by_bytes.map(topRow));
  fillTable("origins", data.origins.map((o) => [cell(o.base, "path"), cell(o.state, "state-" + o.state),
                                                 cell(String(o.answered), "num"), cell(String(o.errors), "num"),
                                                 cell(o.last_error || ""), cell(o.circuit || "")]));
  fillTable("errors", data.errors.map((e) => [cell(new Date(e.time * 1000).toISOString().replace(".000", "")),
                                               cell(e.kind), cell(e.text)]));
  document.getElementById("updated").textContent = "updated " + new Date(data.now * 1000).toLocaleTimeString();
  document.body.dataset.ready = "1";
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

async function refresh() {
  try {
    const response = await fetch("status.json", { cache: "no-store" });
    if (!response.ok) throw new Error("status.json: " + response.status);
    render(await response.json());
  } catch (error) {
    document.getElementById("updated").textContent = "cannot reach the edge: " + error.message;
  }
}

// the tests stop the polling so that the page's numbers and a scrape of /metrics see the same moment
window.statusPage = { refresh, stop: () => clearInterval(timer) };
const timer = setInterval(refresh, REFRESH_MS);
refresh();
