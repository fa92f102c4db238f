// Alerts: filter, page through, acknowledge and resolve; new and changed alerts arrive live.
import {
  Live, api, fmtExplanation, fmtTime, handleForm, listPage, onRowButton, pageData, riskPart, say, seg, severityPart, syncList,
} from "./hub.js";

const MAX_ROWS = 500;
const PAGE = 100;
const canWrite = pageData().canWrite === "true";
const $ = (id) => document.getElementById(id);
const form = $("alert-filter");
const table = $("alerts");
const more = $("alerts-more");
const message = $("alerts-message");
const state = { filter: {}, alerts: new Map(), cursor: null };
let dirty = false;

function readFilter() {
  const values = Object.fromEntries(new FormData(form));
  return Object.fromEntries(Object.entries(values).map(([k, v]) => [k, v.trim()]).filter(([, v]) => v));
}

function matches(alert) {
  const f = state.filter;
  return (!f.severity || alert.severity === f.severity)
    && (!f.status || alert.status === f.status)
    && (!f.agent_id || alert.agent_id === f.agent_id);
}

async function load({ append = false } = {}) {
  const page = await listPage("/api/v1/alerts", { ...state.filter, limit: PAGE, cursor: append ? state.cursor : null });
  if (!append) state.alerts = new Map();
  for (const alert of page.items) state.alerts.set(alert.id, alert);
  state.cursor = page.cursor;
  draw();
}

function put(alert) {
  if (matches(alert)) state.alerts.set(alert.id, alert);
  else state.alerts.delete(alert.id); // it changed out of the filter (e.g. resolved)
  dirty = true;
}

function draw() {
  dirty = false;
  const rows = [...state.alerts.values()].sort((a, b) => b.ts - a.ts || Number(b.id) - Number(a.id)).slice(0, MAX_ROWS);
  syncList(table.tBodies[0], rows, {
    key: (a) => a.id,
    attr: "alertId",
    cls: (a) => "alert-" + a.status,
    parts: (a) => [
      fmtTime(a.ts),
      severityPart(a.severity),
      { text: a.title, title: fmtExplanation(a.explanation) },
      { text: (a.mitre ?? []).join(", "), cls: "mitre" },
      { text: a.agent_id, href: "/agents/" + seg(a.agent_id) },
      { text: a.process_id, href: "/agents/" + seg(a.agent_id) + "?process=" + seg(a.process_key), cls: "mono" },
      riskPart(a.risk_score),
      { text: a.status, badge: "alert-status " + a.status, title: statusDetail(a) },
      ...(canWrite ? [actions(a)] : []),
    ],
  });
  more.hidden = !state.cursor;
}

function statusDetail(a) {
  const who = a.resolved_by ? `resolved by ${a.resolved_by}` : a.acknowledged_by ? `acknowledged by ${a.acknowledged_by}` : "";
  return [who, a.note].filter(Boolean).join(": ");
}

function actions(a) {
  return {
    buttons: [
      { label: "Acknowledge", cls: "ack", disabled: a.status !== "open" },
      { label: "Resolve", cls: "resolve", disabled: a.status === "resolved" },
    ],
  };
}

async function change(row, verb) {
  try {
    put(await api(`/api/v1/alerts/${seg(row.dataset.alertId)}:${verb}`, { method: "POST", body: {} }));
    say(message, "");
    draw();
  } catch (err) {
    say(message, err.message, "error");
  }
}

function initialFilter() {
  const params = new URLSearchParams(location.search);
  for (const name of ["severity", "status", "agent_id"]) {
    if (params.get(name)) form.elements[name].value = params.get(name);
  }
  state.filter = readFilter();
}

handleForm(form, async () => {
  state.filter = readFilter();
  await load();
  const url = new URL(location.href);
  url.search = new URLSearchParams(state.filter).toString();
  history.replaceState(null, "", url);
});
more.addEventListener("click", () => load({ append: true }).catch((err) => say(message, err.message, "error")));
onRowButton(table, "ack", (row) => change(row, "acknowledge"));
onRowButton(table, "resolve", (row) => change(row, "resolve"));

const reload = () => load().catch((err) => say(message, err.message, "error"));
new Live()
  .on("alert", put)
  .draw(() => dirty && draw())
  .reconnected(reload)
  .start();
initialFilter();
reload();
