// Webhooks: list, add (the secret is shown once), enable or disable, delete after confirmation,
// send a test delivery; select one to see its recent deliveries and redeliver dead ones.
import { $, Live, api, collect, confirmDialog, fmtTime, handleForm, listPage, onRowButton, say, seg, syncList } from "./hub.js";

const MAX_WEBHOOKS = 1000;
const RECENT_DELIVERIES = 50;
const PENDING_POLL_MS = 2000; // deliveries are not pushed: while some are pending, look again
const table = $("webhooks"); // absent for non-admins: they see neither webhooks nor actions
const message = $("webhooks-message");
const deliveriesTable = $("deliveries");
const state = { webhooks: [], selected: null, deliveries: [], poll: null };

async function load() {
  state.webhooks = (await collect("/api/v1/webhooks", {}, MAX_WEBHOOKS)).items;
  if (state.selected && !state.webhooks.some((w) => w.id === state.selected)) state.selected = null;
  draw();
  await loadDeliveries();
  clearTimeout(state.poll);
  if (state.webhooks.some((w) => w.deliveries.pending > 0)) state.poll = setTimeout(reload, PENDING_POLL_MS);
}

const reload = () => load().catch((err) => say(message, err.message, "error"));

function summary(d) {
  const parts = [`${d.pending} pending`, `${d.dead} dead`];
  if (d.last_status !== null) parts.push(`last ${d.last_status}`);
  else if (d.last_delivery_at !== null) parts.push("last: no answer");
  return parts.join(", ");
}

function draw() {
  syncList(table.tBodies[0], state.webhooks, {
    key: (w) => w.id,
    attr: "webhookId",
    cls: (w) => [w.enabled ? "" : "disabled", w.id === state.selected ? "selected" : ""].join(" ").trim(),
    parts: (w) => [
      { text: w.url, cls: "mono clip", title: w.url },
      w.event_types.join(", "),
      w.min_severity ?? "any",
      w.description ?? "",
      { text: w.enabled ? "enabled" : "disabled", badge: w.enabled ? "st-online" : "st-offline" },
      {
        text: summary(w.deliveries),
        cls: "deliveries",
        title: w.deliveries.last_delivery_at ? "last attempt " + fmtTime(w.deliveries.last_delivery_at) : "",
      },
      fmtTime(w.created_at),
      {
        buttons: [
          { label: "Send test", ariaLabel: "Send a test to " + w.url, cls: "test-send" },
          { label: w.enabled ? "Disable" : "Enable", ariaLabel: (w.enabled ? "Disable " : "Enable ") + w.url, cls: "toggle" },
          { label: "Delete", ariaLabel: "Delete the webhook to " + w.url, cls: "delete danger" },
        ],
      },
    ],
  });
}

const find = (row) => state.webhooks.find((w) => w.id === row.dataset.webhookId);

async function loadDeliveries() {
  const panel = $("deliveries-panel");
  const webhook = state.webhooks.find((w) => w.id === state.selected);
  panel.hidden = !webhook;
  if (!webhook) return;
  panel.querySelector(".deliveries-url").textContent = webhook.url;
  const path = "/api/v1/webhooks/" + seg(webhook.id) + "/deliveries";
  state.deliveries = (await listPage(path, { limit: RECENT_DELIVERIES })).items;
  syncList(deliveriesTable.tBodies[0], state.deliveries, {
    key: (d) => d.id,
    attr: "deliveryId",
    cls: (d) => "delivery-" + d.state,
    parts: (d) => [
      { text: d.id, cls: "mono clip", title: d.id },
      d.event_type,
      { text: d.state, badge: d.state === "delivered" ? "st-online" : d.state === "dead" ? "st-offline" : "st-late" },
      { text: String(d.attempts), cls: "num" },
      d.last_status === null ? "–" : String(d.last_status),
      { text: d.last_error ?? "", cls: "clip", title: d.last_error ?? "" },
      fmtTime(d.created_at),
      d.next_attempt_at === null ? "–" : fmtTime(d.next_attempt_at),
      { buttons: d.state === "dead" ? [{ label: "Redeliver", ariaLabel: "Redeliver " + d.id, cls: "redeliver" }] : [] },
    ],
  });
}

function select(event) {
  const row = event.target.closest("tr[data-webhook-id]");
  if (!row || event.target.closest("button")) return;
  state.selected = row.dataset.webhookId;
  draw();
  loadDeliveries().catch((err) => say(message, err.message, "error"));
}

async function act(fn) {
  try {
    await fn();
    say(message, "");
    await load();
  } catch (err) {
    say(message, err.message, "error");
  }
}

async function toggle(row) {
  const webhook = find(row);
  await act(() => api("/api/v1/webhooks/" + seg(webhook.id), { method: "PATCH", body: { enabled: !webhook.enabled } }));
}

async function sendTest(row) {
  const webhook = find(row);
  state.selected = webhook.id;
  await act(() => api("/api/v1/webhooks/" + seg(webhook.id) + ":test", { method: "POST" }));
}

async function redeliver(row) {
  const path = "/api/v1/webhooks/" + seg(state.selected) + "/deliveries/" + seg(row.dataset.deliveryId) + ":redeliver";
  await act(() => api(path, { method: "POST" }));
}

async function remove(row) {
  const webhook = find(row);
  const dialog = $("delete-dialog");
  dialog.querySelector(".delete-url").textContent = webhook.url;
  if (await confirmDialog(dialog)) await act(() => api("/api/v1/webhooks/" + seg(webhook.id), { method: "DELETE" }));
}

function addForm(form) {
  handleForm(form, async (values) => {
    $("webhook-secret").hidden = true;
    const created = await api("/api/v1/webhooks", {
      method: "POST",
      body: {
        url: values.url.trim(),
        event_types: new FormData(form).getAll("event_types"),
        min_severity: values.min_severity || null,
        description: values.description.trim() || null,
        enabled: values.enabled === "on",
      },
    });
    form.reset();
    $("webhook-secret").querySelector(".secret").value = created.secret;
    $("webhook-secret").hidden = false;
    await load();
  });
}

const live = new Live();
if (table) {
  addForm($("webhook-form"));
  onRowButton(table, "toggle", toggle);
  onRowButton(table, "test-send", sendTest);
  onRowButton(deliveriesTable, "redeliver", redeliver);
  table.tBodies[0].addEventListener("click", select);
  onRowButton(table, "delete", remove);
  live.resynced(reload);
  reload();
}
live.start();
