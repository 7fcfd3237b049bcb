// Following a job's events: Supabase Realtime when the page is configured for it (gaps filled
// from the API by event id), else SSE read with fetch (so the token stays in the Authorization
// header; EventSource would need it in the URL). Both resume after a dropped connection from
// the last event id, so nothing is lost and nothing is shown twice.
import * as api from "./api.js";
import { RealtimeChannel } from "./phoenix.js";

const CATCH_UP_QUIET_MS = 30_000;
const MAX_BACKOFF_MS = 10_000;

export const isTerminal = (e) =>
  e.kind === "job.status" && ["done", "failed", "cancelled"].includes(e.status);

/**
 * Follow `job` (needs id, tenant_id, created_by when known) from event id `after`.
 * `onEvents(list)` gets new events in id order; `onState(text)` the connection's state;
 * `onError(err)` a failure that reconnecting cannot fix (401, 404).
 */
export function follow(job, after, { onEvents, onState, onError }) {
  const f = new Follower(job, after, onEvents, onState, onError);
  f.start();
  return f;
}

class Follower {
  constructor(job, after, onEvents, onState, onError) {
    Object.assign(this, { job, last: after, onEvents, onState, onError });
    this.seen = new Set();
    this.ended = false;
  }

  start() {
    this.ended = false;
    this.abort = new AbortController();
    const cfg = api.getConfig();
    if (cfg.supabase_url && cfg.supabase_publishable_key && this.job.tenant_id) this.realtime(cfg);
    else this.sse();
  }

  stop() {
    this.abort?.abort();
    this.channel?.close();
    clearInterval(this.quiet);
  }

  /** After a retry the job has new events: follow again from the last id seen. */
  restart() {
    this.stop();
    this.start();
  }

  deliver(events) {
    const fresh = [];
    for (const e of events) {
      if (e.job_id !== this.job.id || this.seen.has(e.id) || this.ended) continue;
      this.seen.add(e.id);
      this.last = Math.max(this.last, e.id);
      fresh.push(e);
      if (isTerminal(e)) this.ended = true;
    }
    if (fresh.length) this.onEvents(fresh);
    if (this.ended) {
      this.stop();
      this.onState("job ended");
    }
  }

  // --- SSE over fetch ----------------------------------------------------------------------

  async sse() {
    let delay = 1000;
    const signal = this.abort.signal;
    while (!this.ended && !signal.aborted) {
      try {
        const headers = await api.authHeaders({ Accept: "text/event-stream" });
        if (this.last) headers["Last-Event-ID"] = String(this.last);
        const r = await fetch(`/v1/jobs/${this.job.id}/events`, { headers, signal, cache: "no-store" });
        if (r.status === 204) { this.ended = true; this.onState("job ended"); return; }
        if (!r.ok) {
          const body = await r.json().catch(() => ({}));
          const err = new api.ApiError(r.status, body);
          if (r.status < 500 && r.status !== 429) { this.onError(err); return; }
          throw err;
        }
        this.onState("live (SSE)");
        delay = 1000;
        await this.readStream(r.body);
        // The answer ended without the job's last event (a bounded answer, a proxy): resume.
      } catch (e) {
        if (signal.aborted) return;
        this.onState(`reconnecting in ${Math.round(delay / 1000)} s (${e.message || e})`);
        await new Promise((ok) => setTimeout(ok, delay));
        delay = Math.min(delay * 2, MAX_BACKOFF_MS);
      }
    }
  }

  async readStream(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      const blocks = buf.split(/\r?\n\r?\n/);
      buf = blocks.pop();
      const batch = [];
      for (const block of blocks) {
        const data = [];
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) batch.push(JSON.parse(data.join("\n")));
      }
      if (batch.length) this.deliver(batch);
      if (this.ended) { reader.cancel().catch(() => {}); return; }
    }
  }

  // --- Realtime ----------------------------------------------------------------------------

  realtime(cfg) {
    // The owner's topic carries this job's events (joinable by the owner and the tenant's
    // admins); a server without created_by on the job has only the tenant topic.
    const topic = this.job.created_by
      ? `tenant:${this.job.tenant_id}:user:${this.job.created_by}`
      : `tenant:${this.job.tenant_id}`;
    let held = [];
    this.catchingUp = true;
    const catchUp = async () => {
      this.catchingUp = true;
      try {
        for (;;) {
          const page = await api.call("GET", `/v1/jobs/${this.job.id}/events?after=${this.last}&wait=0`);
          this.deliver(page.events);
          if (page.done || page.events.length === 0 || this.ended) break;
        }
      } catch (e) {
        if (e.status && e.status < 500) this.onError(e);
      } finally {
        this.catchingUp = false;
        const h = held.sort((a, b) => a.id - b.id);
        held = [];
        this.deliver(h);
      }
    };
    this.channel = new RealtimeChannel(cfg.supabase_url, cfg.supabase_publishable_key, topic, {
      token: () => api.token(),
      onJoin: () => { this.onState("live (Realtime)"); catchUp(); },
      onDrop: (why) => { this.catchingUp = true; this.onState(`reconnecting (${why})`); },
      onRefused: (why) => {
        // Not allowed on the topic (or no Realtime): SSE still works with the same token.
        this.channel.close();
        clearInterval(this.quiet);
        this.onState(`Realtime refused (${why}); using SSE`);
        this.sse();
      },
      onBroadcast: (event, payload) => {
        if (event !== "job_events" || !payload || !Array.isArray(payload.events)) return;
        this.lastHeard = Date.now();
        if (this.catchingUp) held.push(...payload.events);
        else this.deliver(payload.events);
      },
    });
    api.onToken((t) => this.channel?.setToken(t));
    this.channel.open();
    // Realtime delivers at most once: ask the API now and then while it is quiet.
    this.lastHeard = Date.now();
    this.quiet = setInterval(() => {
      if (!this.catchingUp && Date.now() - this.lastHeard > CATCH_UP_QUIET_MS) {
        this.lastHeard = Date.now();
        catchUp();
      }
    }, 5000);
  }
}
