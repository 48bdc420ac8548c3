// The fedge dashboard: hash-routed views over the coordinator's admin JSON endpoints.
// The admin token lives in sessionStorage (this tab only) and goes out as a Bearer header;
// a 401 from any endpoint clears it and shows the sign-in form again. Views poll every
// POLL_MS and update their tables and Chart.js charts in place.

const TOKEN_KEY = "fedge-admin-token";
const POLL_MS = Number(new URLSearchParams(location.search).get("poll_ms")) || 2000;
const API = "/v1/admin/dashboard";
const COLORS = {
  reported: "#16a34a", aborted: "#ea580c", dropped: "#9ca3af", late: "#a855f7",
  refused: "#dc2626", in_flight: "#60a5fa", loss: "#2563eb", accuracy: "#16a34a",
  eval_loss: "#f59e0b", bytes: "#2563eb", fp32: "#cbd5e1", duration: "#0891b2",
  staleness: "#7c3aed", funnel: "#2563eb", rate: "#2563eb",
  clip_bound: "#dc2626", norm_median: "#2563eb", norm_max: "#f59e0b", clipped: "#fca5a5",
};

const $ = (sel) => document.querySelector(sel);
const charts = new Map(); // canvas id -> Chart, reused across polls of the same view
let timer = null;
let renderSeq = 0;
const rateSamples = []; // [time_s, total requests] for the request-rate chart

class Unauthorized extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new Unauthorized("no token");
  const resp = await fetch(path, { headers: { Authorization: `Bearer ${token}` } });
  if (resp.status === 401) throw new Unauthorized("token refused");
  const body = await resp.json();
  if (!resp.ok) throw new Error(body?.error?.message || `HTTP ${resp.status}`);
  return body;
}

// -- formatting ------------------------------------------------------------------------------

function esc(value) {
  return String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
function num(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString("en-US", {
    minimumFractionDigits: digits, maximumFractionDigits: digits,
  });
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function secs(s) { return s === null || s === undefined ? "–" : `${Number(s).toFixed(1)} s`; }
function ms(s) { return s === null || s === undefined ? "–" : `${(s * 1000).toFixed(1)} ms`; }
function state(s) { return `<span class="state ${esc(s)}">${esc(s)}</span>`; }
function card(label, value, field) {
  return `<div class="card"><div class="label">${esc(label)}</div>` +
    `<div class="value" data-field="${esc(field)}">${esc(value)}</div></div>`;
}
function table(id, head, rows) {
  const th = head.map(([label, cls]) => `<th class="${cls || ""}">${esc(label)}</th>`).join("");
  const body = rows.length ? rows.map((r) => `<tr>${r.map(([v, cls, raw]) =>
    `<td class="${cls || ""}">${raw ? v : esc(v)}</td>`).join("")}</tr>`).join("")
    : `<tr class="empty"><td colspan="${head.length}" class="note">none so far</td></tr>`;
  return `<table id="${id}"><thead><tr>${th}</tr></thead><tbody>${body}</tbody></table>`;
}
function panel(title, id, note = "") {
  return `<div class="panel"><h3>${esc(title)}</h3>` +
    (note ? `<p class="note">${esc(note)}</p>` : "") +
    `<div class="chart"><canvas id="${id}"></canvas></div></div>`;
}

// -- charts ----------------------------------------------------------------------------------

function chart(id, type, labels, datasets, options = {}) {
  const canvas = document.getElementById(id);
  if (!canvas) return;
  const existing = charts.get(id);
  if (existing && existing.canvas === canvas) {
    existing.data.labels = labels;
    existing.data.datasets = datasets;
    existing.update("none");
    return;
  }
  if (existing) existing.destroy();
  charts.set(id, new Chart(canvas, {
    type,
    data: { labels, datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      plugins: { legend: { position: "bottom" } },
      ...options,
    },
  }));
}
function dataset(label, data, color, extra = {}) {
  return { label, data, backgroundColor: color, borderColor: color, ...extra };
}

// -- views -----------------------------------------------------------------------------------

async function overviewView(seq) {
  const [ov, pop, svc] = await Promise.all([
    api(`${API}/overview`), api(`${API}/population`), api(`${API}/service`),
  ]);
  if (seq !== renderSeq) return;
  const head = [["Task"], ["ID"], ["Mode"], ["State"], ["Version", "num"], ["Rounds", "num"],
    ["Current round"]];
  if (ov.dp) head.push(["ε spent", "num"]);
  const rows = ov.tasks.map((t) => {
    const row = [
      [`<a href="#/task/${esc(t.task_id)}">${esc(t.name)}</a>`, "", true],
      [t.task_id], [t.mode], [state(t.state), "", true], [num(t.model_version), "num"],
      [`${num(t.rounds_completed)} / ${num(t.rounds_planned)}`, "num"],
      [t.current_round ? `${t.current_round.round} (${t.current_round.state})` : "–"],
    ];
    if (ov.dp) row.push([t.epsilon === null ? "–" : num(t.epsilon, 2), "num"]);
    return row;
  });
  crumbs([]);
  $("#view").innerHTML = `
    <h1>Overview</h1>
    <div class="cards">
      ${card("Tasks", num(ov.tasks.length), "tasks")}
      ${card("Devices registered", num(pop.devices_registered), "devices_registered")}
      ${card("Devices active", num(pop.devices_active), "devices_active")}
      ${card("Updates accepted", num(ov.updates_accepted), "updates_accepted")}
      ${card("Check-ins since start", num(pop.checkins.total), "checkins")}
    </div>
    <h2>Tasks</h2>
    ${ov.tasks.length ? table("tasks", head, rows) : '<p class="note">No tasks yet.</p>'}
    <h2>Population</h2>
    <div class="grid">
      ${panel("Device funnel (training assignments)", "c-funnel",
        "Each stage: devices that got that far; the tooltip says why the others left.")}
      ${panel("Check-ins since start, by outcome", "c-checkins",
        "train/evaluate: assigned; the rest: why the device was told to wait.")}
    </div>
    <div class="grid">
      <div class="panel"><h3>Why devices were ineligible (coordinator side)</h3>
        ${table("ineligible", [["Reason"], ["Check-ins", "num"]],
          Object.entries(pop.checkins.ineligible_reasons).map(([k, v]) => [[k], [num(v), "num"]]))}
      </div>
      <div class="panel"><h3>Runtimes and platforms</h3>
        ${table("runtimes", [["Runtime installed"], ["Devices", "num"]],
          Object.entries(pop.runtimes).map(([k, v]) => [[k], [num(v), "num"]]))}
        ${table("platforms", [["Platform"], ["Devices", "num"]],
          Object.entries(pop.platforms).map(([k, v]) => [[k], [num(v), "num"]]))}
        ${table("backends", [["Backend of a task's bundle"], ["Tasks", "num"]],
          Object.entries(pop.task_backends).map(([k, v]) => [[k], [num(v), "num"]]))}
      </div>
    </div>
    ${serviceHtml(svc)}`;
  funnelChart("c-funnel", pop.funnel);
  const outcomes = Object.entries(pop.checkins.outcomes).sort((a, b) => b[1] - a[1]);
  chart("c-checkins", "bar", outcomes.map(([k]) => k),
    [dataset("check-ins", outcomes.map(([, v]) => v), COLORS.funnel)],
    { indexAxis: "y", plugins: { legend: { display: false } } });
  serviceCharts(svc);
}

function serviceHtml(svc) {
  const rows = svc.requests.map((r) => [[r.route], [num(r.requests), "num"],
    [num(r.errors), "num"], [ms(r.mean_s), "num"], [r.p95_s === null ? "–" : `≤ ${ms(r.p95_s)}`, "num"]]);
  return `
    <h2>Service</h2>
    <div class="cards">
      ${card("Queue depth", num(svc.queue_depth), "queue_depth")}
      ${card("Open rounds", num(svc.open_rounds), "open_rounds")}
      ${card("Database", bytes(svc.db_bytes), "db_bytes")}
      ${card("Blobs", bytes(svc.blob_bytes), "blob_bytes")}
      ${card("Updates stored", num(svc.updates_accepted), "updates_stored")}
    </div>
    <div class="grid" style="margin-top:0.9rem">
      ${panel("Requests per second (all routes)", "c-rate", "Sampled by this page while it is open.")}
      <div class="panel"><h3>Requests since start, by route (latency: mean, p95 bucket)</h3>
        ${table("requests", [["Route"], ["Requests", "num"], ["Errors", "num"],
          ["Mean", "num"], ["p95", "num"]], rows)}
      </div>
    </div>`;
}

function serviceCharts(svc) {
  const total = svc.requests.reduce((s, r) => s + r.requests, 0);
  rateSamples.push([Date.now() / 1000, total]);
  while (rateSamples.length > 90) rateSamples.shift();
  const points = rateSamples.slice(1).map(([t, n], i) => {
    const [t0, n0] = rateSamples[i];
    // Counts since start: a lower total is a restart (or another replica answering), whose
    // requests all came after the last sample, as Prometheus's rate() reads a reset.
    const added = n >= n0 ? n - n0 : n;
    return { x: new Date(t * 1000).toLocaleTimeString("en-GB"), y: added / Math.max(t - t0, 1e-3) };
  });
  chart("c-rate", "line", points.map((p) => p.x),
    [dataset("requests/s", points.map((p) => p.y), COLORS.rate, { pointRadius: 0, tension: 0.2 })],
    { plugins: { legend: { display: false } } });
}

function funnelChart(id, funnel) {
  const stages = funnel.stages;
  chart(id, "bar", stages.map((s) => s.stage.replace("_", " ")),
    [dataset("devices", stages.map((s) => s.devices), COLORS.funnel)], {
      indexAxis: "y",
      plugins: {
        legend: { display: false },
        tooltip: { callbacks: { afterLabel: (ctx) => {
          const lost = stages[ctx.dataIndex].lost;
          return Object.entries(lost).map(([k, v]) => `left here: ${v} ${k}`);
        } } },
      },
    });
}

async function taskView(seq, taskId) {
  const d = await api(`${API}/tasks/${encodeURIComponent(taskId)}`);
  if (seq !== renderSeq) return;
  const t = d.task;
  const train = d.rounds.filter((r) => r.kind === "train");
  crumbs([[t.name, `#/task/${t.task_id}`]]);
  const rows = d.rounds.slice().reverse().map((r) => [
    [`<a href="#/task/${esc(t.task_id)}/round/${r.round}">${r.round}</a>`, "num", true],
    [r.kind], [state(r.state), "", true], [num(r.base_version), "num"],
    [num(r.selected), "num"], [num(r.reported), "num"], [num(r.aborted), "num"],
    [num(r.dropped), "num"], [num(r.late), "num"], [num(r.refused), "num"],
    [r.loss === null ? "–" : num(r.loss, 4), "num"], [bytes(r.bytes_in), "num"],
    [secs(r.duration_s), "num"],
  ]);
  const norms = d.norms === null
    ? `This task aggregates without robust defences: no update norms or clipping recorded` +
      (d.max_update_norm ? ` (updates above norm ${d.max_update_norm} are refused).` : ".")
    : "";
  $("#view").innerHTML = `
    <h1>${esc(t.name)} <span class="note">${esc(t.task_id)}</span></h1>
    <p class="note">Participants per round: reported; refused (the coordinator refused the
      update); aborted (the device gave up and said why); late (uploaded after the round
      closed); dropped (expired without a word: cut off when the goal was reached, or gone).</p>
    <div class="cards">
      ${card("State", t.state, "state")}
      ${card("Mode", t.mode, "mode")}
      ${card("Model version", num(t.model_version), "model_version")}
      ${card("Rounds", `${num(t.rounds_completed)} / ${num(t.rounds_planned)}`, "rounds")}
      ${card("Parameters", num(t.num_parameters), "num_parameters")}
      ${t.epsilon === null ? "" : card("ε spent", num(t.epsilon, 2), "epsilon")}
    </div>
    <div class="grid" style="margin-top:0.9rem">
      ${panel("Loss and accuracy per model version", "c-quality",
        "Training loss: mean over the devices that built the version; evaluation: federated evaluation of it.")}
      ${panel("Participants per round", "c-participants")}
      ${panel("Bytes uploaded per round vs float32", "c-bytes")}
      ${panel("Round duration", "c-duration")}
      ${t.mode === "async" ? panel("Staleness of accepted updates", "c-staleness") : ""}
      ${panel("Device funnel of this task", "c-task-funnel")}
      ${d.norms === null ? "" : panel("Update norms and clipping per round", "c-norms",
        "Median and largest L2 norm of the round's updates, the clipping bound they were held to, and how many were clipped.")}
    </div>
    <p class="note" id="norms">${esc(norms)}</p>
    <h2>Rounds</h2>
    ${d.rounds_total > d.rounds.length ? `<p class="note">The last ${d.rounds.length} of
      ${d.rounds_total} rounds; the funnel, staleness and versions count them all.</p>` : ""}
    ${table("rounds", [["Round", "num"], ["Kind"], ["State"], ["Base", "num"], ["Selected", "num"],
      ["Reported", "num"], ["Aborted", "num"], ["Dropped", "num"], ["Late", "num"],
      ["Refused", "num"], ["Loss", "num"], ["Uploaded", "num"], ["Duration", "num"]], rows)}`;
  const versions = d.versions;
  chart("c-quality", "line", versions.map((v) => `v${v.version}`), [
    dataset("training loss", versions.map((v) => v.train_loss ?? null), COLORS.loss,
      { yAxisID: "y", spanGaps: true }),
    dataset("evaluation loss", versions.map((v) => v.eval_loss ?? null), COLORS.eval_loss,
      { yAxisID: "y", spanGaps: true }),
    dataset("evaluation accuracy", versions.map((v) => v.eval_accuracy ?? null), COLORS.accuracy,
      { yAxisID: "y1", spanGaps: true }),
  ], { scales: { y: { title: { display: true, text: "loss" } },
    y1: { position: "right", min: 0, max: 1, grid: { drawOnChartArea: false },
      title: { display: true, text: "accuracy" } } } });
  const labels = d.rounds.map((r) => `${r.round}`);
  const stack = (key) => dataset(key.replace("_", " "), d.rounds.map((r) => r[key]), COLORS[key],
    { stack: "p" });
  chart("c-participants", "bar", labels,
    ["reported", "refused", "aborted", "late", "dropped", "in_flight"].map(stack),
    { scales: { x: { stacked: true, title: { display: true, text: "round" } }, y: { stacked: true } } });
  chart("c-bytes", "bar", train.map((r) => `${r.round}`), [
    dataset("uploaded", train.map((r) => r.bytes_in), COLORS.bytes),
    dataset("as float32", train.map((r) => r.fp32_bytes), COLORS.fp32),
  ], { scales: { x: { title: { display: true, text: "round" } },
    y: { ticks: { callback: (v) => bytes(v) } } } });
  chart("c-duration", "bar", labels,
    [dataset("seconds", d.rounds.map((r) => r.duration_s), COLORS.duration)],
    { plugins: { legend: { display: false } },
      scales: { x: { title: { display: true, text: "round" } },
        y: { title: { display: true, text: "seconds" } } } });
  if (t.mode === "async") {
    chart("c-staleness", "bar", d.staleness.map((s) => `${s.staleness}`),
      [dataset("updates", d.staleness.map((s) => s.updates), COLORS.staleness)],
      { plugins: { legend: { display: false } },
        scales: { x: { title: { display: true, text: "versions behind" } } } });
  }
  funnelChart("c-task-funnel", d.funnel);
  if (d.norms !== null) {
    const line = (key, label) => dataset(label, d.norms.map((n) => n[key]), COLORS[key],
      { type: "line", yAxisID: "y", spanGaps: true });
    chart("c-norms", "bar", d.norms.map((n) => `${n.round}`), [
      line("norm_median", "median norm"), line("norm_max", "largest norm"),
      line("clip_bound", "clipping bound"),
      dataset("clipped updates", d.norms.map((n) => n.clipped), COLORS.clipped, { yAxisID: "y1" }),
    ], { scales: { x: { title: { display: true, text: "round" } },
      y: { type: "logarithmic", title: { display: true, text: "L2 norm" } },
      y1: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false },
        title: { display: true, text: "clipped" } } } });
  }
}

async function roundView(seq, taskId, number) {
  const d = await api(`${API}/tasks/${encodeURIComponent(taskId)}/rounds/${encodeURIComponent(number)}`);
  if (seq !== renderSeq) return;
  const r = d.round;
  crumbs([[d.task.name, `#/task/${d.task.task_id}`], [`round ${r.round}`, location.hash]]);
  const rows = d.assignments.map((a) => [
    [a.device_id], [state(a.state), "", true],
    [a.abort_phase ? `${a.abort_phase}/${a.abort_code || "?"}` : (a.abort_reason || "")],
    [a.upload_refused || ""], [num(a.num_examples), "num"],
    [a.loss === null ? "–" : num(a.loss, 4), "num"], [bytes(a.bytes), "num"],
    [a.staleness === null ? "–" : num(a.staleness), "num"],
    [a.wall_time_s === null ? "–" : secs(a.wall_time_s), "num"],
  ]);
  $("#view").innerHTML = `
    <h1>${esc(d.task.name)}: round ${r.round} ${state(r.state)}</h1>
    <div class="cards">
      ${card("Kind", r.kind, "kind")}
      ${card("Base version", num(r.base_version), "base_version")}
      ${card("Goal / target", `${r.goal} / ${r.target}`, "goal")}
      ${card("Candidates", num(r.candidates), "candidates")}
      ${card("Selected", num(r.selected), "selected")}
      ${card("Reported", num(r.reported), "reported")}
      ${card("Aborted", num(r.aborted), "aborted")}
      ${card("Refused", num(r.refused), "refused")}
      ${card("Late", num(r.late), "late")}
      ${card("Dropped", num(r.dropped), "dropped")}
      ${card("Loss", r.loss === null ? "–" : num(r.loss, 4), "loss")}
      ${card("Uploaded", bytes(r.bytes_in), "bytes_in")}
      ${card("Duration", secs(r.duration_s), "duration_s")}
    </div>
    ${r.reason ? `<p class="error">Abandoned: ${esc(r.reason)}</p>` : ""}
    <h2>Participants</h2>
    ${table("assignments", [["Device"], ["State"], ["Abort (phase/code)"], ["Upload refused"],
      ["Examples", "num"], ["Loss", "num"], ["Uploaded", "num"], ["Staleness", "num"],
      ["Device time", "num"]], rows)}`;
}

// -- shell -----------------------------------------------------------------------------------

function crumbs(parts) {
  $("#crumbs").innerHTML = parts.map(([label, href]) =>
    `› <a href="${esc(href)}">${esc(label)}</a>`).join(" ");
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  if (parts[0] === "task" && parts[2] === "round") return (seq) => roundView(seq, parts[1], parts[3]);
  if (parts[0] === "task") return (seq) => taskView(seq, parts[1]);
  return (seq) => overviewView(seq);
}

function showLogin(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(TOKEN_KEY);
  $("#view").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#live").textContent = "not connected";
  $("#live").className = "live";
  const err = $("#login-error");
  err.hidden = !message;
  err.textContent = message || "";
}

async function refresh() {
  clearTimeout(timer);
  const seq = ++renderSeq;
  try {
    await route()(seq);
    if (seq !== renderSeq) return;
    $("#login").hidden = true;
    $("#view").hidden = false;
    $("#logout").hidden = false;
    $("#live").textContent = `live · updated ${new Date().toLocaleTimeString("en-GB")}`;
    $("#live").className = "live ok";
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (e) {
    if (e instanceof Unauthorized) {
      showLogin(e.message === "no token" ? "" : "The coordinator refused this token.");
      return;
    }
    $("#live").textContent = `update failed: ${e.message}`;
    $("#live").className = "live stale";
  }
  if (seq === renderSeq) timer = setTimeout(refresh, POLL_MS);
}

$("#login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
  $("#token").value = "";
  refresh();
});
$("#logout").addEventListener("click", () => showLogin(""));
window.addEventListener("hashchange", () => {
  for (const c of charts.values()) c.destroy();
  charts.clear();
  refresh();
});
refresh();
