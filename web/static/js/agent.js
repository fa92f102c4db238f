// One agent: status, resource chart, scored processes, process tree, recent events, commands.
import {
  $, Live, api, appendPoint, applyAgentPush, collect, fmtAgo, fmtExplanation, fmtNum, fmtTime, h, handleForm, pageData,
  riskClass, riskPart, say, seg, syncList, timeChart,
} from "./hub.js";

const agentId = pageData().agentId;
const base = "/api/v1/agents/" + seg(agentId);
const PROCESS_ROWS = 100;
const MAX_SCORES = 1000; // kept in memory; past this the exited, then the least risky, are dropped
const EVENT_ROWS = 50;
const COMMAND_ROWS = 20;
const CHART_POINTS = 3600;
const TREE_NODES = 300;
const HISTORY_S = 3600;

const state = {
  agent: null,
  scores: new Map(),
  selected: new URLSearchParams(location.search).get("process"),
  beats: [[], [], [], []], // ts, cpu, mem, disk
  events: [],
  eventsSince: null,
  commands: new Map(),
  lastCommand: null,
};
const dirty = { agent: true, scores: true, beats: true, commands: true };
const chart = timeChart($("heartbeat-chart"), [
  { label: "CPU %", stroke: "#f78166" },
  { label: "Memory %", stroke: "#58a6ff" },
  { label: "Disk %", stroke: "#3fb950" },
], { height: 200, yMax: 100 });

// ---- live state -------------------------------------------------------------------

/** Take the agent's record (from the API or a snapshot) or, with `push`, an `agent` push. */
function setAgent(record, { push = false } = {}) {
  state.agent = push ? applyAgentPush(state.agent ?? { agent_id: agentId }, record) : { ...state.agent, ...record };
  if (record.heartbeat) addBeat(record.heartbeat);
  dirty.agent = true;
}

function addBeat(beat) {
  const point = [beat.ts, beat.cpu_percent, beat.mem_percent, beat.disk_percent];
  if (appendPoint(state.beats, point, CHART_POINTS)) dirty.beats = true;
}

function addScore(score) {
  if (score.agent_id !== agentId) return;
  state.scores.set(score.process_key, score);
  if (state.scores.size > MAX_SCORES) {
    const keep = [...state.scores.values()].sort(byLiveThenRisk).slice(0, MAX_SCORES / 2);
    state.scores = new Map(keep.map((s) => [s.process_key, s]));
  }
  dirty.scores = true;
}

function addCommand(command) {
  if (command.agent_id !== agentId) return;
  state.commands.set(command.id, command);
  if (state.lastCommand?.id === command.id) state.lastCommand = command;
  dirty.commands = true;
}

const live = new Live()
  .on("snapshot", (d) => {
    const mine = d.agents.find((a) => a.agent_id === agentId);
    if (mine) setAgent(mine);
    d.scores.forEach(addScore);
  })
  .on("agent", (d) => d.agent_id === agentId && setAgent(d, { push: true }))
  .on("score", addScore)
  .on("command", addCommand)
  .draw(draw)
  .resynced(loadAll);

// ---- drawing ----------------------------------------------------------------------

function draw() {
  if (dirty.agent) drawAgent();
  if (dirty.beats) {
    dirty.beats = false;
    chart.set(state.beats);
  }
  if (dirty.scores) drawProcesses();
  if (dirty.commands) drawCommands();
}

function drawAgent() {
  dirty.agent = false;
  const a = state.agent;
  if (!a) return;
  const el = $("agent-status");
  const set = (cls, text) => (el.querySelector("." + cls).textContent = text ?? "–");
  const status = el.querySelector(".status");
  status.textContent = a.status ?? "unknown";
  status.className = "status badge st-" + a.status;
  set("reason", a.status_reason ? `(${a.status_reason}, ${fmtAgo(a.status_changed_at ?? a.last_seen)})` : "");
  const beat = a.heartbeat;
  set("last-heartbeat", beat ? `${fmtTime(beat.ts)} (${fmtAgo(beat.ts)})` : "none yet");
  set("risk", fmtNum(a.risk ?? 0, 1));
  el.querySelector(".risk").className = "risk " + riskClass(a.risk ?? 0);
  set("hostname", a.hostname);
  set("platform", a.platform);
  set("agent-version", a.agent_version);
  set("node", a.node);
  set("connected-at", a.connected_at ? fmtTime(a.connected_at) : null);
  set("spool", beat ? `${fmtNum(beat.spool_depth)} / ${fmtNum(beat.dropped)}` : null);
}

function byLiveThenRisk(a, b) {
  return Number(a.exited) - Number(b.exited) || b.risk_score - a.risk_score || a.pid - b.pid;
}

function drawProcesses() {
  dirty.scores = false;
  const rows = [...state.scores.values()].sort(byLiveThenRisk).slice(0, PROCESS_ROWS);
  syncList($("processes").tBodies[0], rows, {
    key: (s) => s.process_key,
    attr: "processKey",
    cls: (s) => (s.process_key === state.selected ? "selected" : "") + (s.exited ? " exited" : ""),
    parts: (s) => [
      { text: s.process_id, href: "?process=" + seg(s.process_key), cls: "mono" },
      { text: s.exe ?? "", cls: "mono" },
      riskPart(s.risk_score),
      { text: fmtExplanation(s.explanation), cls: "why", title: explanationDetail(s.explanation) },
      s.exited ? "exited" : "running",
    ],
  });
}

function explanationDetail(explanation) {
  return (explanation ?? [])
    .map((c) => `${c.rule_id} ${c.severity} ${(c.mitre ?? []).join(",")}: +${fmtNum(c.contribution, 2)} from ${c.hits} hit(s)`)
    .join("\n");
}

function drawCommands() {
  dirty.commands = false;
  const rows = [...state.commands.values()].sort((a, b) => b.created_at - a.created_at).slice(0, COMMAND_ROWS);
  syncList($("commands").tBodies[0], rows, {
    key: (c) => c.id,
    attr: "commandId",
    parts: (c) => [
      fmtTime(c.created_at),
      { text: c.name, cls: "mono" },
      { text: c.state, badge: "cmd-" + c.state },
      c.created_by,
      { text: c.error ?? (c.result ? JSON.stringify(c.result) : ""), cls: "mono clip" },
    ],
  });
  if (state.lastCommand) drawCommandResult(state.lastCommand);
}

function drawCommandResult(c) {
  const el = $("command-result");
  el.dataset.commandId = c.id;
  el.dataset.state = c.state;
  el.replaceChildren(h(
    "div",
    {},
    h("p", {}, h("strong", {}, c.name), " ", h("span", { className: "badge cmd-" + c.state }, c.state)),
    c.error ? h("p", { className: "notice error" }, c.error) : null,
    c.result ? h("pre", {}, JSON.stringify(c.result, null, 2)) : null,
  ));
}

function drawTree(tree) {
  const el = $("process-tree");
  $("tree-of").textContent = tree.process_key;
  const keys = new Set(tree.nodes.map((n) => n.process_key));
  const children = new Map();
  for (const node of tree.nodes) {
    const parent = node.parent_key && keys.has(node.parent_key) ? node.parent_key : null;
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(node);
  }
  let budget = TREE_NODES;
  const branch = (parent) => {
    const list = h("ul");
    for (const node of children.get(parent) ?? []) {
      if (budget-- <= 0) break;
      const label = h(
        "button",
        { type: "button", className: "node " + riskClass(node.risk_score ?? 0) + (node.process_key === tree.process_key ? " selected" : ""), "data-process-key": node.process_key },
        `${node.pid} ${node.exe ?? node.comm ?? "?"} `,
        h("span", { className: "num" }, fmtNum(node.risk_score, 1)),
        node.exited ? h("span", { className: "hint" }, " exited") : null,
      );
      list.append(h("li", {}, label, children.has(node.process_key) ? branch(node.process_key) : null));
    }
    return list;
  };
  el.replaceChildren(branch(null));
  if (budget < 0) el.append(h("p", { className: "hint" }, `${tree.nodes.length - TREE_NODES} more processes not shown`));
}

// ---- loading ----------------------------------------------------------------------

async function loadAgent() {
  try {
    setAgent(await api(base));
    $("agent-error").hidden = true;
  } catch (err) {
    say($("agent-error"), err.message, "error");
  }
}

async function loadBeats() {
  try {
    const { items } = await collect(base + "/heartbeats", { since: Date.now() / 1000 - HISTORY_S }, CHART_POINTS);
    state.beats = [[], [], [], []];
    items.forEach(addBeat);
    $("heartbeat-note").textContent = items.length ? "" : "No heartbeats in the last hour.";
  } catch (err) {
    $("heartbeat-note").textContent = "History unavailable: " + err.message;
  }
}

async function loadScores() {
  try {
    const { items } = await collect("/api/v1/scores", { agent_id: agentId }, PROCESS_ROWS * 2);
    state.scores = new Map();
    items.forEach(addScore);
    if (!state.selected) {
      const riskiest = [...state.scores.values()].sort(byLiveThenRisk)[0];
      if (riskiest && riskiest.risk_score > 0) state.selected = riskiest.process_key;
    }
    say($("processes-error"), "");
  } catch (err) {
    say($("processes-error"), err.message, "error");
  }
}

async function loadTree() {
  if (!state.selected) return;
  try {
    drawTree(await api("/api/v1/processes/" + seg(state.selected) + "/tree"));
  } catch (err) {
    $("process-tree").replaceChildren(h("p", { className: "notice error" }, err.message));
  }
}

async function loadCommands() {
  try {
    const { items } = await collect(base + "/commands", {}, COMMAND_ROWS);
    items.forEach(addCommand);
    say($("commands-error"), "");
  } catch (err) {
    say($("commands-error"), err.message, "error");
  }
}

async function loadEvents() {
  const now = Date.now() / 1000;
  const query = (since) => collect("/api/v1/events", { agent_id: agentId, since }, 2000);
  try {
    let page = await query(state.eventsSince ?? now - 300);
    if (page.cursor) page = await query(now - 5); // too many to catch up with: show the latest
    const seen = new Set(state.events.map((e) => e.seq));
    const fresh = page.items.filter((e) => !seen.has(e.seq)).reverse();
    state.events = [...fresh, ...state.events].sort((a, b) => b.seq - a.seq).slice(0, EVENT_ROWS);
    if (page.items.length) state.eventsSince = page.items[page.items.length - 1].ts;
    drawEvents();
  } catch {
    // retried on the next round
  }
}

function eventDetail(e) {
  if (e.dst_ip) return `${e.protocol ?? ""} ${e.dst_ip}:${e.dst_port ?? ""}`.trim();
  if (e.syscall) return e.syscall + (e.path ? " " + e.path : "");
  if (e.path) return e.path;
  return (e.argv ?? []).join(" ");
}

function drawEvents() {
  syncList($("events").tBodies[0], state.events, {
    key: (e) => e.seq,
    attr: "seq",
    parts: (e) => [
      fmtTime(e.ts),
      e.kind,
      { text: e.pid, cls: "num" },
      { text: e.exe ?? e.comm ?? "", cls: "mono" },
      { text: eventDetail(e), cls: "mono clip" },
    ],
  });
}

async function loadAll() {
  await Promise.all([loadAgent(), loadBeats(), loadScores(), loadCommands(), loadEvents()]);
  await loadTree();
  draw();
}

// ---- actions ----------------------------------------------------------------------

// A row selects its process; so does its link, unless it is opened in another tab or window.
$("processes").tBodies[0].addEventListener("click", (event) => {
  const row = event.target.closest("tr[data-process-key]");
  if (!row || (event.target.closest("a") && (event.ctrlKey || event.metaKey || event.shiftKey))) return;
  event.preventDefault();
  select(row.dataset.processKey);
});

$("process-tree").addEventListener("click", (event) => {
  const node = event.target.closest("[data-process-key]");
  if (node) select(node.dataset.processKey);
});

function select(processKey) {
  state.selected = processKey;
  const url = new URL(location.href);
  url.searchParams.set("process", processKey);
  history.replaceState(null, "", url);
  dirty.scores = true;
  draw();
  loadTree();
}

const form = $("command-form");
if (form) {
  handleForm(form, async (values) => {
    let args = {};
    if (values.args.trim()) {
      try {
        args = JSON.parse(values.args);
      } catch (err) {
        throw Object.assign(new Error("not JSON: " + err.message), { field: "args" });
      }
    }
    const command = await api(base + "/commands", { method: "POST", body: { name: values.name.trim(), args, wait_s: 10 } });
    state.lastCommand = command;
    addCommand(command);
    draw();
  });
}

setInterval(() => {
  dirty.agent = true; // "n s ago"
  draw();
}, 1000);
setInterval(() => document.visibilityState === "visible" && loadEvents(), 5000);
loadAll();
live.start();
