// Webhooks: list, add (the secret is shown once), enable or disable, delete after confirmation.
import { Live, api, collect, confirmDialog, fmtTime, handleForm, onRowButton, say, seg, syncList } from "./hub.js";

const MAX_WEBHOOKS = 1000;
const $ = (id) => document.getElementById(id);
const table = $("webhooks"); // absent for non-admins: they see neither webhooks nor actions
const message = $("webhooks-message");
const state = { webhooks: [] };

async function load() {
  state.webhooks = (await collect("/api/v1/webhooks", {}, MAX_WEBHOOKS)).items;
  draw();
}

function draw() {
  syncList(table.tBodies[0], state.webhooks, {
    key: (w) => w.id,
    attr: "webhookId",
    cls: (w) => (w.enabled ? "" : "disabled"),
    parts: (w) => [
      { text: w.url, cls: "mono clip", title: w.url },
      w.event_types.join(", "),
      w.min_severity ?? "any",
      w.description ?? "",
      { text: w.enabled ? "enabled" : "disabled", badge: w.enabled ? "st-online" : "st-offline" },
      // Filled by the delivery outbox once it reports per-webhook delivery status.
      { text: "–", cls: "deliveries", title: "Delivery status is not reported yet" },
      fmtTime(w.created_at),
      { buttons: [{ label: w.enabled ? "Disable" : "Enable", cls: "toggle" }, { label: "Delete", cls: "delete danger" }] },
    ],
  });
}

const find = (row) => state.webhooks.find((w) => w.id === row.dataset.webhookId);

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
  const reload = () => load().catch((err) => say(message, err.message, "error"));
  addForm($("webhook-form"));
  onRowButton(table, "toggle", toggle);
  onRowButton(table, "delete", remove);
  live.reconnected(reload);
  reload();
}
live.start();
