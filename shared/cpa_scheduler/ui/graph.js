// The job graph: left to right by dependency (a ToDo's column is the length of the longest
// chain of dependencies before it), rows ordered by their dependencies' rows, drawn once as SVG
// and afterwards updated in place (a class and two text nodes per changed ToDo).

const SVG = "http://www.w3.org/2000/svg";
export const NODE_W = 200;
export const NODE_H = 50;
const COL_GAP = 56;
const ROW_GAP = 12;
const PAD = 12;
const CENTRE_UP_TO = 10; // rows

/** Columns and rows for `todos` (each with key, depends_on). */
export function layout(todos) {
  const byKey = new Map(todos.map((t) => [t.key, t]));
  const col = new Map();
  const order = topo(todos, byKey);
  for (const t of order) {
    let c = 0;
    for (const d of t.depends_on) if (col.has(d)) c = Math.max(c, col.get(d) + 1);
    col.set(t.key, c);
  }
  const columns = [];
  for (const t of order) (columns[col.get(t.key)] ??= []).push(t);
  const row = new Map();
  columns.forEach((list, c) => {
    if (c > 0) {
      // Barycentre: a ToDo sits near the mean row of its dependencies, so edges stay short.
      const centre = (t) => {
        const rows = t.depends_on.filter((d) => row.has(d)).map((d) => row.get(d));
        return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : 0;
      };
      const keyed = list.map((t, i) => [centre(t), i, t]);
      keyed.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
      list.splice(0, list.length, ...keyed.map((k) => k[2]));
    }
    list.forEach((t, r) => row.set(t.key, r));
  });
  const rows = Math.max(1, ...columns.map((l) => l.length));
  const pos = new Map();
  for (const t of order) {
    const c = col.get(t.key);
    const r = row.get(t.key);
    // A small graph's short columns are centred against the tallest one; a large graph's stay
    // at the top, where the view opens.
    const offset = rows <= CENTRE_UP_TO ? ((rows - columns[c].length) * (NODE_H + ROW_GAP)) / 2 : 0;
    pos.set(t.key, { c, x: PAD + c * (NODE_W + COL_GAP), y: PAD + offset + r * (NODE_H + ROW_GAP) });
  }
  return {
    pos,
    columns: columns.length,
    width: PAD * 2 + columns.length * NODE_W + Math.max(0, columns.length - 1) * COL_GAP,
    height: PAD * 2 + rows * NODE_H + (rows - 1) * ROW_GAP,
    order,
  };
}

/** ToDos in dependency order (Kahn); unknown dependencies are ignored. */
export function topo(todos, byKey = new Map(todos.map((t) => [t.key, t]))) {
  const indeg = new Map();
  const out = new Map();
  for (const t of todos) {
    indeg.set(t.key, 0);
    out.set(t.key, []);
  }
  for (const t of todos) {
    for (const d of t.depends_on) {
      if (!byKey.has(d)) continue;
      indeg.set(t.key, indeg.get(t.key) + 1);
      out.get(d).push(t.key);
    }
  }
  const queue = todos.filter((t) => indeg.get(t.key) === 0).map((t) => t.key);
  const order = [];
  for (let i = 0; i < queue.length; i++) {
    const k = queue[i];
    order.push(byKey.get(k));
    for (const n of out.get(k)) {
      indeg.set(n, indeg.get(n) - 1);
      if (indeg.get(n) === 0) queue.push(n);
    }
  }
  return order;
}

/** How long a ToDo has taken (ms): finished − started, or now − started while it runs. */
export function duration(t, now = Date.now()) {
  if (!t.started_at) return null;
  const end = t.finished_at ? Date.parse(t.finished_at) : t.status === "running" ? now : null;
  return end === null ? null : Math.max(0, end - Date.parse(t.started_at));
}

/** The critical path: the chain of dependencies with the greatest total duration (ToDos that
 *  have not run weigh 1 ms, so before anything runs it is the longest chain): its keys, and
 *  its edges as "from>to". */
export function criticalPath(order, now = Date.now()) {
  const best = new Map();
  const prev = new Map();
  let end = null;
  for (const t of order) {
    let base = 0;
    let from = null;
    for (const d of t.depends_on) {
      const b = best.get(d);
      if (b !== undefined && b > base) { base = b; from = d; }
    }
    const total = base + (duration(t, now) ?? 0) + 1;
    best.set(t.key, total);
    prev.set(t.key, from);
    if (end === null || total > best.get(end)) end = t.key;
  }
  const nodes = new Set();
  const edges = new Set();
  for (let k = end; k !== null && k !== undefined; k = prev.get(k)) {
    nodes.add(k);
    if (prev.get(k)) edges.add(`${prev.get(k)}>${k}`);
  }
  return { nodes, edges };
}

const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ESC[c]);
}

function el(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}

function label(t, now) {
  const d = duration(t, now);
  const parts = [t.status];
  if (d !== null) parts.push(formatMs(d));
  if (t.attempts) parts.push(`attempt ${t.attempts}`);
  return parts.join(" · ");
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : ms < 60_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`;
}

function clip(s, n) {
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

/** Draws the graph; `onSelect(key)` on click, Enter or Space. The edges are one <svg> under
 *  the nodes, and each column of ToDos an <svg> of its own with `content-visibility: auto`,
 *  so the browser lays out and paints only the columns in view (a 1,000-ToDo job is tens of
 *  columns, of which a few show). */
export class GraphView {
  constructor(todos, onSelect) {
    this.todos = new Map(todos.map((t) => [t.key, t]));
    this.geo = layout(todos);
    this.nodes = new Map();
    this.edges = new Map(); // "from>to" -> path
    this.crit = new Set();
    const { width, height } = this.geo;
    // One markup string parsed once: for 1,000 ToDos about five times faster than creating
    // the 6,000 elements one by one. Every text is escaped (esc), so a key stays text.
    const now = Date.now();
    const edges = [];
    const columns = Array.from({ length: this.geo.columns }, () => []);
    for (const t of this.geo.order) {
      const p = this.geo.pos.get(t.key);
      for (const d of t.depends_on) {
        const q = this.geo.pos.get(d);
        if (!q) continue;
        const x1 = q.x + NODE_W, y1 = q.y + NODE_H / 2, x2 = p.x, y2 = p.y + NODE_H / 2;
        const dx = (x2 - x1) / 2;
        edges.push(`<path class="edge" data-edge="${esc(`${d}>${t.key}`)}" d="M${x1} ${y1}C${x1 + dx} ${y1} ${x2 - dx} ${y2} ${x2} ${y2}"/>`);
      }
      const key = esc(t.key);
      columns[p.c].push(`<g class="node st-${esc(t.status)}" transform="translate(2,${p.y})" tabindex="0" role="button" ` +
        `data-key="${key}" data-status="${esc(t.status)}" aria-label="${key}, ${esc(t.action)}: ${esc(t.status)}">` +
        `<title>${key} (${esc(t.action)}): ${esc(t.status)}</title>` +
        `<rect width="${NODE_W}" height="${NODE_H}" rx="6"/><rect class="bar" width="5" height="${NODE_H}" rx="2"/>` +
        `<text class="k" x="12" y="19">${esc(clip(`${t.key} · ${t.action}`, 28))}</text>` +
        `<text class="s" x="12" y="38">${esc(label(t, now))}</text></g>`);
    }
    const root = document.createElement("div");
    root.className = "graph";
    root.setAttribute("role", "group");
    root.setAttribute("aria-label", `Graph of ${todos.length} ToDos, left to right by dependency`);
    root.innerHTML =
      `<svg class="edges" xmlns="${SVG}" width="${width}" height="${height}" aria-hidden="true">${edges.join("")}</svg>` +
      `<div class="cols">${columns.map((c) =>
        `<svg class="col" xmlns="${SVG}" width="${NODE_W + 4}" height="${height}">${c.join("")}</svg>`).join("")}</div>`;
    for (const path of root.querySelectorAll("path.edge")) this.edges.set(path.dataset.edge, path);
    for (const g of root.querySelectorAll("g.node")) {
      this.nodes.set(g.dataset.key, { g, title: g.firstElementChild, s: g.lastElementChild });
    }
    const pick = (ev) => ev.target.closest?.("g.node")?.dataset.key;
    root.addEventListener("click", (ev) => { const k = pick(ev); if (k !== undefined) onSelect(k); });
    root.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter" && ev.key !== " ") return;
      const k = pick(ev);
      if (k !== undefined) { ev.preventDefault(); onSelect(k); }
    });
    this.svg = root;
    this.highlight();
  }

  /** Re-draw one ToDo after it changed (status, times, attempts). */
  update(key, now = Date.now()) {
    const t = this.todos.get(key);
    const n = this.nodes.get(key);
    if (!t || !n) return;
    const cls = `node st-${t.status}${this.crit.has(key) ? " crit" : ""}${this.selected === key ? " sel" : ""}`;
    if (n.g.getAttribute("class") !== cls) n.g.setAttribute("class", cls);
    if (n.g.dataset.status !== t.status) {
      n.g.dataset.status = t.status;
      n.g.setAttribute("aria-label", `${t.key}, ${t.action}: ${t.status}`);
      n.title.textContent = `${t.key} (${t.action}): ${t.status}`;
    }
    const text = label(t, now);
    if (n.s.textContent !== text) n.s.textContent = text;
  }

  select(key) {
    const old = this.selected;
    this.selected = key;
    if (old) this.update(old);
    if (key) this.update(key);
  }

  /** Recompute and mark the critical path. */
  highlight(now = Date.now()) {
    const { nodes: path, edges } = criticalPath(this.geo.order, now);
    const changed = new Set();
    for (const k of this.crit) if (!path.has(k)) changed.add(k);
    for (const k of path) if (!this.crit.has(k)) changed.add(k);
    this.crit = path;
    for (const [id, p] of this.edges) {
      const on = edges.has(id);
      if (p.classList.contains("crit") !== on) p.classList.toggle("crit", on);
    }
    for (const k of changed) this.update(k, now);
  }
}
