// The job list: status filter, text search and paging over GET /v1/jobs (cursor pages).
import * as api from "./api.js";
import { h, badge, clear, fmtTime } from "./dom.js";

const PAGE = 25;
const SEARCH_PAGES = 10; // a search reads at most this many pages of 200 (the newest 2,000 jobs)
const STATUSES = ["pending", "running", "done", "failed", "cancelled"];

export async function show(main) {
  const params = new URLSearchParams(location.search);
  const status = h("select", { id: "status" },
    h("option", { value: "" }, "any"),
    STATUSES.map((s) => h("option", { value: s, selected: params.get("status") === s }, s)));
  const search = h("input", { id: "q", type: "search", value: params.get("q") || "",
    placeholder: "request, intent or id" });
  const tbody = h("tbody");
  const note = h("p", { class: "muted", role: "status" });
  const newer = h("button", { type: "button", disabled: true }, "← Newer");
  const older = h("button", { type: "button", disabled: true }, "Older →");
  const cursors = [null]; // cursor of each page shown so far
  let at = 0;

  async function load() {
    const q = search.value.trim().toLowerCase();
    const url = new URL(location.href);
    url.search = "";
    if (status.value) url.searchParams.set("status", status.value);
    if (q) url.searchParams.set("q", q);
    history.replaceState(null, "", url);
    note.textContent = "Loading…";
    try {
      let jobs, next;
      if (q) {
        ({ jobs, next } = await searchJobs(q, status.value));
        note.textContent = `${jobs.length} job(s) match “${q}”` +
          (next ? ` among the newest ${SEARCH_PAGES * 200}.` : ".");
        newer.disabled = older.disabled = true;
      } else {
        const page = await api.call("GET", listUrl(status.value, PAGE, cursors[at]));
        jobs = page.jobs;
        cursors[at + 1] = page.next_cursor;
        newer.disabled = at === 0;
        older.disabled = !page.next_cursor;
        note.textContent = jobs.length ? `Page ${at + 1}` : "No jobs.";
      }
      clear(tbody);
      tbody.append(...jobs.map(row));
    } catch (e) {
      note.textContent = e.message;
    }
  }

  status.addEventListener("change", () => { at = 0; cursors.length = 1; load(); });
  let timer;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { at = 0; cursors.length = 1; load(); }, 250);
  });
  newer.addEventListener("click", () => { if (at > 0) { at -= 1; load(); } });
  older.addEventListener("click", () => { if (cursors[at + 1]) { at += 1; load(); } });

  main.append(
    h("h1", {}, "Jobs"),
    h("div", { class: "toolbar", role: "search" },
      h("label", { for: "status" }, "Status", status),
      h("label", { for: "q" }, "Search", search),
      newer, older),
    note,
    h("table", {},
      h("caption", { class: "muted" }, "Your jobs, newest first"),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, "Request"), h("th", { scope: "col" }, "Status"),
        h("th", { scope: "col" }, "Intent"), h("th", { scope: "col" }, "Created"),
        h("th", { scope: "col" }, "Job"))),
      tbody));
  await load();
}

function listUrl(status, limit, cursor) {
  const p = new URLSearchParams({ limit: String(limit) });
  if (status) p.set("status", status);
  if (cursor) p.set("cursor", cursor);
  return `/v1/jobs?${p}`;
}

async function searchJobs(q, status) {
  const found = [];
  let cursor = null;
  for (let i = 0; i < SEARCH_PAGES; i++) {
    const page = await api.call("GET", listUrl(status, 200, cursor));
    for (const j of page.jobs) {
      const text = `${j.request || ""} ${j.intent || ""} ${j.id} ${j.error || ""}`.toLowerCase();
      if (text.includes(q)) found.push(j);
    }
    cursor = page.next_cursor;
    if (!cursor) break;
  }
  return { jobs: found, next: cursor };
}

function row(j) {
  return h("tr", { "data-job": j.id },
    h("td", { class: "req" }, h("a", { href: `/ui/jobs/${j.id}` }, j.request || "(explicit graph)")),
    h("td", {}, badge(j.status)),
    h("td", {}, j.intent || ""),
    h("td", {}, fmtTime(j.created_at)),
    h("td", { class: "mono" }, j.id.slice(0, 8)));
}
