// Shared by every page: the API client, the live connection, bounded keyed lists, forms,
// charts and formatting. Pages import what they need; nothing here knows a page.

// ---- API ----------------------------------------------------------------------------

/** An API refusal: an RFC 7807 problem with its status. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }

  /** The field errors of a 422 as [field, message] pairs (the last part of each location). */
  get fieldErrors() {
    return (this.problem.errors || []).map((error) => {
      const loc = String(error.location ?? "").split(".");
      return [loc[loc.length - 1], error.message ?? ""];
    });
  }
}

function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]')?.content ?? "";
}

/** Leave for the sign-in page, coming back here afterwards. */
export function signIn() {
  location.assign("/signin?next=" + encodeURIComponent(location.pathname + location.search));
}

/** Call the API with the session cookie; answer the JSON body, or throw an ApiError. */
export async function api(path, { method = "GET", body, query } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query ?? {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    signIn();
    throw new ApiError(401, { detail: "signed out: sign in again" });
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/** Fetch one page of a list: its items and the cursor of the next page (null at the end). */
export async function listPage(path, query = {}) {
  const page = await api(path, { query });
  return { items: page.data, cursor: page.pagination.cursor };
}

/** Fetch pages of a list until `max` items or its end; answer the items and the next cursor. */
export async function collect(path, query = {}, max = 500) {
  const items = [];
  let cursor = null;
  do {
    const page = await listPage(path, { ...query, cursor, limit: Math.min(500, max - items.length) });
    items.push(...page.items);
    cursor = page.cursor;
  } while (cursor && items.length < max);
  return { items, cursor };
}

/** Encode one path segment (process keys hold ':' and '.'). */
export const seg = (value) => encodeURIComponent(value);

/** The element with this id. */
export const $ = (id) => document.getElementById(id);

// ---- Live ---------------------------------------------------------------------------

const MAX_QUEUE = 5000; // a hidden tab gets no animation frames: past this, apply without drawing

/**
 * The `/ws/live` feed: reconnects with backoff, applies pushes in batches once per
 * animation frame, then calls the draw hooks once. Unknown message types are ignored.
 * The hub sends a `snapshot` on every connect, and again whenever this page fell behind or
 * all scores changed at once: every snapshot but the first calls the resync hooks.
 */
export class Live {
  constructor() {
    this.handlers = new Map();
    this.drawHooks = [];
    this.resyncHooks = [];
    this.queue = [];
    this.scheduled = false;
    this.delay = 500;
    this.snapshots = 0;
    this.badge = document.getElementById("conn");
  }

  /** Apply every message of `type` with `fn(data)` (state only: draw in `draw`). */
  on(type, fn) {
    if (!this.handlers.has(type)) this.handlers.set(type, []);
    this.handlers.get(type).push(fn);
    return this;
  }

  /** Call `fn` once after each batch of messages. */
  draw(fn) {
    this.drawHooks.push(fn);
    return this;
  }

  /** Call `fn` after each fresh snapshot but the page's first, to re-fetch what is not pushed. */
  resynced(fn) {
    this.resyncHooks.push(fn);
    return this;
  }

  start() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // batch=1: each frame is an array of the messages pending when it was sent.
    const ws = new WebSocket(`${scheme}://${location.host}/ws/live?batch=1`);
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.delay = 500;
      this.setBadge(true);
    };
    ws.onmessage = (event) => {
      for (const message of JSON.parse(event.data)) this.push(message);
    };
    ws.onclose = (event) => {
      this.setBadge(false);
      if (event.code === 4401 || event.code === 4403) {
        signIn();
        return;
      }
      // A refused upgrade (401) reaches the page only as a close: ask the API who we are.
      if (!opened || event.code === 1008) api("/api/v1/agents", { query: { limit: 1 } }).catch(() => {});
      const wait = this.delay * (0.5 + Math.random());
      this.delay = Math.min(this.delay * 2, 10000);
      setTimeout(() => this.start(), wait);
    };
    return this;
  }

  setBadge(live) {
    if (!this.badge) return;
    this.badge.textContent = live ? "live" : "reconnecting";
    this.badge.className = "badge " + (live ? "conn-on" : "conn-off");
  }

  push(message) {
    this.queue.push(message);
    if (this.queue.length > MAX_QUEUE) this.flush(false);
    if (!this.scheduled) {
      this.scheduled = true;
      requestAnimationFrame(() => {
        this.scheduled = false;
        this.flush(true);
      });
    }
  }

  flush(draw) {
    const batch = this.queue;
    this.queue = [];
    let resync = false;
    for (const message of batch) {
      for (const fn of this.handlers.get(message.type) ?? []) fn(message.data);
      if (message.type === "snapshot" && this.snapshots++ > 0) resync = true;
    }
    if (draw) for (const fn of this.drawHooks) fn();
    if (resync) for (const fn of this.resyncHooks) fn();
  }
}

// ---- Keyed, bounded lists -----------------------------------------------------------

/**
 * Make `container`'s children exactly `items`, in order, reusing each element by key:
 * `key(item)` is stored as `data-<attr>`, `parts(item)` gives the cells (see `setParts`).
 * Callers pass at most as many items as they want shown; a table's <tfoot> is its
 * "nothing here" line, shown only when there are no items.
 */
export function syncList(container, items, { key, attr, parts, tag = "tr", partTag = "td", cls }) {
  const existing = new Map();
  for (const el of container.children) existing.set(el.dataset[attr], el);
  let cursor = container.firstElementChild;
  for (const item of items) {
    const id = String(key(item));
    let el = existing.get(id);
    if (!el) {
      el = document.createElement(tag);
      el.dataset[attr] = id;
    }
    existing.delete(id);
    setParts(el, parts(item), partTag);
    if (cls) el.className = cls(item) ?? "";
    if (el === cursor) cursor = cursor.nextElementSibling;
    else container.insertBefore(el, cursor);
  }
  while (cursor) {
    const next = cursor.nextElementSibling;
    cursor.remove();
    cursor = next;
  }
  const table = container.closest("table");
  if (table?.tFoot) table.tFoot.hidden = items.length > 0;
}

/**
 * Set an element's children to one `partTag` per spec; a part is rebuilt only when its spec
 * changed. A spec is text, or {text, cls, href, title, badge, buttons: [{label, ariaLabel, cls,
 * disabled}]}; a button's `ariaLabel` names its row for people who cannot see the row.
 */
export function setParts(el, specs, partTag = "td") {
  while (el.children.length > specs.length) el.lastElementChild.remove();
  while (el.children.length < specs.length) el.append(document.createElement(partTag));
  specs.forEach((spec, i) => setPart(el.children[i], spec));
}

function setPart(part, spec) {
  const sig = spec !== null && typeof spec === "object" ? JSON.stringify(spec) : String(spec ?? "");
  if (part.sig === sig) return;
  part.sig = sig;
  const s = spec !== null && typeof spec === "object" ? spec : { text: spec };
  part.className = s.cls ?? "";
  part.title = s.title ?? "";
  part.replaceChildren();
  if (s.href) {
    part.append(h("a", { href: s.href }, s.text));
  } else if (s.badge) {
    part.append(h("span", { className: "badge " + s.badge }, s.text));
  } else {
    part.textContent = s.text ?? "";
  }
  for (const b of s.buttons ?? []) {
    const props = { type: "button", className: b.cls, disabled: !!b.disabled, "aria-label": b.ariaLabel };
    part.append(h("button", props, b.label));
  }
}

/**
 * Make an element: properties go on it (`data-*` and `aria-*` as attributes, undefined ones
 * not at all), children (text or nodes) inside; no HTML parsing.
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined) continue;
    if (name.startsWith("data-") || name.startsWith("aria-")) el.setAttribute(name, value);
    else el[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Call `fn(row, event)` when a button of class `cls` in a row of `container` is clicked. */
export function onRowButton(container, cls, fn) {
  container.addEventListener("click", (event) => {
    const button = event.target.closest("button." + cls);
    if (button && container.contains(button)) fn(button.closest("tr, li"), event);
  });
}

/**
 * A list the API pages through, newest first, drawn into `body` by `syncList(body, items, rows)`:
 * it holds the first `size` items and a page more at each click on `more` (shown while more
 * exist). `put` applies a live insert or update in `order` (an item `keep` refuses leaves),
 * dropping the oldest past `size`; as that leaves the server's cursor behind, loading always
 * fetches the whole window again. Load errors from the button go to `onError`.
 */
export class PagedList {
  constructor(body, { path, query = () => ({}), order, keep = () => true, rows, more, page = 100, onError }) {
    Object.assign(this, { body, path, query, order, keep, rows, more, page });
    this.size = page;
    this.items = [];
    this.hasMore = false;
    this.dirty = false;
    this.loads = 0;
    this.during = null; // puts that arrive while a load is under way: applied again on its answer
    more.addEventListener("click", () => {
      this.size += page;
      this.load().catch(onError);
    });
  }

  /** Fetch the window again (just the first page after `restart`, e.g. new filters) and draw it. */
  async load({ restart = false } = {}) {
    if (restart) this.size = this.page;
    const load = ++this.loads;
    this.during ??= [];
    try {
      const { items, cursor } = await collect(this.path, this.query(), this.size);
      if (load !== this.loads) return; // a later load answers instead
      const puts = this.during;
      this.during = null;
      this.items = items;
      this.hasMore = cursor !== null;
      for (const item of puts) this.put(item);
      this.draw();
    } finally {
      if (load === this.loads) this.during = null;
    }
  }

  /** Insert or update `item` in place (or remove it if `keep` refuses it); draw later. */
  put(item) {
    this.during?.push(item);
    const id = String(this.rows.key(item));
    const at = this.items.findIndex((x) => String(this.rows.key(x)) === id);
    if (!this.keep(item)) {
      if (at >= 0) this.items.splice(at, 1);
    } else if (at >= 0) {
      this.items[at] = item;
    } else {
      const before = this.items.findIndex((x) => this.order(item, x) < 0);
      if (before >= 0) this.items.splice(before, 0, item);
      else if (!this.hasMore) this.items.push(item); // past the end of what is loaded: not shown yet
      if (this.items.length > this.size) {
        this.items.length = this.size;
        this.hasMore = true;
      }
    }
    this.dirty = true;
  }

  draw() {
    this.dirty = false;
    syncList(this.body, this.items, this.rows);
    this.more.hidden = !this.hasMore;
  }
}

// ---- Agents ---------------------------------------------------------------------------

/**
 * Answer `record` (an agent) with an `agent` push applied: every field the push carries is
 * merged (status, heartbeat; on connect also hostname, agent_version, platform, node); its
 * `ts` is when the agent was last seen and, when it gives a `reason`, when the status changed.
 */
export function applyAgentPush(record, push) {
  const { reason, ts, ...fields } = push;
  const next = { ...record, ...fields };
  if (ts) next.last_seen = ts;
  if (reason) {
    next.status_reason = reason;
    next.status_changed_at = ts ?? next.status_changed_at;
  }
  return next;
}

// ---- Forms and messages -------------------------------------------------------------

/** The controls named `name` in `form` (several for a group of checkboxes). */
function controls(form, name) {
  const found = form.elements.namedItem(name);
  return found instanceof RadioNodeList ? [...found] : found ? [found] : [];
}

/** Empty every field error and the form's own error line; the fields are valid again. */
export function clearErrors(form) {
  for (const el of form.querySelectorAll(".field-error, .form-error")) el.textContent = "";
  const errorIds = new Set([...form.querySelectorAll(".field-error[id]")].map((el) => el.id));
  for (const control of form.querySelectorAll("[aria-invalid]")) {
    control.removeAttribute("aria-invalid");
    const rest = (control.getAttribute("aria-describedby") ?? "").split(" ").filter((id) => id && !errorIds.has(id));
    if (rest.length) control.setAttribute("aria-describedby", rest.join(" "));
    else control.removeAttribute("aria-describedby");
  }
}

/**
 * Show an error next to its fields: each 422 field error at `.field-error[data-field]`
 * (API field names mapped by `fields`), a detail `detailField(err)` names there too, as
 * does a local check's `err.field`; anything else goes in the form's `.form-error`.
 */
export function showErrors(form, err, { fields = {}, detailField } = {}) {
  clearErrors(form);
  const place = (field, text) => {
    const name = fields[field] ?? field;
    const el = form.querySelector(`.field-error[data-field="${CSS.escape(name)}"]`);
    if (!el) return false;
    el.textContent = el.textContent ? `${el.textContent}; ${text}` : text;
    el.id ||= `${form.id || "form"}-${name}-error`;
    for (const control of controls(form, name)) {
      control.setAttribute("aria-invalid", "true");
      const ids = new Set((control.getAttribute("aria-describedby") ?? "").split(" ").filter(Boolean));
      control.setAttribute("aria-describedby", [...ids.add(el.id)].join(" "));
    }
    return true;
  };
  let placed = false;
  if (err instanceof ApiError) {
    for (const [field, text] of err.fieldErrors) placed = place(field, text) || placed;
    const field = detailField?.(err);
    if (!placed && field) placed = place(field, err.message);
  } else if (err.field) {
    placed = place(err.field, err.message); // a check made before sending
  }
  if (!placed) {
    const line = form.querySelector(".form-error");
    if (line) line.textContent = err.message;
  }
}

/**
 * Submit `form` through `action(values, form)` instead of navigating: the submit button is
 * disabled meanwhile and a failure is shown with `showErrors(form, err, errorOptions)`.
 */
export function handleForm(form, action, errorOptions = {}) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit], button:not([type])");
    if (button) button.disabled = true;
    clearErrors(form);
    try {
      await action(Object.fromEntries(new FormData(form)), form);
    } catch (err) {
      showErrors(form, err, errorOptions);
    } finally {
      if (button) button.disabled = false;
    }
  });
}

/** Open a <dialog> holding a method=dialog form; answer its values if confirmed, else null. */
export function confirmDialog(dialog) {
  const form = dialog.querySelector("form");
  form?.reset();
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => resolve(dialog.returnValue === "confirm" ? Object.fromEntries(new FormData(form)) : null),
      { once: true },
    );
  });
}

/** Show a short status line in `el`: kind is "ok" or "error". */
export function say(el, text, kind = "ok") {
  el.textContent = text;
  el.className = "notice " + kind;
  el.hidden = !text;
}

// ---- Charts (uPlot, vendored) -------------------------------------------------------

/**
 * A uPlot time chart in `el` that follows the element's width. `series` are
 * [{label, stroke}]; the answer's `set(data)` redraws with [[ts...], [values...]...]. A
 * sparkline has no axes, legend or cursor.
 */
export function timeChart(el, series, { height = 160, yMax = null, sparkline = false } = {}) {
  const uPlot = globalThis.uPlot;
  const opts = {
    width: Math.max(el.clientWidth, 200),
    height,
    legend: { show: !sparkline },
    cursor: { show: !sparkline },
    scales: { y: { range: (u, min, max) => [0, Math.max(yMax ?? 0, max * 1.1 || 1)] } },
    axes: [
      { show: !sparkline, stroke: "#9aa4b2", grid: { stroke: "#2a3140" } },
      { show: !sparkline, stroke: "#9aa4b2", grid: { stroke: "#2a3140" }, size: 44 },
    ],
    series: [{}, ...series.map((s) => ({ label: s.label, stroke: s.stroke, width: 1.5, points: { show: false } }))],
  };
  const plot = new uPlot(opts, [[], ...series.map(() => [])], el);
  new ResizeObserver(() => plot.setSize({ width: Math.max(el.clientWidth, 200), height })).observe(el);
  return { set: (data) => plot.setData(data) };
}

/**
 * Append one point (`values`: the time, then one value per series) to uPlot `columns`,
 * dropping the oldest past `max`; a point not newer than the last is ignored.
 */
export function appendPoint(columns, values, max) {
  const times = columns[0];
  if (times.length && values[0] <= times[times.length - 1]) return false;
  columns.forEach((column, i) => column.push(values[i] ?? null));
  const excess = times.length - max;
  if (excess > 0) for (const column of columns) column.splice(0, excess);
  return true;
}

// ---- Formatting ---------------------------------------------------------------------

/** Risk colouring: >= 80 high, >= 50 mid. */
export const riskClass = (score) => (score >= 80 ? "risk-high" : score >= 50 ? "risk-mid" : "risk-low");

/** A risk score cell. */
export const riskPart = (score) => ({ text: fmtNum(score, 1), cls: "num score " + riskClass(score) });

/** A severity badge. */
export const severityPart = (severity) => ({ text: severity, badge: "sev sev-" + String(severity).toLowerCase() });

/** An alert's title, with how often it repeated when repeats were folded into it. */
export const alertTitle = (a) => (a.count > 1 ? `${a.title} (×${a.count})` : a.title);

/** Why a score is what it is: each rule and what it added. */
export function fmtExplanation(explanation) {
  return (explanation ?? [])
    .map((c) => `${c.name} +${fmtNum(c.contribution, 1)}${c.hits > 1 ? ` (${c.hits}×)` : ""}`)
    .join("; ");
}

export function fmtNum(value, digits = 0) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

/** Local time, with the date when not today. */
export function fmtTime(ts) {
  if (!ts) return "–";
  const date = new Date(ts * 1000);
  return date.toDateString() === new Date().toDateString() ? date.toLocaleTimeString() : date.toLocaleString();
}

/** How long ago, roughly. */
export function fmtAgo(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export const fmtDuration = (s) =>
  s === null || s === undefined ? "–" : s < 3600 ? `${Math.round(s / 60)} min` : s < 86400 ? `${(s / 3600).toFixed(1)} h` : `${(s / 86400).toFixed(1)} d`;

/** The agent a page is about, or other per-page data: from `data-*` on <main>. */
export const pageData = () => document.querySelector("[data-page]")?.dataset ?? {};
