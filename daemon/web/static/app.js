// cryoptycho live viewer: one WebSocket, latest-only updates, colour mapping in the browser.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
const scans = new Map();   // scan_id → {info, metrics, preview, loss: [[it, loss]]}
let selected = null;
const drawLog = window.cryoptychoDraws = [];
const $ = (id) => document.getElementById(id);

// Perceptually ordered colour map (viridis, 9 stops, linearly interpolated).
const VIRIDIS = [[68,1,84],[71,44,122],[59,81,139],[44,113,142],[33,144,141],[39,173,129],[92,200,99],[170,220,50],[253,231,37]];
function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
  return VIRIDIS[i].map((c, k) => c + f * (VIRIDIS[i + 1][k] - c));
}
function hsv(t) {  // cyclic map for phases
  const h = (Math.min(1, Math.max(0, t)) * 6) % 6, c = 255, x = c * (1 - Math.abs((h % 2) - 1));
  return [[c,x,0],[x,c,0],[0,c,x],[0,x,c],[x,0,c],[c,0,x]][Math.floor(h)];
}

// Draw an 8-bit PNG image (values lo..hi) on a canvas through a colour map and a display range.
function draw(canvas, img, cmap, range) {
  return new Promise((resolve) => {
    const el = new Image();
    el.onload = () => {
      canvas.width = el.width; canvas.height = el.height;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(el, 0, 0);
      const px = ctx.getImageData(0, 0, el.width, el.height), d = px.data;
      const [lo, hi] = img.range, [a, b] = range || img.range, span = (b - a) || 1e-12;
      for (let i = 0; i < d.length; i += 4) {
        const v = lo + (d[i] / 255) * (hi - lo), c = cmap((v - a) / span);
        d[i] = c[0]; d[i + 1] = c[1]; d[i + 2] = c[2]; d[i + 3] = 255;
      }
      ctx.putImageData(px, 0, 0);
      resolve();
    };
    el.src = img.png;
  });
}

function drawCoverage(canvas, img, show) {
  const ctx = canvas.getContext("2d");
  if (!show || !img) { canvas.width = canvas.width; return; }
  const el = new Image();
  el.onload = () => {
    canvas.width = el.width; canvas.height = el.height;
    ctx.drawImage(el, 0, 0);
    const px = ctx.getImageData(0, 0, el.width, el.height), d = px.data;
    for (let i = 0; i < d.length; i += 4) {   // unscanned area tinted, scanned area clear
      const cov = d[i] / 255; d[i] = 255; d[i + 1] = 80; d[i + 2] = 40; d[i + 3] = cov > 0.05 ? 0 : 110;
    }
    ctx.putImageData(px, 0, 0);
  };
  el.src = img.png;
}

function niceLength(nm) { for (const v of [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]) if (v >= nm) return v; return nm; }

function scaleBar(preview) {
  // the canvas is drawn "contain"-fitted in its box: the smaller of the two stretches applies
  const canvas = $("object"), box = canvas.getBoundingClientRect();
  const stretch = Math.min(box.width / canvas.width, box.height / canvas.height) || 1;
  const nmPerScreenPx = preview.pixel_size_m * 1e9 / stretch;
  const len = niceLength(nmPerScreenPx * 80);
  $("scalebar").querySelector("i").style.width = (len / nmPerScreenPx) + "px";
  $("scalebar").querySelector("span").textContent = len + " nm";
}

function fmt(v, digits = 3) { return v === null || v === undefined ? "–" : Number(v).toPrecision(digits); }

function renderList() {
  const ul = $("scans"); ul.innerHTML = "";
  if (!scans.size) { ul.innerHTML = '<li class="note">no scans yet</li>'; return; }
  for (const [id, s] of scans) {
    const li = document.createElement("li");
    li.className = id === selected ? "sel" : "";
    li.innerHTML = `<span>${id}</span><span class="pill ${s.info.state}">${s.info.state}</span>`;
    li.onclick = () => { selected = id; renderList(); renderScan(true); };
    ul.appendChild(li);
  }
}

// The loss is the daemon's per-frame figure (data-term loss divided by the frames it covers), so
// it does not grow as frames arrive. Linear axis reaching a quarter below the minimum: a ±2 %
// wobble must not fill the plot and read as divergence.
function renderLoss(points) {
  const c = $("loss"), ctx = c.getContext("2d"); ctx.clearRect(0, 0, c.width, c.height);
  if (points.length < 2) return;
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) || 1, y1 = Math.max(...ys) || 1;
  const lo = Math.min(...ys), y0 = lo - Math.max(0.25 * Math.abs(lo), 1e-12);  // losses may be < 0
  ctx.strokeStyle = "#4fb3ff"; ctx.beginPath();
  points.forEach((p, i) => {
    const x = 4 + (c.width - 8) * (p[0] - x0) / ((x1 - x0) || 1);
    const y = c.height - 4 - (c.height - 20) * (ys[i] - y0) / (y1 - y0);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  const last = points[points.length - 1];
  ctx.fillStyle = "#8a93a0";
  ctx.fillText(`loss per frame ${fmt(last[1])}` + (last[2] ? ` (${last[2]} frames)` : "") + ` · axis ${fmt(y0)} … ${fmt(y1)}`, 6, 12);
}

async function renderScan(images) {
  const s = scans.get(selected); if (!s) return;
  $("detail").hidden = false;
  $("scan-title").textContent = selected;
  $("scan-state").textContent = s.info.state; $("scan-state").className = "pill " + s.info.state;
  $("scan-reason").textContent = s.info.reason || "";
  const m = s.metrics || {}, expected = (s.info.summary || {}).expected_frames;
  $("st-frames").textContent = `${m.frames_received ?? "–"} / ${expected ?? "?"} (used ${m.frames_used ?? "–"})`;
  $("st-iter").textContent = m.iteration ?? (s.preview ? s.preview.iteration : "–");
  $("st-loss").textContent = fmt(m.loss);
  const ended = ["finished", "failed", "aborted", "rejected"].includes(s.info.state);
  $("st-res").textContent = m.resolution_m ? (m.resolution_m * 1e10).toFixed(1) + " Å"
    : (m.resolution_note || (ended ? "no estimate" : "pending"));
  $("st-lat").textContent = m.latency_s ? (m.latency_s * 1e3).toFixed(0) + " ms" : "–";
  $("st-drop").textContent = m.frames_dropped ?? "–";
  renderLoss(s.loss);
  const files = s.info.files || [];
  $("files").hidden = !files.length;
  $("files").querySelector("ul").innerHTML = files.map(k =>
    `<li><a href="files/${encodeURIComponent(selected)}/${encodeURIComponent(k)}${q}">${k}</a></li>`).join("");
  if (!images || !s.preview) return;
  const p = s.preview, channel = document.querySelector("input[name=channel]:checked").value;
  const img = channel === "amplitude" && p.amplitude ? p.amplitude : p.phase;
  const fixed = $("scale-mode").value === "fixed" && channel === "phase";
  const range = fixed ? [parseFloat($("scale-lo").value), parseFloat($("scale-hi").value)] : null;
  await draw($("object"), img, channel === "phase" ? viridis : (t) => [t * 255, t * 255, t * 255], range);
  $("range").textContent = `${channel} ${fmt((range || img.range)[0])} … ${fmt((range || img.range)[1])}${channel === "phase" ? " rad" : ""}` +
    (p.final ? " · final result" : ` · iteration ${p.iteration}`);
  drawCoverage($("overlay"), p.coverage, $("coverage").checked);
  await draw($("probe-amp"), p.probe_amplitude, (t) => [t * 255, t * 255, t * 255]);
  await draw($("probe-phase"), p.probe_phase, hsv);
  scaleBar(p);
  // publish → drawn times of the last previews, read by `cryoptycho bench view` and the tests
  drawLog.push({ scan_id: selected, iteration: p.iteration, published_s: p.published_s, drawn_s: Date.now() / 1000 });
  if (drawLog.length > 1000) drawLog.shift();
}

function entry(id) {
  if (!scans.has(id)) scans.set(id, { info: { scan_id: id, state: "announced" }, metrics: null, preview: null, loss: [] });
  if (selected === null) selected = id;
  return scans.get(id);
}

function handle(msg) {
  if (msg.kind === "hello") { $("control").textContent = msg.control === "ok" ? "" : msg.control; return; }
  if (msg.kind === "error") { $("error").textContent = `error: ${msg.field} (${msg.rule}): ${msg.message}`; return; }
  const s = entry(msg.scan_id);
  if (msg.kind === "scan") { s.info = msg; renderList(); }
  else if (msg.kind === "metrics") {
    s.metrics = msg;
    if (msg.loss_history) s.loss = msg.loss_history.slice();
    else if (msg.loss_point && msg.loss_point.length) s.loss.push(msg.loss_point[0]);
    // metrics may be older than the scan's final event (snapshots replay them after it)
    const final = ["finished", "failed", "aborted", "rejected"].includes(s.info.state);
    if (msg.state && msg.state !== s.info.state && !final) { s.info.state = msg.state; renderList(); }
  } else if (msg.kind === "preview") { s.preview = msg; }
  if (msg.scan_id === selected) renderScan(msg.kind === "preview");
}

function connect() {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + location.pathname.replace(/\/$/, "") + "/ws" + q);
  ws.onopen = () => { $("conn").textContent = "live"; $("conn").className = "pill on"; };
  ws.onmessage = (ev) => handle(JSON.parse(ev.data));
  ws.onclose = () => { $("conn").textContent = "disconnected — retrying"; $("conn").className = "pill off"; setTimeout(connect, 2000); };
}

for (const el of document.querySelectorAll("input[name=channel], #coverage, #scale-mode, #scale-lo, #scale-hi"))
  el.addEventListener("change", () => renderScan(true));
connect();
