// Desktop agents: online or offline (last seen) and the actions each offers (GET /v1/agents).
import * as api from "./api.js";
import { h, fmtTime } from "./dom.js";

export async function show(main) {
  main.append(h("h1", {}, "Agents"));
  let agents;
  try {
    ({ agents } = await api.call("GET", "/v1/agents"));
  } catch (e) {
    const text = e.status === 404
      ? "This server does not list agents yet (GET /v1/agents answered 404). Update the scheduler to see your agents here."
      : e.message;
    main.append(h("p", { class: "answer err", role: "status" }, text));
    return;
  }
  if (!agents.length) {
    main.append(h("p", { class: "muted" }, "No agents yet. Start one with cpa-scheduler agent."));
    return;
  }
  main.append(h("table", {},
    h("thead", {}, h("tr", {}, ["Agent", "State", "Last seen", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, agents.map((a) => h("tr", { "data-agent": a.agent_id },
      h("td", {}, a.name || a.agent_id, a.name ? h("div", { class: "muted mono" }, a.agent_id) : null),
      h("td", {}, h("span", { class: a.online ? "online" : "offline" }, a.online ? "● online" : "○ offline")),
      h("td", {}, fmtTime(a.last_seen_at)),
      h("td", {}, (a.actions || []).join(", ") || "—"))))));
}
