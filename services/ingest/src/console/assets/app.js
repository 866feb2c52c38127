// stampede admin console: plain JavaScript, no dependencies. Each page reads
// the console's JSON endpoints (the AdminService's messages) and acts through
// them with the session's CSRF token. Charts are drawn on <canvas> here.
"use strict";

const state = { csrf: "", page: "", points: [], lastT: 0, hosts: [], sort: { key: "pending", desc: true }, timer: null, dlq: [] };

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
};

async function api(path, body) {
  const opts = body === undefined
    ? { headers: { "accept": "application/json" } }
    : { method: "POST", headers: { "content-type": "application/json", "x-csrf-token": state.csrf }, body: JSON.stringify(body) };
  const r = await fetch("/api" + path, opts);
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401) { location.reload(); throw new Error("session ended"); }
  if (!r.ok) throw new Error((data && data.error) || ("HTTP " + r.status));
  return data;
}

function notice(text, bad) {
  const n = $("#notice");
  n.textContent = text;
  n.className = bad ? "bad" : "good";
  n.hidden = false;
  clearTimeout(notice.t);
  notice.t = setTimeout(() => { n.hidden = true; }, 6000);
}

async function act(what, path, body) {
  try {
    const r = await api(path, body);
    notice(what + ": done" + summary(r));
    await refresh();
    return r;
  } catch (e) {
    notice(what + ": " + e.message, true);
    return null;
  }
}

function summary(r) {
  if (!r) return "";
  for (const k of ["replayed", "purged", "removed", "paused"]) if (k in r) return " (" + k + " " + r[k] + ")";
  return "";
}

const fmtTime = (ms) => ms ? new Date(ms).toLocaleTimeString() : "";
const fmtAge = (s) => s >= 3600 ? (s / 3600).toFixed(1) + " h" : s >= 60 ? Math.round(s / 60) + " min" : Math.round(s) + " s";

// ---- charts -------------------------------------------------------------

const COLORS = ["#2b7bb9", "#d9534f", "#5cb85c", "#f0ad4e", "#8e44ad", "#16a085", "#e67e22", "#c0392b", "#1abc9c", "#9b59b6", "#d35400", "#2c3e50", "#34495e", "#7f8c8d", "#95a5a6"];
const WINDOW_MS = 15 * 60 * 1000;

function drawChart(id, series, opts) {
  const c = document.getElementById(id);
  const ctx = c.getContext("2d");
  const W = c.width, H = c.height, L = 48, R = 8, T = 8, B = 22;
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  const now = state.points.length ? state.points[state.points.length - 1].t : Date.now();
  const t0 = now - WINDOW_MS;
  let max = opts && opts.max ? opts.max : 0;
  for (const s of series) for (const [, v] of s.data) if (v != null && v > max) max = v;
  if (!(opts && opts.max)) max = niceMax(max);
  const x = (t) => L + (W - L - R) * (t - t0) / WINDOW_MS;
  const y = (v) => H - B - (H - B - T) * (v / max);
  ctx.strokeStyle = "#e3e3e3"; ctx.fillStyle = "#666"; ctx.font = "11px sans-serif"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = max * i / 4, yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(L, yy); ctx.lineTo(W - R, yy); ctx.stroke();
    ctx.fillText(fmtNum(v, opts), 2, yy + 4);
  }
  for (let m = 0; m <= 15; m += 5) {
    const xx = Math.round(x(t0 + m * 60000)) + 0.5;
    ctx.fillText(m === 15 ? "now" : "-" + (15 - m) + " min", Math.min(xx - 12, W - R - 26), H - 6);
  }
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color || COLORS[i % COLORS.length]; ctx.lineWidth = 1.6; ctx.beginPath();
    let pen = false;
    for (const [t, v] of s.data) {
      if (v == null || t < t0) { pen = false; continue; }
      if (pen) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      pen = true;
    }
    ctx.stroke();
  });
  c.dataset.points = String(state.points.length);
  c.dataset.last = String(now);
  c.dataset.series = String(series.length);
  const legend = document.getElementById(id.replace("chart-", "legend-"));
  if (legend) {
    legend.replaceChildren(...series.map((s, i) => {
      const last = [...s.data].reverse().find(([, v]) => v != null);
      return el("span", { class: "key" }, el("i", {}), s.name + (last ? " " + fmtNum(last[1], opts) : ""));
    }));
    legend.querySelectorAll("i").forEach((iel, i) => { iel.style.background = series[i].color || COLORS[i % COLORS.length]; });
  }
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function fmtNum(v, opts) {
  if (opts && opts.percent) return Math.round(v * 100) + " %";
  if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k";
  if (v >= 10 || v === 0) return String(Math.round(v));
  return v >= 1 ? v.toFixed(1) : String(Number(v.toFixed(2)));
}

function seriesBy(pick) {
  const names = new Set();
  for (const p of state.points) for (const k of Object.keys(pick(p) || {})) names.add(k);
  return [...names].sort().map((name) => ({ name, data: state.points.map((p) => { const m = pick(p); return [p.t, m ? (m[name] ?? 0) : null]; }) }));
}

function drawOverview() {
  const deliveries = seriesBy((p) => p.deliveries).filter((s) => s.data.some(([, v]) => v > 0));
  drawChart("chart-deliveries", deliveries.length ? deliveries : [{ name: "no deliveries", data: state.points.map((p) => [p.t, 0]) }]);
  const withQueues = (f) => (p) => Object.keys(p.queues).length ? f(p) : null;
  drawChart("chart-depth", seriesBy(withQueues((p) => Object.fromEntries(Object.entries(p.queues).map(([k, q]) => [k, q.depth])))));
  drawChart("chart-age", seriesBy(withQueues((p) => Object.fromEntries(Object.entries(p.queues).filter(([, q]) => q.head_age_secs != null).map(([k, q]) => [k, q.head_age_secs])))));
  drawChart("chart-inbound", seriesBy((p) => p.inbound));
  drawChart("chart-keycache", [{ name: "hit ratio", data: state.points.map((p) => [p.t, p.key_cache_hit_ratio]) }], { max: 1, percent: true });
}

// ---- pages --------------------------------------------------------------

const pages = {
  async overview() {
    // Status counts the stored records: read every 15 s, not every 3.
    const fresh = state.status && Date.now() - state.statusAt < 15000;
    const [o, s] = await Promise.all([api("/overview?since=" + state.lastT), fresh ? state.status : api("/status")]);
    if (!fresh) { state.status = s; state.statusAt = Date.now(); }
    if (o.points.length) {
      state.points = state.points.concat(o.points).filter((p) => p.t > o.points[o.points.length - 1].t - WINDOW_MS);
      state.lastT = state.points[state.points.length - 1].t;
    }
    drawOverview();
    const cards = [
      ["activities", s.activities], ["delivered", s.delivered], ["dead letters", s.dead_letters],
      ["paused hosts", s.paused_hosts.length], ["failing hosts", s.failing_hosts.length],
      ["queued", s.queues.reduce((a, q) => a + q.messages, 0)],
    ];
    $("#totals").replaceChildren(...cards.map(([k, v]) => el("div", { class: "card" }, el("b", {}, v), el("span", {}, k))));
    $("#queues tbody").replaceChildren(...s.queues.map((q) => el("tr", {}, el("td", {}, q.queue), el("td", {}, q.class), el("td", { class: "num" }, q.messages), el("td", { class: "num" }, q.consumers), el("td", { class: "num" }, q.class ? fmtAge(q.head_age_ms / 1000) : ""))));
    $("#failing tbody").replaceChildren(...(s.failing_hosts.length ? s.failing_hosts.map((h) => el("tr", {}, el("td", {}, h.host), el("td", { class: "num" }, h.failures), el("td", {}, fmtTime(h.failing_since_unix_ms)),
      el("td", {}, el("span", { class: "tag " + (h.unavailable ? "unavailable" : h.circuit_open_until_unix_ms > Date.now() ? "open" : "closed") }, h.unavailable ? "unavailable" : h.circuit_open_until_unix_ms > Date.now() ? "open until " + fmtTime(h.circuit_open_until_unix_ms) : "closed")))) : [el("tr", {}, el("td", { colSpan: 4, class: "muted" }, "none"))]));
    $("#parked tbody").replaceChildren(...(s.parked.length ? s.parked.map((p) => el("tr", {}, el("td", {}, p.reason), el("td", { class: "num" }, p.deliveries), el("td", {}, fmtTime(p.next_due_unix_ms)))) : [el("tr", {}, el("td", { colSpan: 3, class: "muted" }, "nothing parked"))]));
  },

  async hosts() {
    const limit = $("#hosts-limit").value;
    const [h, s] = await Promise.all([api("/hosts?sort=pending&limit=" + limit), api("/status")]);
    state.hosts = h.hosts;
    renderHosts();
    $("#paused-hosts").replaceChildren(...(s.paused_hosts.length ? s.paused_hosts.map((host) => el("li", {}, host + " ", button("Resume", () => act("resume " + host, "/hosts/resume", { host }), "resume-" + host))) : [el("li", { class: "muted" }, "none")]));
  },

  async activities() {
    const r = await api("/activities");
    $("#activities tbody").replaceChildren(...(r.activities.length ? r.activities.map((a) => {
      const c = a.counts || {};
      const link = el("a", { href: "#activities", class: "activity-link" }, a.activity_id);
      link.addEventListener("click", (e) => { e.preventDefault(); showActivity(a.activity_id); });
      return el("tr", {}, el("td", {}, link, el("div", { class: "muted" }, a.kind + " by " + a.actor)), el("td", {}, fmtTime(a.published_unix_ms)), el("td", {}, progress(c)),
        el("td", { class: "num" }, c.total || 0), el("td", { class: "num" }, c.delivered || 0), el("td", { class: "num" }, c.pending || 0), el("td", { class: "num" }, c.retrying || 0), el("td", { class: "num" }, c.dead_lettered || 0));
    }) : [el("tr", {}, el("td", { colSpan: 8, class: "muted" }, "no publishes through this console's ingest yet"))]));
    if (state.activity) await showActivity(state.activity, true);
  },

  async "dead-letters"() {
    const q = new URLSearchParams({ host: $("#dlq-host").value.trim(), reason: $("#dlq-reason").value.trim(), limit: "500" });
    const r = await api("/dead-letters?" + q);
    state.dlq = r.dead_letters;
    $("#dead-letters tbody").replaceChildren(...(r.dead_letters.length ? r.dead_letters.map((d) => el("tr", { "data-id": d.id },
      el("td", {}, d.id), el("td", {}, d.host), el("td", { class: "wrap" }, d.inbox), el("td", { class: "wrap" }, d.activity_id), el("td", {}, d.reason),
      el("td", { class: "num" }, d.last_status || ""), el("td", { class: "num" }, d.attempts), el("td", {}, fmtTime(d.last_attempt_unix_ms)),
      el("td", {}, button("Replay", () => act("replay " + d.id, "/dead-letters/replay", { id: d.id }), "replay-" + d.id)))) : [el("tr", {}, el("td", { colSpan: 9, class: "muted" }, "no dead letters"))]));
  },

  async domains() {
    const r = await api("/domains");
    $("#domain-mode").textContent = "mode: " + r.mode;
    $("#domains tbody").replaceChildren(...(r.policies.length ? r.policies.map((p) => el("tr", { "data-domain": p.domain },
      el("td", {}, p.domain), el("td", {}, el("span", { class: "tag " + p.policy }, p.policy)), el("td", {}, p.reason), el("td", {}, fmtTime(p.updated_unix_ms)),
      el("td", {}, button("Remove", () => act("remove " + p.domain, "/domains/remove", { domain: p.domain }), "remove-" + p.domain)))) : [el("tr", {}, el("td", { colSpan: 5, class: "muted" }, "no rules"))]));
  },
};

function button(label, onClick, id, cls) {
  const b = el("button", { type: "button", class: cls || "" }, label);
  if (id) b.dataset.id = id;
  b.addEventListener("click", onClick);
  return b;
}

function progress(c) {
  const total = c.total || 0;
  const bar = el("div", { class: "progress", title: JSON.stringify(c) });
  if (total > 0) {
    for (const [k, cls] of [["delivered", "ok"], ["retrying", "warn"], ["dead_lettered", "bad"], ["pending", "wait"]]) {
      const w = 100 * (c[k] || 0) / total;
      if (w > 0) { const s = el("span", { class: cls }); s.style.width = w + "%"; bar.append(s); }
    }
  }
  return bar;
}

async function showActivity(id, quiet) {
  state.activity = id;
  try {
    const d = await api("/activities/delivery?per_host=true&activity_id=" + encodeURIComponent(id));
    $("#activity-detail").hidden = false;
    $("#activity-title").textContent = d.activity_id + (d.fanned_out ? "" : " (fanning out)");
    $("#activity-hosts tbody").replaceChildren(...d.hosts.map((h) => {
      const c = h.counts || {};
      const skipped = (c.skipped_policy || 0) + (c.skipped_unavailable || 0) + (c.skipped_other || 0) + (c.superseded || 0);
      return el("tr", {}, el("td", {}, h.host), el("td", {}, progress(c)), el("td", { class: "num" }, c.total || 0), el("td", { class: "num" }, c.delivered || 0),
        el("td", { class: "num" }, c.pending || 0), el("td", { class: "num" }, c.retrying || 0), el("td", { class: "num" }, c.dead_lettered || 0), el("td", { class: "num" }, skipped));
    }));
  } catch (e) {
    if (!quiet) notice(e.message, true);
  }
}

function renderHosts() {
  const { key, desc } = state.sort;
  const rows = [...state.hosts].sort((a, b) => {
    const va = a[key], vb = b[key];
    const c = typeof va === "number" ? va - vb : String(va).localeCompare(String(vb));
    return desc ? -c : c;
  });
  document.querySelectorAll("#hosts th[data-key]").forEach((th) => { th.className = (th.className.replace(/ ?sorted-(asc|desc)/, "")) + (th.dataset.key === key ? " sorted-" + (desc ? "desc" : "asc") : ""); });
  $("#hosts tbody").replaceChildren(...(rows.length ? rows.map((h) => el("tr", { "data-host": h.host },
    el("td", {}, h.host), el("td", { class: "num" }, h.pending), el("td", { class: "num" }, h.pending ? fmtAge(h.pending_age_secs) : ""),
    el("td", { class: "num" }, h.in_flight), el("td", { class: "num" }, h.limit), el("td", {}, el("span", { class: "tag " + h.circuit }, h.circuit)),
    el("td", { class: "num" }, h.failures), el("td", { class: "num" }, h.last_status || ""), el("td", {}, h.policy ? el("span", { class: "tag " + h.policy }, h.policy) : ""),
    el("td", { class: "actions" },
      h.circuit === "paused"
        ? button("Resume", () => act("resume " + h.host, "/hosts/resume", { host: h.host }), "resume-" + h.host)
        : button("Pause", () => act("pause " + h.host, "/hosts/pause", { host: h.host }), "pause-" + h.host),
      button("Silence", () => act("silence " + domainOf(h.host), "/domains", { domain: domainOf(h.host), policy: "silence", reason: "from the console" }), "silence-" + h.host),
      button("Suspend", () => { if (confirmOk("Suspend " + domainOf(h.host) + "? Its follows are removed.")) act("suspend " + domainOf(h.host), "/domains", { domain: domainOf(h.host), policy: "suspend", reason: "from the console" }); }, "suspend-" + h.host, "danger"),
    ))) : [el("tr", {}, el("td", { colSpan: 10, class: "muted" }, "no hosts with deliveries"))]));
}

const domainOf = (host) => host.replace(/:\d+$/, "");
// A confirmation a test can answer: window.confirm unless the page says yes.
const confirmOk = (text) => document.body.dataset.confirm === "yes" || window.confirm(text);

async function refresh() {
  const fn = pages[state.page];
  if (!fn) return;
  try {
    await fn();
    $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = state.page;
  } catch (e) {
    $("#updated").textContent = "not updated: " + e.message;
  }
}

function show() {
  const page = (location.hash || "#overview").slice(1);
  state.page = pages[page] ? page : "overview";
  document.querySelectorAll(".page").forEach((s) => { s.hidden = s.id !== "page-" + state.page; });
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === state.page));
  delete document.body.dataset.loaded;
  clearInterval(state.timer);
  refresh();
  state.timer = setInterval(refresh, state.page === "overview" ? 3000 : 5000);
}

async function start() {
  const s = await api("/session");
  state.csrf = s.csrf;
  const logout = $("#logout");
  logout.hidden = !s.login;
  logout.addEventListener("click", async () => {
    await fetch("/logout", { method: "POST", headers: { "x-csrf-token": state.csrf } });
    location.href = "/";
  });
  document.querySelectorAll("#hosts th[data-key]").forEach((th) => th.addEventListener("click", () => {
    const key = th.dataset.key;
    state.sort = { key, desc: state.sort.key === key ? !state.sort.desc : true };
    renderHosts();
  }));
  $("#hosts-limit").addEventListener("change", refresh);
  $("#host-form").addEventListener("submit", (e) => { e.preventDefault(); const host = $("#host-name").value.trim(); if (host) act("pause " + host, "/hosts/pause", { host }); });
  $("#host-form-resume").addEventListener("click", () => { const host = $("#host-name").value.trim(); if (host) act("resume " + host, "/hosts/resume", { host }); });
  $("#activity-form").addEventListener("submit", (e) => { e.preventDefault(); const id = $("#activity-id").value.trim(); if (id) showActivity(id); });
  $("#dlq-filter").addEventListener("submit", (e) => { e.preventDefault(); refresh(); });
  const dlqHost = () => $("#dlq-host").value.trim();
  $("#dlq-replay-host").addEventListener("click", () => { if (dlqHost()) act("replay " + dlqHost(), "/dead-letters/replay", { host: dlqHost() }); else notice("give a host to replay", true); });
  $("#dlq-purge-host").addEventListener("click", () => { if (!dlqHost()) notice("give a host to purge", true); else if (confirmOk("Delete the dead letters of " + dlqHost() + " for good?")) act("purge " + dlqHost(), "/dead-letters/purge", { host: dlqHost() }); });
  $("#dlq-replay-all").addEventListener("click", () => { if (confirmOk("Replay every dead letter?")) act("replay all", "/dead-letters/replay", { all: true }); });
  $("#dlq-purge-all").addEventListener("click", () => { if (confirmOk("Delete every dead letter for good?")) act("purge all", "/dead-letters/purge", { all: true }); });
  $("#domain-form").addEventListener("submit", (e) => {
    e.preventDefault();
    act($("#domain-policy").value + " " + $("#domain-name").value.trim(), "/domains", { domain: $("#domain-name").value.trim(), policy: $("#domain-policy").value, reason: $("#domain-reason").value.trim() });
  });
  window.addEventListener("hashchange", show);
  show();
}

start().catch((e) => notice("console: " + e.message, true));
