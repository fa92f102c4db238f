// Live dashboard: snapshot, then score/alert/agent pushes over /ws/live.
"use strict";
const MAX_ROWS = 50;
const state = { agents: new Map(), scores: new Map(), alerts: [] };
let dirty = false;

function token() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) { sessionStorage.setItem("token", fromHash); history.replaceState(null, "", "/"); }
  return sessionStorage.getItem("token");
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (cls) td.className = cls;
  return td;
}

function riskClass(score) { return score >= 80 ? "risk-high" : score >= 50 ? "risk-mid" : ""; }

function render() {
  dirty = false;
  const agents = document.getElementById("agents");
  agents.replaceChildren(...[...state.agents.values()].slice(0, 500).map((a) => {
    const tr = document.createElement("tr");
    const hb = a.heartbeat || {};
    tr.append(cell(a.agent_id), cell(a.status, "badge " + a.status), cell(a.reason ?? a.status_reason),
              cell(hb.spool_depth), cell(hb.dropped));
    return tr;
  }));
  document.getElementById("agent-count").textContent =
    `${[...state.agents.values()].filter((a) => a.status !== "offline").length} online / ${state.agents.size}`;
  const top = [...state.scores.values()].filter((s) => !s.exited)
    .sort((a, b) => b.risk_score - a.risk_score).slice(0, MAX_ROWS);
  document.getElementById("scores").replaceChildren(...top.map((s) => {
    const tr = document.createElement("tr");
    const why = (s.explanation || []).map((c) => `${c.name} (+${c.contribution.toFixed(1)})`).join(", ");
    tr.append(cell(s.process_id), cell(s.exe), cell(s.risk_score.toFixed(1), riskClass(s.risk_score)), cell(why));
    return tr;
  }));
  document.getElementById("alerts").replaceChildren(...state.alerts.slice(0, MAX_ROWS).map((a) => {
    const li = document.createElement("li");
    li.className = "sev-" + a.severity;
    li.textContent = `${new Date(a.ts * 1000).toLocaleTimeString()} ${a.severity} ${a.title} [${(a.mitre || []).join(", ")}]`;
    return li;
  }));
}

function schedule() { if (!dirty) { dirty = true; requestAnimationFrame(render); } }

function apply(msg) {
  const d = msg.data;
  if (msg.type === "snapshot") {
    state.agents = new Map(d.agents.map((a) => [a.agent_id, a]));
    state.scores = new Map(d.scores.map((s) => [s.process_key, s]));
    state.alerts = d.alerts;
  } else if (msg.type === "score") {
    state.scores.set(d.process_key, d);
    if (state.scores.size > 2000) {
      const keep = [...state.scores.values()].sort((a, b) => b.risk_score - a.risk_score).slice(0, 1000);
      state.scores = new Map(keep.map((s) => [s.process_key, s]));
    }
  } else if (msg.type === "alert") {
    state.alerts.unshift(d);
    state.alerts.length = Math.min(state.alerts.length, MAX_ROWS);
  } else if (msg.type === "agent") {
    state.agents.set(d.agent_id, { ...state.agents.get(d.agent_id), ...d });
  }
  schedule();
}

function connect(tok, delay = 500) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws/live?access_token=${encodeURIComponent(tok)}`);
  const badge = document.getElementById("conn");
  ws.onopen = () => { badge.textContent = "live"; badge.className = "badge on"; delay = 500; };
  ws.onmessage = (ev) => apply(JSON.parse(ev.data));
  ws.onclose = () => {
    badge.textContent = "reconnecting"; badge.className = "badge off";
    setTimeout(() => connect(tok, Math.min(delay * 2, 10000)), delay);
  };
}

function start() {
  const tok = token();
  const form = document.getElementById("signin");
  if (!tok) {
    form.hidden = false;
    form.onsubmit = (ev) => {
      ev.preventDefault();
      sessionStorage.setItem("token", document.getElementById("token").value.trim());
      form.hidden = true;
      start();
    };
    return;
  }
  document.getElementById("board").hidden = false;
  connect(tok);
}

start();
