// Certificates: upload a PEM, issue from a CSR, list with expiry, revoke after confirmation.
import {
  Live, api, confirmDialog, fmtDuration, fmtTime, handleForm, listPage, onRowButton, pageData, say, seg, syncList,
} from "./hub.js";

const PAGE = 100;
const SOON_S = 30 * 86400;
const canAdmin = pageData().canAdmin === "true";
const $ = (id) => document.getElementById(id);
const table = $("certificates");
const more = $("certificates-more");
const statusFilter = $("cert-status");
const message = $("certificates-message");
const state = { certificates: [], cursor: null };

// A CN that is not the agent id is the agent id's problem; any other refusal is the PEM's.
const cnMismatch = (err) => err.message.startsWith("Agent ID mismatch");

async function load({ append = false } = {}) {
  const page = await listPage("/api/v1/certificates", {
    status: statusFilter.value, limit: PAGE, cursor: append ? state.cursor : null,
  });
  state.certificates = append ? [...state.certificates, ...page.items] : page.items;
  state.cursor = page.cursor;
  draw();
}

function draw() {
  const now = Date.now() / 1000;
  syncList(table.tBodies[0], state.certificates, {
    key: (c) => c.fingerprint,
    attr: "fingerprint",
    cls: (c) => (c.status === "valid" && c.not_after - now < SOON_S ? "expiring" : "") + " cert-" + c.status,
    parts: (c) => [
      { text: c.agent_id, href: "/agents/" + seg(c.agent_id) },
      { text: c.status, badge: "cert-" + c.status, title: c.revocation_reason ?? "" },
      fmtTime(c.not_after),
      { text: c.status === "valid" ? fmtDuration(c.not_after - now) : "–", cls: "expires-in" },
      c.source,
      { text: c.fingerprint.slice(0, 16) + "…", title: c.fingerprint, cls: "mono" },
      { text: c.subject, cls: "clip" },
      ...(canAdmin ? [{ buttons: c.status === "revoked" ? [] : [{ label: "Revoke", cls: "revoke danger" }] }] : []),
    ],
  });
  more.hidden = !state.cursor;
}

async function revoke(row) {
  const cert = state.certificates.find((c) => c.fingerprint === row.dataset.fingerprint);
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
    await load();
  } catch (err) {
    say(message, err.message, "error");
  }
}

function showIssued(signed) {
  const box = $("issued");
  box.querySelector(".issued-certificate").value = signed.certificate;
  box.querySelector(".issued-ca").value = signed.ca_certificate;
  box.hidden = false;
}

const reload = () => load().catch((err) => say(message, err.message, "error"));

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
  }, { fields: { certificate: "pem" }, detailField: (err) => (cnMismatch(err) ? "agent_id" : err.status === 422 ? "pem" : null) });

  handleForm($("sign-form"), async (values, form) => {
    $("issued").hidden = true;
    showIssued(await api("/api/v1/certificates:sign", {
      method: "POST",
      body: { agent_id: values.agent_id.trim(), csr: values.csr },
    }));
    form.reset();
    await reload();
  }, { detailField: (err) => (cnMismatch(err) ? "agent_id" : err.status === 422 ? "csr" : null) });

  onRowButton(table, "revoke", revoke);
}
statusFilter.addEventListener("change", reload);
more.addEventListener("click", () => load({ append: true }).catch((err) => say(message, err.message, "error")));
new Live().reconnected(reload).start();
reload();
