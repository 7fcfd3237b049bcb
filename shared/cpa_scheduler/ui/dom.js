// Small DOM helpers. Text always goes in as text nodes (never innerHTML), so nothing a job
// carries can become markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

/** Element.append without the "null" text it makes of null: skips null, undefined, false. */
export function put(el, ...children) {
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function badge(status) {
  return h("span", { class: `badge st-${status}`, "data-status": status }, status);
}

// Formatters made once: toLocaleString builds one per call, a cost that shows when a
// flood of events becomes timeline rows.
const DATE_TIME = new Intl.DateTimeFormat(undefined, { dateStyle: "short", timeStyle: "medium" });
const CLOCK = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });

export function fmtTime(iso) {
  return iso ? DATE_TIME.format(new Date(iso)) : "—";
}

export function fmtClock(iso) {
  return iso ? CLOCK.format(new Date(iso)) : "";
}

export function fmtDuration(ms) {
  if (ms === null || ms === undefined || !isFinite(ms)) return "";
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const m = Math.floor(ms / 60_000);
  if (m < 60) return `${m} min ${Math.round((ms % 60_000) / 1000)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** Show an API answer (or refusal) in an output region. */
export function showAnswer(region, label, ok, text) {
  region.className = `answer ${ok ? "ok" : "err"}`;
  region.textContent = `${label}: ${text}`;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
}
