// Certificates: upload a PEM, issue from a CSR, list with expiry, revoke after confirmation.
import {
  $, Live, PagedList, api, confirmDialog, fmtDuration, fmtTime, handleForm, onRowButton, pageData, say, seg,
} from "./hub.js";

const SOON_S = 30 * 86400;
const canAdmin = pageData().canAdmin === "true";
const table = $("certificates");
const statusFilter = $("cert-status");
const message = $("certificates-message");
const showError = (err) => say(message, err.message, "error");

const list = new PagedList(table.tBodies[0], {
  path: "/api/v1/certificates",
  query: () => ({ status: statusFilter.value }),
  more: $("certificates-more"),
  onError: showError,
  rows: {
    key: (c) => c.fingerprint,
    attr: "fingerprint",
    cls: (c) => (c.status === "valid" && c.not_after - Date.now() / 1000 < SOON_S ? "expiring" : "") + " cert-" + c.status,
    parts: (c) => [
      { text: c.agent_id, href: "/agents/" + seg(c.agent_id) },
      { text: c.status, badge: "cert-" + c.status, title: c.revocation_reason ?? "" },
      fmtTime(c.not_after),
      { text: c.status === "valid" ? fmtDuration(c.not_after - Date.now() / 1000) : "–", cls: "expires-in" },
      c.source,
      { text: c.fingerprint.slice(0, 16) + "…", title: c.fingerprint, cls: "mono" },
      { text: c.subject, cls: "clip" },
      ...(canAdmin ? [{ buttons: c.status === "revoked" ? [] : [revokeButton(c)] }] : []),
    ],
  },
});

function revokeButton(c) {
  const ariaLabel = `Revoke the certificate of ${c.agent_id} (${c.fingerprint.slice(0, 16)}…)`;
  return { label: "Revoke", ariaLabel, cls: "revoke danger" };
}

async function revoke(row) {
  const cert = list.items.find((c) => c.fingerprint === row.dataset.fingerprint);
  if (!cert) return; // the list was reloaded under the click: that row is gone
  const dialog = $("revoke-dialog");
  dialog.querySelector(".revoke-agent").textContent = cert.agent_id;
  dialog.querySelector(".revoke-fingerprint").textContent = cert.fingerprint;
  const answer = await confirmDialog(dialog);
  if (!answer) return;
  try {
    const revoked = await api(`/api/v1/certificates/${seg(cert.fingerprint)}:revoke`, {
      method: "POST",
      body: { reason: answer.reason },
    });
    say(message, `Revoked the certificate of ${revoked.agent_id}; ${revoked.disconnected} connection(s) closed.`);
    await list.load();
  } catch (err) {
    showError(err);
  }
}

function showIssued(signed) {
  const box = $("issued");
  box.querySelector(".issued-certificate").value = signed.certificate;
  box.querySelector(".issued-ca").value = signed.ca_certificate;
  box.hidden = false;
}

const reload = () => list.load().catch(showError);
// A 422 without field errors is about the PEM itself (an agent id mismatch names body.agent_id).
const otherwiseOn = (field) => (err) => (err.status === 422 ? field : null);

if (canAdmin) {
  handleForm($("upload-form"), async (values, form) => {
    say($("upload-done"), "");
    const cert = await api("/api/v1/certificates", {
      method: "POST",
      body: { agent_id: values.agent_id.trim(), certificate: values.pem },
    });
    form.reset();
    say($("upload-done"), `Uploaded: ${cert.agent_id} may connect with ${cert.fingerprint.slice(0, 16)}… until ${fmtTime(cert.not_after)}.`);
    await reload();
  }, { fields: { certificate: "pem" }, detailField: otherwiseOn("pem") });

  handleForm($("sign-form"), async (values, form) => {
    $("issued").hidden = true;
    showIssued(await api("/api/v1/certificates:sign", {
      method: "POST",
      body: { agent_id: values.agent_id.trim(), csr: values.csr },
    }));
    form.reset();
    await reload();
  }, { detailField: otherwiseOn("csr") });

  onRowButton(table, "revoke", revoke);
}
statusFilter.addEventListener("change", () => list.load({ restart: true }).catch(showError));
new Live().resynced(reload).start();
reload();
