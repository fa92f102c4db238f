// Overview: agent counts, events per second, riskiest processes, alert feed, hub health.
import {
  $, Live, alertTitle, api, appendPoint, applyAgentPush, fmtAgo, fmtExplanation, fmtNum, riskPart, severityPart, fmtTime, syncList,
  timeChart, seg,
} from "./hub.js";

const TOP_ROWS = 25;
const ALERT_ROWS = 50;
const AGENT_ROWS = 200;
const MAX_SCORES = 2000; // live processes kept in memory; pruned to the riskiest half past this
const RATE_POINTS = 120; // two minutes of one-second stats

const state = {
  agents: new Map(),
  scores: new Map(), // process_key -> score, live and risky processes only
  byAgent: new Map(), // agent_id -> Map(process_key -> score), the same scores per agent
  riskFrom: new Map(), // agent_id -> process_key of the score its risk comes from, when known
  alerts: [],
  counts: null,
  rate: [[], []],
  stats: null,
  health: null,
};
const dirty = { agents: true, scores: true, alerts: true, stats: true };
const filter = $("agent-filter");
const chart = timeChart($("events-chart"), [{ label: "events/s", stroke: "#58a6ff" }], { height: 60, sparkline: true });

const live = new Live()
  .on("snapshot", (d) => {
    state.agents = new Map(d.agents.map((a) => [a.agent_id, a]));
    keepScores(d.scores.filter(isLive));
    state.riskFrom = new Map();
    for (const [agentId, scores] of state.byAgent) {
      const riskiest = riskiestOf(scores);
      if (riskiest && riskiest.risk_score >= (state.agents.get(agentId)?.risk ?? 0)) {
        state.riskFrom.set(agentId, riskiest.process_key);
      }
    }
    state.alerts = d.alerts.slice(0, ALERT_ROWS);
    state.counts = d.agent_counts;
    markAll();
  })
  .on("agent", (d) => {
    state.agents.set(d.agent_id, applyAgentPush(state.agents.get(d.agent_id), d));
    dirty.agents = true;
  })
  .on("score", (d) => {
    putScore(d);
    updateAgentRisk(d);
    dirty.scores = true;
  })
  .on("alert", (d) => {
    const at = state.alerts.findIndex((a) => a.id === d.id);
    if (at >= 0) state.alerts[at] = d;
    else if (d.status === "open") state.alerts.unshift(d); // a change to an alert not shown is not news
    else return;
    state.alerts.length = Math.min(state.alerts.length, ALERT_ROWS);
    dirty.alerts = true;
  })
  .on("stats", (d) => {
    state.stats = d;
    if (d.agents) {
      state.counts = d.agents;
      dirty.agents = true;
    }
    appendPoint(state.rate, [d.ts, d.events_per_s], RATE_POINTS);
    dirty.stats = true;
  })
  .draw(draw)
  .resynced(loadHealth);

function markAll() {
  dirty.agents = dirty.scores = dirty.alerts = dirty.stats = true;
}

const isLive = (score) => !score.exited && score.risk_score > 0;

/** Hold exactly `scores` (live ones), by process and by agent. */
function keepScores(scores) {
  state.scores = new Map();
  state.byAgent = new Map();
  for (const score of scores) putScore(score);
}

/** Hold a live score, forget an exited or riskless one; past MAX_SCORES keep the riskiest half. */
function putScore(score) {
  const mine = state.byAgent.get(score.agent_id) ?? new Map();
  state.byAgent.set(score.agent_id, mine);
  if (isLive(score)) {
    state.scores.set(score.process_key, score);
    mine.set(score.process_key, score);
  } else {
    state.scores.delete(score.process_key);
    mine.delete(score.process_key);
    if (!mine.size) state.byAgent.delete(score.agent_id);
  }
  if (state.scores.size > MAX_SCORES) keepScores([...state.scores.values()].sort(byRisk).slice(0, MAX_SCORES / 2));
}

function riskiestOf(scores) {
  let riskiest = null;
  for (const score of scores?.values() ?? []) if (!riskiest || score.risk_score > riskiest.risk_score) riskiest = score;
  return riskiest;
}

/** An agent's risk is its riskiest live process: follow `score` up, and down when it was that process. */
function updateAgentRisk(score) {
  const agent = state.agents.get(score.agent_id);
  if (!agent) return;
  const from = state.riskFrom.get(score.agent_id);
  let risk = agent.risk ?? 0;
  if (isLive(score) && score.risk_score >= risk) {
    risk = score.risk_score;
    state.riskFrom.set(score.agent_id, score.process_key);
  } else if (score.process_key === from) {
    const riskiest = riskiestOf(state.byAgent.get(score.agent_id));
    risk = riskiest?.risk_score ?? 0;
    if (riskiest) state.riskFrom.set(score.agent_id, riskiest.process_key);
    else state.riskFrom.delete(score.agent_id);
  }
  if (risk !== (agent.risk ?? 0)) {
    state.agents.set(score.agent_id, { ...agent, risk });
    dirty.agents = true;
  }
}

function byRisk(a, b) {
  return b.risk_score - a.risk_score || a.process_key.localeCompare(b.process_key);
}

const STATUS_ORDER = { offline: 0, late: 1, online: 2 };

function byAttention(a, b) {
  return (STATUS_ORDER[a.status] ?? 3) - (STATUS_ORDER[b.status] ?? 3)
    || (b.risk ?? 0) - (a.risk ?? 0)
    || a.agent_id.localeCompare(b.agent_id);
}

function draw() {
  if (dirty.agents) drawAgents();
  if (dirty.scores) drawScores();
  if (dirty.alerts) drawAlerts();
  if (dirty.stats) drawHealth();
}

/** Agents per status: counted here while the page holds them all, else the hub's counts (each second). */
function agentCounts() {
  const hub = state.counts ?? { online: 0, late: 0, offline: 0 };
  if (hub.online + hub.late + hub.offline > state.agents.size) return hub;
  const counts = { online: 0, late: 0, offline: 0 };
  for (const agent of state.agents.values()) counts[agent.status] = (counts[agent.status] ?? 0) + 1;
  return counts;
}

function drawAgents() {
  dirty.agents = false;
  const counts = agentCounts();
  $("agents-online").textContent = counts.online;
  $("agents-late").textContent = counts.late;
  $("agents-offline").textContent = counts.offline;
  const needle = filter.value.trim().toLowerCase();
  const matching = [...state.agents.values()].filter(
    (a) => !needle || a.agent_id.toLowerCase().includes(needle) || (a.hostname ?? "").toLowerCase().includes(needle),
  );
  const shown = matching.sort(byAttention).slice(0, AGENT_ROWS);
  $("agents-shown").textContent = shown.length < matching.length ? `${shown.length} of ${matching.length} shown` : "";
  syncList($("agents").tBodies[0], shown, {
    key: (a) => a.agent_id,
    attr: "agentId",
    parts: (a) => [
      { text: a.agent_id, href: "/agents/" + seg(a.agent_id) },
      { text: a.status, cls: "status", badge: "st-" + a.status },
      a.status_reason ?? "",
      a.hostname ?? "",
      riskPart(a.risk ?? 0),
      { text: fmtNum(a.heartbeat?.cpu_percent, 0), cls: "num" },
      { text: fmtNum(a.heartbeat?.mem_percent, 0), cls: "num" },
      { text: fmtNum(a.heartbeat?.spool_depth, 0), cls: "num" },
      fmtAgo(a.last_seen),
    ],
  });
}

function drawScores() {
  dirty.scores = false;
  const top = [...state.scores.values()].sort(byRisk).slice(0, TOP_ROWS);
  syncList($("top-processes").tBodies[0], top, {
    key: (s) => s.process_key,
    attr: "processKey",
    parts: (s) => [
      { text: s.process_id, href: "/agents/" + seg(s.agent_id) + "?process=" + seg(s.process_key) },
      s.agent_id,
      { text: s.exe ?? "", cls: "mono" },
      riskPart(s.risk_score),
      { text: fmtExplanation(s.explanation), cls: "why" },
    ],
  });
}

function drawAlerts() {
  dirty.alerts = false;
  syncList($("alert-feed"), state.alerts, {
    key: (a) => a.id,
    attr: "alertId",
    tag: "li",
    partTag: "span",
    cls: (a) => "alert-" + a.status,
    parts: (a) => [
      { text: fmtTime(a.ts), cls: "time" },
      severityPart(a.severity),
      { text: alertTitle(a), cls: "title" },
      { text: (a.mitre ?? []).join(", "), cls: "mitre" },
      { text: a.agent_id, href: "/agents/" + seg(a.agent_id) },
      { text: a.status, cls: "alert-status" },
    ],
  });
}

function drawHealth() {
  dirty.stats = false;
  const stats = state.stats;
  const fresh = stats && Date.now() / 1000 - stats.ts < 5;
  const database = stats?.database ?? state.health?.database ?? "–";
  const status = fresh ? (database === "ok" ? "ok" : "database unavailable")
    : stats ? "no recent stats" : state.health?.status ?? "–";
  const el = $("health");
  el.className = "facts " + (status === "ok" ? "health-ok" : "health-bad");
  el.querySelector(".health-status").textContent = status;
  el.querySelector(".health-database").textContent = database;
  el.querySelector(".health-backlog").textContent = fmtNum(stats?.scoring_backlog);
  el.querySelector(".health-accepted").textContent = fmtNum(stats?.events_accepted);
  $("events-rate").textContent = fmtNum(stats?.events_per_s, 0);
  chart.set(state.rate);
}

async function loadHealth() {
  try {
    state.health = await api("/api/v1/health");
  } catch (err) {
    state.health = { status: "unavailable", database: err.status === 503 ? "unavailable" : "–" };
  }
  dirty.stats = true;
  draw();
}

filter.addEventListener("input", () => {
  dirty.agents = true;
  draw();
});
// "Last seen" ages and stale stats show without any push.
setInterval(() => {
  dirty.agents = dirty.stats = true;
  draw();
}, 5000);
loadHealth();
live.start();
