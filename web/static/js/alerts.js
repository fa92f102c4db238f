// Alerts: filter, page through, acknowledge and resolve; new and changed alerts arrive live.
import {
  alertTitle,
  $, Live, PagedList, api, fmtExplanation, fmtTime, handleForm, onRowButton, pageData, riskPart, say, seg, severityPart,
} from "./hub.js";

const canWrite = pageData().canWrite === "true";
const form = $("alert-filter");
const table = $("alerts");
const message = $("alerts-message");
const showError = (err) => say(message, err.message, "error");
let filter = {};

function readFilter() {
  const values = Object.fromEntries(new FormData(form));
  return Object.fromEntries(Object.entries(values).map(([k, v]) => [k, v.trim()]).filter(([, v]) => v));
}

function matches(alert) {
  return (!filter.severity || alert.severity === filter.severity)
    && (!filter.status || alert.status === filter.status)
    && (!filter.agent_id || alert.agent_id === filter.agent_id);
}

// Newest first, as the API lists them; at most a page of live arrivals beyond what was loaded.
const list = new PagedList(table.tBodies[0], {
  path: "/api/v1/alerts",
  query: () => filter,
  order: (a, b) => Number(b.id) - Number(a.id),
  keep: matches, // an alert that changed out of the filter (e.g. resolved) leaves
  more: $("alerts-more"),
  onError: showError,
  rows: {
    key: (a) => a.id,
    attr: "alertId",
    cls: (a) => "alert-" + a.status,
    parts: (a) => [
      fmtTime(a.ts),
      severityPart(a.severity),
      { text: alertTitle(a), title: fmtExplanation(a.explanation) },
      { text: (a.mitre ?? []).join(", "), cls: "mitre" },
      { text: a.agent_id, href: "/agents/" + seg(a.agent_id) },
      { text: a.process_id, href: "/agents/" + seg(a.agent_id) + "?process=" + seg(a.process_key), cls: "mono" },
      riskPart(a.risk_score),
      { text: a.status, badge: "alert-status " + a.status, title: statusDetail(a) },
      ...(canWrite ? [actions(a)] : []),
    ],
  },
});

function statusDetail(a) {
  const who = a.resolved_by ? `resolved by ${a.resolved_by}` : a.acknowledged_by ? `acknowledged by ${a.acknowledged_by}` : "";
  return [who, a.note].filter(Boolean).join(": ");
}

function actions(a) {
  const which = `alert ${a.id}: ${a.title} on ${a.agent_id}`;
  return {
    buttons: [
      { label: "Acknowledge", ariaLabel: "Acknowledge " + which, cls: "ack", disabled: a.status !== "open" },
      { label: "Resolve", ariaLabel: "Resolve " + which, cls: "resolve", disabled: a.status === "resolved" },
    ],
  };
}

async function change(row, verb) {
  try {
    list.put(await api(`/api/v1/alerts/${seg(row.dataset.alertId)}:${verb}`, { method: "POST", body: {} }));
    say(message, "");
    list.draw();
  } catch (err) {
    showError(err);
  }
}

function initialFilter() {
  const params = new URLSearchParams(location.search);
  for (const name of ["severity", "status", "agent_id"]) {
    if (params.get(name)) form.elements[name].value = params.get(name);
  }
  filter = readFilter();
}

handleForm(form, async () => {
  filter = readFilter();
  await list.load({ restart: true });
  const url = new URL(location.href);
  url.search = new URLSearchParams(filter).toString();
  history.replaceState(null, "", url);
});
onRowButton(table, "ack", (row) => change(row, "acknowledge"));
onRowButton(table, "resolve", (row) => change(row, "resolve"));

const reload = () => list.load().catch(showError);
new Live()
  .on("alert", (alert) => list.put(alert))
  .draw(() => list.dirty && list.draw())
  .resynced(reload)
  .start();
initialFilter();
reload();
