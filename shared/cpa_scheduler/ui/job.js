// One job: the graph, the event timeline beside it, a ToDo's details, the buttons, live updates.
import * as api from "./api.js";
import { h, put, badge, clear, fmtTime, fmtClock, fmtDuration, showAnswer } from "./dom.js";
import { GraphView, duration } from "./graph.js";
import { follow, isTerminal } from "./live.js";

const TIMELINE_MAX = 200; // rows kept in the DOM; the count says how many there were
const CRIT_EVERY_MS = 1000;
const DRAW_EVERY_MS = 100;
const UNCONFIRMED = new Set(["confirming", "waiting"]);

export async function show(main, jobId, me, prefetched) {
  const t0 = performance.now();
  let job;
  try {
    const got = prefetched ? await prefetched : null;
    if (got?.error) throw got.error;
    job = got ? got.value : await api.call("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
  } catch (e) {
    const what = e.status === 404 || e.status === 422 ? "Job not found" : "The job could not be loaded";
    main.append(
      h("h1", {}, what),
      h("p", { class: "notfound", role: "alert" }, e.status === 404 || e.status === 422
        ? `Job ${jobId} was not found: it does not exist, or it is not yours to see.`
        : e.message),
      h("p", {}, h("a", { href: "/ui/" }, "Back to the jobs")));
    return;
  }
  document.body.dataset.fetchedAt = String(Math.round(performance.now()));
  new JobPage(main, job, me).mount();
  // Drawn: the frame after the graph was built has painted (ms since navigation started).
  requestAnimationFrame(() => setTimeout(() => {
    performance.measure("cpa:job-drawn", { start: t0 });
    document.body.dataset.drawnAt = String(Math.round(performance.now()));
  }, 0));
}

class JobPage {
  constructor(main, job, me) {
    this.main = main;
    this.job = job;
    this.me = me;
    this.todos = new Map(job.todos.map((t) => [t.id, t]));
    this.byKey = new Map(job.todos.map((t) => [t.key, t]));
    this.dirty = new Set();
    this.pendingEvents = [];
    this.eventCount = 0;
    this.frame = 0;
    this.lastDraw = 0;
    this.lastCrit = 0;
  }

  mount() {
    const job = this.job;
    this.status = h("span", { id: "job-status" }, badge(job.status));
    this.answer = h("p", { class: "answer", role: "status", "aria-live": "polite", id: "answer" });
    this.liveState = h("span", { class: "live", role: "status" }, "connecting…");
    this.cancelBtn = h("button", { type: "button", id: "cancel", onclick: () => this.act("cancel") }, "Cancel job");
    this.retryBtn = h("button", { type: "button", id: "retry", onclick: () => this.act("retry") }, "Retry job");
    this.approvals = h("ul", { class: "approvals", "aria-label": "ToDos waiting for your approval" });
    this.timeline = h("ol", { class: "timeline", id: "timeline", "aria-label": "Events, newest first" });
    this.timelineNote = h("p", { class: "muted" });
    this.details = h("div", { class: "details panel", id: "details", "aria-live": "polite" },
      h("h2", {}, "ToDo"), h("p", { class: "muted" }, "Select a ToDo in the graph (click, or Tab and Enter)."));
    const built = performance.now();
    this.graph = new GraphView(job.todos, (key) => this.select(key));
    performance.measure("cpa:graph-build", { start: built }); // layout, markup, parse
    this.meta = h("div", { class: "jobmeta" });
    this.renderMeta();
    this.main.append(
      h("div", { class: "jobhead" },
        h("h1", {}, job.request || "Job"), this.status, this.cancelBtn, this.retryBtn, this.liveState),
      this.meta,
      this.answer,
      this.approvals,
      h("div", { class: "jobgrid" },
        h("section", { "aria-label": "Graph" },
          h("div", { class: "legend", "aria-hidden": "true" },
            ["waiting", "confirming", "ready", "running", "done", "failed", "cancelled"].map((s) => badge(s)),
            h("span", { class: "crit" }, "━ critical path")),
          h("div", { class: "graphbox" }, this.graph.svg)),
        h("div", { class: "side" },
          this.details,
          h("section", { class: "panel", "aria-labelledby": "tl-title" },
            h("h2", { id: "tl-title" }, "Timeline"), this.timelineNote, this.timeline))));
    this.renderApprovals();
    this.renderButtons();
    this.follower = follow(job, 0, {
      onEvents: (events) => this.queue(events),
      onState: (s) => { this.liveState.textContent = s; },
      onError: (e) => { this.liveState.textContent = `updates stopped: ${e.message}`; },
    });
    // Running ToDos' durations grow: refresh them (and the critical path) once a second.
    this.ticker = setInterval(() => {
      if (["done", "failed", "cancelled"].includes(this.job.status)) return;
      for (const t of this.todos.values()) if (t.status === "running") this.dirty.add(t.key);
      this.schedule();
    }, 1000);
  }

  renderMeta() {
    const j = this.job;
    const done = [...this.todos.values()].filter((t) => t.status === "done").length;
    clear(this.meta);
    put(this.meta,
      h("span", {}, "Job ", h("code", {}, j.id)),
      h("span", {}, `${done} of ${this.todos.size} ToDos done`),
      j.intent ? h("span", {}, `intent ${j.intent}`) : null,
      h("span", {}, `created ${fmtTime(j.created_at)}`),
      j.completed_at ? h("span", {}, `ended ${fmtTime(j.completed_at)}`) : null,
      j.error ? h("span", { class: "st-failed" }, `error: ${j.error}`) : null);
  }

  renderButtons() {
    const s = this.job.status;
    // Both stay enabled: the API decides, and its refusal (409) is shown as the answer.
    this.cancelBtn.title = s === "pending" || s === "running" ? "" : "The job has ended; the API will refuse.";
    this.retryBtn.title = s === "failed" || s === "cancelled" ? "" : "Only a failed or cancelled job can be retried.";
  }

  renderApprovals() {
    clear(this.approvals);
    for (const t of this.todos.values()) {
      if (!t.requires_confirmation || !UNCONFIRMED.has(t.status) || t.confirmed) continue;
      this.approvals.append(h("li", { "data-approve": t.key },
        `${t.key} (${t.action}) waits for your approval `,
        h("button", { type: "button", class: "primary", onclick: () => this.confirm(t, true) }, `Approve ${t.key}`), " ",
        h("button", { type: "button", onclick: () => this.confirm(t, false) }, `Decline ${t.key}`)));
    }
  }

  async act(verb) {
    const label = verb === "cancel" ? "Cancel" : "Retry";
    try {
      const job = await api.call("POST", `/v1/jobs/${this.job.id}/${verb}`);
      showAnswer(this.answer, label, true, `the job is ${job.status}`);
      this.setJobStatus(job.status);
      if (verb === "retry") this.follower.restart();
    } catch (e) {
      showAnswer(this.answer, `${label} refused`, false, e.message);
    }
  }

  async confirm(todo, approved) {
    const label = approved ? `Approve ${todo.key}` : `Decline ${todo.key}`;
    const msg = {
      type: "confirm", sender: `ui:${this.me.user_id}`, receiver: "scheduler",
      conversation_id: this.job.id,
      payload: { todo_id: todo.id, job_id: this.job.id, approved },
    };
    try {
      const reply = await api.call("POST", "/v1/messages", msg);
      const p = reply.payload || {};
      const ok = reply.type !== "refuse";
      showAnswer(this.answer, label, ok, `${reply.type}: ${p.text || p.reason || ""}`);
      if (ok) { todo.confirmed = true; this.renderApprovals(); }
    } catch (e) {
      showAnswer(this.answer, `${label} refused`, false, e.message);
    }
  }

  setJobStatus(status) {
    if (this.job.status === status) return;
    this.job.status = status;
    this.status.replaceChildren(badge(status));
    this.renderButtons();
  }

  queue(events) {
    for (const e of events) {
      this.pendingEvents.push(e);
      this.apply(e);
    }
    this.schedule();
  }

  /** Fold one event into the model (drawing waits for the next frame). */
  apply(e) {
    this.eventCount += 1;
    if (e.kind === "job.status") {
      this.job.status = e.status;
      if (e.data?.error) this.job.error = e.data.error;
      if (isTerminal(e)) this.job.completed_at = e.created_at;
      this.jobChanged = true;
      return;
    }
    const t = e.todo_id && this.todos.get(e.todo_id);
    if (!t || e.kind !== "todo.status") return;
    const d = e.data || {};
    if (e.status === "running" && t.status !== "running") {
      t.started_at = e.created_at;
      t.finished_at = null;
    }
    if (["done", "failed", "cancelled"].includes(e.status)) t.finished_at = e.created_at;
    if (t.requires_confirmation) this.approvalsChanged = true;
    t.status = e.status;
    if (d.attempts !== undefined) t.attempts = d.attempts;
    if (d.error !== undefined) t.error = d.error;
    if (d.result !== undefined) t.result = d.result;
    this.dirty.add(t.key);
  }

  /** Draw at the next frame, but at most every DRAW_EVERY_MS: under a flood of events (100
   *  ToDos changing per second) each draw takes many changes at once, so the fixed cost of
   *  a draw (style, layout of the timeline) is paid ten times a second, not sixty. */
  schedule() {
    if (this.frame) return;
    const wait = Math.max(0, DRAW_EVERY_MS - (performance.now() - this.lastDraw));
    this.frame = setTimeout(() => requestAnimationFrame(() => this.draw()), wait);
  }

  /** One frame's drawing: the changed ToDos, the new timeline rows, the critical path. */
  draw() {
    const began = performance.now();
    this.frame = 0;
    this.lastDraw = began;
    const now = Date.now();
    for (const key of this.dirty) this.graph.update(key, now);
    const any = this.dirty.size > 0;
    this.dirty.clear();
    if (now - this.lastCrit > CRIT_EVERY_MS && any) {
      this.lastCrit = now;
      this.graph.highlight(now);
    }
    if (this.pendingEvents.length) {
      const rows = this.pendingEvents.slice(-TIMELINE_MAX).reverse().map((e) => this.eventRow(e));
      this.pendingEvents = [];
      this.timeline.prepend(...rows);
      while (this.timeline.childElementCount > TIMELINE_MAX) this.timeline.lastElementChild.remove();
      this.timelineNote.textContent = this.eventCount > TIMELINE_MAX
        ? `${this.eventCount} events; the newest ${TIMELINE_MAX} are shown.` : `${this.eventCount} events.`;
      this.renderMeta();
      if (this.approvalsChanged) this.renderApprovals();
      this.approvalsChanged = false;
      if (this.selected) this.renderDetails();
    }
    if (this.jobChanged) {
      this.jobChanged = false;
      const s = this.job.status;
      this.job.status = null; // force the redraw in setJobStatus
      this.setJobStatus(s);
      if (["done", "failed", "cancelled"].includes(s)) {
        this.graph.highlight(now);
        this.reconcile(0);
      }
    }
    performance.measure("cpa:draw", { start: began });
  }

  /** After the job's last event, read the job once (and again while a ToDo still runs: an
   *  older server lets running ToDos finish after a cancel), so times and results are exact. */
  reconcile(round) {
    setTimeout(async () => {
      let fresh;
      try {
        fresh = await api.call("GET", `/v1/jobs/${this.job.id}`);
      } catch {
        return;
      }
      for (const f of fresh.todos) {
        const t = this.todos.get(f.id);
        if (!t) continue;
        Object.assign(t, f);
        this.dirty.add(t.key);
      }
      Object.assign(this.job, { ...fresh, todos: undefined });
      this.jobChanged = false;
      this.renderMeta();
      this.schedule();
      if (round < 5 && fresh.todos.some((t) => t.status === "running")) this.reconcile(round + 1);
    }, round ? 2000 : 0);
  }

  eventRow(e) {
    const t = e.todo_id && this.todos.get(e.todo_id);
    const what = e.kind === "job.status" ? "job" : t ? t.key : e.data?.key || "";
    const extra = e.kind === "notification" ? ` “${e.data?.text || e.data?.message || ""}”`
      : e.data?.error ? ` (${e.data.error})` : "";
    return h("li", { "data-event": e.id },
      h("time", { datetime: e.created_at }, fmtClock(e.created_at)),
      `${e.kind} ${what}${e.status ? ` → ${e.status}` : ""}${extra}`);
  }

  select(key) {
    this.selected = key;
    this.graph.select(key);
    this.renderDetails();
  }

  renderDetails() {
    const t = this.byKey.get(this.selected);
    if (!t) return;
    const json = (v) => h("pre", {}, v === undefined || v === null ? "—" : JSON.stringify(v, null, 2));
    const actions = [];
    if (t.requires_confirmation && UNCONFIRMED.has(t.status) && !t.confirmed) {
      actions.push(
        h("button", { type: "button", class: "primary", onclick: () => this.confirm(t, true) }, "Approve"), " ",
        h("button", { type: "button", onclick: () => this.confirm(t, false) }, "Decline"));
    }
    clear(this.details);
    put(this.details,
      h("h2", {}, `ToDo ${t.key}`),
      h("dl", {},
        h("dt", {}, "Status"), h("dd", {}, badge(t.status)),
        h("dt", {}, "Action"), h("dd", {}, `${t.action} (${t.target})`),
        h("dt", {}, "Depends on"), h("dd", {}, t.depends_on.join(", ") || "—"),
        h("dt", {}, "Attempts"), h("dd", {}, String(t.attempts ?? 0)),
        h("dt", {}, "Duration"), h("dd", {}, fmtDuration(duration(t)) || "—"),
        h("dt", {}, "Started"), h("dd", {}, fmtTime(t.started_at)),
        h("dt", {}, "Finished"), h("dd", {}, fmtTime(t.finished_at)),
        t.run_at ? [h("dt", {}, "Runs at"), h("dd", {}, fmtTime(t.run_at))] : null,
        h("dt", {}, "Params"), h("dd", {}, json(t.params)),
        h("dt", {}, "Result"), h("dd", {}, json(t.result)),
        h("dt", {}, "Error"), h("dd", {}, t.error || "—")),
      actions.length ? h("p", {}, ...actions) : null);
  }
}
