// Schedules: the caller's recurring jobs, with pause, resume and delete.
import * as api from "./api.js";
import { h, clear, fmtTime, showAnswer } from "./dom.js";

export async function show(main) {
  const answer = h("p", { class: "answer", role: "status", "aria-live": "polite" });
  const tbody = h("tbody");
  const note = h("p", { class: "muted", role: "status" });

  async function load() {
    try {
      const { schedules } = await api.call("GET", "/v1/schedules");
      clear(tbody);
      tbody.append(...schedules.map(row));
      note.textContent = schedules.length ? "" : "No schedules. Create one with cpa-scheduler schedule add, or a request such as “Jeden Montag um 8 Uhr …”.";
    } catch (e) {
      note.textContent = e.message;
    }
  }

  async function act(s, verb) {
    const label = `${verb[0].toUpperCase()}${verb.slice(1)} ${s.cron}`;
    if (verb === "delete" && !confirm(`Delete the schedule “${s.request || s.cron}”? Its jobs stay.`)) return;
    try {
      if (verb === "delete") await api.call("DELETE", `/v1/schedules/${s.id}`);
      else await api.call("POST", `/v1/schedules/${s.id}/${verb}`);
      showAnswer(answer, label, true, verb === "delete" ? "deleted" : `${verb}d`);
      await load();
    } catch (e) {
      showAnswer(answer, `${label} refused`, false, e.message);
    }
  }

  function row(s) {
    const what = s.request || `graph of ${s.graph?.todos?.length ?? "?"} ToDos`;
    return h("tr", { "data-schedule": s.id },
      h("td", { class: "req" }, what),
      h("td", {}, h("code", {}, s.cron), ` (${s.time_zone})`),
      h("td", {}, s.paused ? "paused" : "active"),
      h("td", {}, s.paused ? "—" : fmtTime(s.next_run_at)),
      h("td", {}, s.last_job_id ? h("a", { href: `/ui/jobs/${s.last_job_id}` }, fmtTime(s.last_run_at)) : "—"),
      h("td", {},
        s.paused
          ? h("button", { type: "button", onclick: () => act(s, "resume"), "aria-label": `Resume ${what}` }, "Resume")
          : h("button", { type: "button", onclick: () => act(s, "pause"), "aria-label": `Pause ${what}` }, "Pause"),
        " ",
        h("button", { type: "button", onclick: () => act(s, "delete"), "aria-label": `Delete ${what}` }, "Delete")));
  }

  main.append(
    h("h1", {}, "Schedules"), answer, note,
    h("table", {},
      h("thead", {}, h("tr", {},
        ["Request", "Cron", "State", "Next run", "Last run", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
      tbody));
  await load();
}
