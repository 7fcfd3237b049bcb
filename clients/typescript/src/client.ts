/**
 * The CPA Scheduler client: jobs, schedules, progress (`follow`) and the agent's calls.
 *
 * Uses only `fetch`, streams and timers, so the same code runs in Node 20+, browsers and
 * Electron renderers. Realtime goes through supabase-js (on Node below 22 with `ws`).
 */
import type { RealtimeChannel, SupabaseClient } from "@supabase/supabase-js";
import { AuthError, CpaError, UnavailableError, errorFromAnswer } from "./errors.js";
import {
  type ChannelItem,
  RealtimeUnavailable,
  type WebSocketConstructor,
  createSupabase,
  joinPrivate,
} from "./realtime.js";
import { readSse } from "./sse.js";
import {
  type AgentList,
  type AssignMessage,
  type ClaimBody,
  type EventPage,
  type GraphSpec,
  type Job,
  type JobCreate,
  type JobPage,
  type JobStatus,
  type Message,
  type ProgressEvent,
  type Schedule,
  type ScheduleCreate,
  isTerminal,
} from "./types.js";
import { Inbox, isAbort, sleep } from "./util.js";

/** A fixed access token, or a function that returns the current one (called per request). */
export type TokenSource = string | (() => string | Promise<string>);

export interface RealtimeOptions {
  /** How long a (re)join may take before `follow` goes on over the API (default 10 s). */
  joinTimeoutMs?: number;
  /**
   * Ask the API for missed events this often while the channel is quiet (default 30 s):
   * Realtime delivers at most once, so a message lost in transit is found within this time.
   */
  checkEveryMs?: number;
  /** The first reconnect delay of the socket, doubled per try up to 10 s (default 1 s). */
  reconnectAfterMs?: number;
  /** More options for supabase-js's RealtimeClient (e.g. `vsn`, `heartbeatIntervalMs`). */
  clientOptions?: Record<string, unknown>;
}

export interface ClientOptions {
  /** The API, e.g. `http://127.0.0.1:8000` or your deployment's URL. */
  baseUrl: string;
  /** The user's access token (or a provider of the current one). */
  token?: TokenSource;
  /**
   * A signed-in supabase-js client: its session's token is used (supabase-js refreshes it)
   * and its Realtime carries `follow` and the agent's wake-ups.
   */
  supabase?: SupabaseClient;
  /** The Supabase project URL and publishable key: Realtime (and `session`) without `supabase`. */
  supabaseUrl?: string;
  supabaseKey?: string;
  /** A Supabase Auth session; supabase-js refreshes its token before it expires. */
  session?: { access_token: string; refresh_token: string };
  /** Realtime settings, or `false` to follow over the API even where Supabase is configured. */
  realtime?: boolean | RealtimeOptions;
  /** A WebSocket constructor for Node below 22 (by default `ws` is imported when needed). */
  transport?: WebSocketConstructor;
  /** Act for this tenant (`X-CPA-Tenant`), for a user in several tenants. */
  tenant?: string;
  /** A fetch to use instead of the global one. */
  fetch?: typeof fetch;
}

export interface SubmitOptions {
  /** The request text (routed by intent, or planned); or give `graph`. */
  request?: string;
  graph?: GraphSpec;
  /** IANA zone the times in `request` are read in (default UTC). */
  time_zone?: string;
  /** No ToDo of the job starts earlier (RFC 3339 with an offset, or a Date). */
  run_at?: string | Date;
  priority?: number;
  /** A repeated key gets the same job instead of a second one. */
  idempotencyKey?: string;
  signal?: AbortSignal;
}

export interface FollowOptions {
  /** Resume after this event id (the last one you processed). */
  after?: number;
  /** `auto` (default): Realtime when configured, else SSE. `poll`: JSON long-polling. */
  via?: "auto" | "realtime" | "sse" | "poll";
  /** Ends the iteration when aborted. */
  signal?: AbortSignal;
  /** Consecutive failed reconnects before giving up with UnavailableError (default 20). */
  reconnects?: number;
}

interface CallOptions {
  body?: unknown;
  query?: Record<string, string | number | boolean | undefined | null>;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

/** Where a follow is: the ids it delivered and the highest one (the resume cursor). */
interface Cursor {
  seen: Set<number>;
  last: number;
}

export class CpaClient {
  readonly baseUrl: string;
  private readonly options: ClientOptions;
  private readonly fetcher: typeof fetch;
  private supabasePromise: Promise<SupabaseClient> | undefined;

  constructor(options: ClientOptions) {
    this.options = options;
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.fetcher = options.fetch ?? globalThis.fetch.bind(globalThis);
    if (options.session && !options.supabase && !(options.supabaseUrl && options.supabaseKey)) {
      throw new CpaError("A `session` needs `supabaseUrl` and `supabaseKey` (or a `supabase` client) to refresh it.", {
        code: "config_invalid",
      });
    }
    if (options.supabase) this.supabasePromise = Promise.resolve(options.supabase);
  }

  // tokens and HTTP ------------------------------------------------------------------------

  /** The current access token: the given one, the provider's, or the Supabase session's. */
  async accessToken(): Promise<string> {
    const token = this.options.token;
    if (typeof token === "string") return token;
    if (typeof token === "function") return await token();
    if (this.options.supabase || this.options.session) {
      const sb = await this.supabase();
      // getSession refreshes an expired session through the refresh token.
      const { data, error } = await sb.auth.getSession();
      if (data.session) return data.session.access_token;
      throw new AuthError(`The Supabase client has no session (${error?.message ?? "signed out"}); sign in again.`, {
        code: "unauthenticated",
        status: 401,
      });
    }
    throw new AuthError("No access token: pass `token`, `session` or a signed-in `supabase` client.", {
      code: "unauthenticated",
      status: 401,
    });
  }

  /** Whether `follow` and the agent use Realtime. */
  get realtimeEnabled(): boolean {
    const o = this.options;
    return o.realtime !== false && Boolean(o.supabase || (o.supabaseUrl && o.supabaseKey));
  }

  private get realtimeOptions(): Required<RealtimeOptions> {
    const given = typeof this.options.realtime === "object" ? this.options.realtime : {};
    return { joinTimeoutMs: 10_000, checkEveryMs: 30_000, reconnectAfterMs: 1_000, clientOptions: {}, ...given };
  }

  /** The supabase-js client Realtime (and a given session) go through. */
  supabase(): Promise<SupabaseClient> {
    const o = this.options;
    if (!this.supabasePromise) {
      if (!o.supabaseUrl || !o.supabaseKey) {
        return Promise.reject(
          new CpaError("Realtime is not configured: pass `supabaseUrl` and `supabaseKey`, or a `supabase` client.", {
            code: "config_invalid",
          }),
        );
      }
      this.supabasePromise = createSupabase({
        url: o.supabaseUrl,
        key: o.supabaseKey,
        transport: o.transport,
        session: o.session,
        accessToken: o.session ? undefined : () => this.accessToken(),
        reconnectAfterMs: this.realtimeOptions.reconnectAfterMs,
        clientOptions: this.realtimeOptions.clientOptions,
      });
      this.supabasePromise.catch(() => (this.supabasePromise = undefined));
    }
    return this.supabasePromise;
  }

  private async headers(extra?: Record<string, string>): Promise<Record<string, string>> {
    const headers: Record<string, string> = { Authorization: `Bearer ${await this.accessToken()}`, ...extra };
    if (this.options.tenant) headers["X-CPA-Tenant"] = this.options.tenant;
    return headers;
  }

  private url(path: string, query?: CallOptions["query"]): string {
    // A relative baseUrl ("/api" on the page's own origin) resolves against the page.
    const url = new URL(this.baseUrl + path, (globalThis as { location?: { href: string } }).location?.href);
    for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined && v !== null) url.searchParams.set(k, String(v));
    return url.toString();
  }

  /** `fetch` with the token; network failures become UnavailableError, answers >= 400 typed errors. */
  private async raw(method: string, path: string, call: CallOptions = {}): Promise<Response> {
    const headers = await this.headers(call.headers);
    let body: string | undefined;
    if (call.body !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(call.body);
    }
    let response: Response;
    try {
      response = await this.fetcher(this.url(path, call.query), { method, headers, body, signal: call.signal });
    } catch (error) {
      if (isAbort(error, call.signal)) throw error;
      throw new UnavailableError(
        `The scheduler at ${this.baseUrl} is unreachable (${(error as Error).message}); is it running, and is the URL right?`,
        { code: "unavailable", cause: error },
      );
    }
    if (response.status >= 400) throw errorFromAnswer(response.status, await response.text(), response.headers);
    return response;
  }

  private async call<T>(method: string, path: string, call: CallOptions = {}): Promise<T> {
    const response = await this.raw(method, path, call);
    const text = await response.text();
    return (text ? JSON.parse(text) : undefined) as T;
  }

  // jobs -----------------------------------------------------------------------------------

  /** Create a job from a request text or an explicit graph (201 with the job). */
  async submit(input: string | SubmitOptions): Promise<Job> {
    const o: SubmitOptions = typeof input === "string" ? { request: input } : input;
    const body: JobCreate = o.graph ? { graph: o.graph } : { request: o.request ?? null };
    if (o.time_zone) body.time_zone = o.time_zone;
    if (o.run_at) body.run_at = o.run_at instanceof Date ? o.run_at.toISOString() : o.run_at;
    if (o.priority !== undefined) body.priority = o.priority;
    const headers = o.idempotencyKey ? { "Idempotency-Key": o.idempotencyKey } : undefined;
    return this.call<Job>("POST", "/v1/jobs", { body, headers, signal: o.signal });
  }

  /** The job with its ToDos. */
  get(jobId: string, signal?: AbortSignal): Promise<Job> {
    return this.call<Job>("GET", `/v1/jobs/${encodeURIComponent(jobId)}`, { signal });
  }

  /** One page of the jobs, newest first; pass `next_cursor` as `cursor` for the next page. */
  list(options: { status?: JobStatus; limit?: number; cursor?: string; signal?: AbortSignal } = {}): Promise<JobPage> {
    const { status, limit, cursor, signal } = options;
    return this.call<JobPage>("GET", "/v1/jobs", { query: { status, limit, cursor }, signal });
  }

  /** Every job across pages, newest first. */
  async *listAll(options: { status?: JobStatus; pageSize?: number; signal?: AbortSignal } = {}): AsyncGenerator<Job> {
    let cursor: string | undefined;
    do {
      const page = await this.list({ status: options.status, limit: options.pageSize, cursor, signal: options.signal });
      yield* page.jobs;
      cursor = page.next_cursor ?? undefined;
    } while (cursor);
  }

  cancel(jobId: string, signal?: AbortSignal): Promise<Job> {
    return this.call<Job>("POST", `/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { signal });
  }

  retry(jobId: string, signal?: AbortSignal): Promise<Job> {
    return this.call<Job>("POST", `/v1/jobs/${encodeURIComponent(jobId)}/retry`, { signal });
  }

  /** One JSON long-poll: the events after `after`, waiting up to `wait` s for one (0-25). */
  events(jobId: string, options: { after?: number; wait?: number; signal?: AbortSignal } = {}): Promise<EventPage> {
    const { after = 0, wait = 0, signal } = options;
    return this.call<EventPage>("GET", `/v1/jobs/${encodeURIComponent(jobId)}/events`, {
      query: { after, wait },
      signal,
    });
  }

  // schedules ------------------------------------------------------------------------------

  createSchedule(body: ScheduleCreate, signal?: AbortSignal): Promise<Schedule> {
    return this.call<Schedule>("POST", "/v1/schedules", { body, signal });
  }

  async listSchedules(signal?: AbortSignal): Promise<Schedule[]> {
    return (await this.call<{ schedules: Schedule[] }>("GET", "/v1/schedules", { signal })).schedules;
  }

  getSchedule(id: string, signal?: AbortSignal): Promise<Schedule> {
    return this.call<Schedule>("GET", `/v1/schedules/${encodeURIComponent(id)}`, { signal });
  }

  pauseSchedule(id: string, signal?: AbortSignal): Promise<Schedule> {
    return this.call<Schedule>("POST", `/v1/schedules/${encodeURIComponent(id)}/pause`, { signal });
  }

  resumeSchedule(id: string, signal?: AbortSignal): Promise<Schedule> {
    return this.call<Schedule>("POST", `/v1/schedules/${encodeURIComponent(id)}/resume`, { signal });
  }

  async deleteSchedule(id: string, signal?: AbortSignal): Promise<void> {
    await this.call<void>("DELETE", `/v1/schedules/${encodeURIComponent(id)}`, { signal });
  }

  // agent calls ----------------------------------------------------------------------------

  /** Claim desktop ToDos for an agent: `assign` messages (`wait`: long-poll seconds, 0-20). */
  async claim(body: ClaimBody, signal?: AbortSignal): Promise<AssignMessage[]> {
    const rows = await this.call<Message[]>("POST", "/v1/agents/claim", { body, signal });
    for (const row of rows) {
      if (row.type !== "assign") {
        throw new CpaError(`The server answered a claim with a '${String(row.type)}' message; it must be 'assign'.`, {
          code: "message_invalid",
        });
      }
    }
    return rows as AssignMessage[];
  }

  /** The caller's desktop agents (a tenant's owners and admins: the tenant's). */
  agents(signal?: AbortSignal): Promise<AgentList> {
    return this.call<AgentList>("GET", "/v1/agents", { signal });
  }

  /** Send any protocol message; answers the scheduler's reply. `traceparent`: an assign's. */
  send(message: Message, options: { traceparent?: string | null; signal?: AbortSignal } = {}): Promise<Message> {
    const headers = options.traceparent ? { traceparent: options.traceparent } : undefined;
    return this.call<Message>("POST", "/v1/messages", { body: message, headers, signal: options.signal });
  }

  // progress -------------------------------------------------------------------------------

  /**
   * The job's progress events, each once and in id order, until the job's final event.
   *
   * Over Supabase Realtime when configured (falling back to the API when the channel cannot
   * be joined), else SSE; after every (re)join the gap is filled from the API by the events'
   * id, and duplicates are dropped. Break out of the loop (or abort `signal`) to stop early.
   */
  async *follow(jobId: string, options: FollowOptions = {}): AsyncGenerator<ProgressEvent> {
    for await (const event of this.followAny(jobId, options)) {
      if (options.signal?.aborted) return; // nothing after an abort, even what was buffered
      yield event;
    }
  }

  private async *followAny(jobId: string, options: FollowOptions): AsyncGenerator<ProgressEvent> {
    const cursor: Cursor = { seen: new Set(), last: options.after ?? 0 };
    const via = options.via ?? "auto";
    if (via === "realtime" || (via === "auto" && this.realtimeEnabled)) {
      try {
        yield* this.followRealtime(jobId, cursor, options.signal);
        return;
      } catch (error) {
        if (!(error instanceof RealtimeUnavailable) || via === "realtime") throw error;
        console.warn(`cpa-scheduler: Realtime unavailable, following job ${jobId} over the API: ${error.message}`);
      }
    }
    if (via === "poll") yield* this.followPoll(jobId, cursor, options.signal);
    else yield* this.followSse(jobId, cursor, options.reconnects ?? 20, options.signal);
  }

  /** Delivers an event unless seen; true when it was the job's last. */
  private static accept(event: ProgressEvent, cursor: Cursor): boolean {
    cursor.last = Math.max(cursor.last, event.id);
    if (cursor.seen.has(event.id)) return false;
    cursor.seen.add(event.id);
    return true;
  }

  private async *followPoll(jobId: string, cursor: Cursor, signal?: AbortSignal): AsyncGenerator<ProgressEvent> {
    let failures = 0;
    while (!signal?.aborted) {
      let page: EventPage;
      try {
        page = await this.events(jobId, { after: cursor.last, wait: 20, signal });
        failures = 0;
      } catch (error) {
        if (isAbort(error, signal)) return;
        if (!(error instanceof UnavailableError) || ++failures > 20) throw error;
        await sleep(Math.min(5000, 200 * 2 ** failures), signal);
        continue;
      }
      // A page's terminal event may be an earlier run's (the job was retried): `done` is the end.
      for (const event of page.events) if (CpaClient.accept(event, cursor)) yield event;
      cursor.last = Math.max(cursor.last, page.last_event_id);
      if (page.done) return;
      if (!page.events.length) await sleep(page.retry_ms, signal);
    }
  }

  /** SSE with resume: a buffered host (Lambda) closes each answer early; reconnect from `last`. */
  private async *followSse(
    jobId: string,
    cursor: Cursor,
    reconnects: number,
    signal?: AbortSignal,
  ): AsyncGenerator<ProgressEvent> {
    let failures = 0;
    let retryMs = 1000;
    while (!signal?.aborted) {
      const headers: Record<string, string> = { Accept: "text/event-stream" };
      if (cursor.last) headers["Last-Event-ID"] = String(cursor.last);
      let got = false;
      let ended = false;
      try {
        const response = await this.raw("GET", `/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
        if (response.status === 204) return; // the job has ended and nothing follows `last`
        if (!response.body) {
          yield* this.followPoll(jobId, cursor, signal); // a fetch without streams: long-poll
          return;
        }
        failures = 0;
        for await (const field of readSse(response.body)) {
          if (field.kind === "retry") {
            retryMs = Number(field.value);
            continue;
          }
          const event = JSON.parse(field.value) as ProgressEvent;
          got = true;
          if (!CpaClient.accept(event, cursor)) continue;
          yield event;
          // The end only as the answer's last event: after an earlier run's end (the job was
          // retried) more follows, and the server goes on.
          ended = isTerminal(event);
        }
      } catch (error) {
        if (isAbort(error, signal)) return;
        // Cut mid-stream (a TypeError from the body) or unreachable: reconnect, bounded.
        if (!(error instanceof UnavailableError || error instanceof TypeError)) throw error;
        if (++failures > reconnects) {
          throw new UnavailableError(
            `The event stream of job ${jobId} dropped ${failures} times in a row; is the scheduler at ${this.baseUrl} reachable?`,
            { code: "unavailable", cause: error },
          );
        }
        await sleep(Math.min(5000, 200 * 2 ** failures), signal);
        continue;
      }
      if (ended) return;
      // The answer ended before the job did (a bounded answer): resume from `last`, straight
      // away when it brought events, else after the server's retry hint.
      if (!got) await sleep(retryMs, signal);
    }
  }

  /** Everything the API has after `cursor.last`: the unseen events, and whether the job ended. */
  private async fill(jobId: string, cursor: Cursor, signal?: AbortSignal): Promise<[ProgressEvent[], boolean]> {
    const out: ProgressEvent[] = [];
    for (;;) {
      const page = await this.events(jobId, { after: cursor.last, wait: 0, signal });
      for (const event of page.events) if (CpaClient.accept(event, cursor)) out.push(event);
      cursor.last = Math.max(cursor.last, page.last_event_id);
      if (page.done || !page.events.length) return [out, page.done];
    }
  }

  /** The private topic that carries a job's events: its owner's (the tenant's on older servers). */
  static jobTopic(job: Job): string {
    return job.created_by ? `tenant:${job.tenant_id}:user:${job.created_by}` : `tenant:${job.tenant_id}`;
  }

  private async *followRealtime(jobId: string, cursor: Cursor, signal?: AbortSignal): AsyncGenerator<ProgressEvent> {
    const settings = this.realtimeOptions;
    const job = await this.get(jobId, signal);
    let sb: SupabaseClient;
    try {
      sb = await this.supabase();
    } catch (error) {
      if (error instanceof AuthError) throw error;
      throw new RealtimeUnavailable(`no Realtime client: ${(error as Error).message}`);
    }
    const inbox = new Inbox<ChannelItem>();
    const topic = CpaClient.jobTopic(job);
    let channel: RealtimeChannel | undefined;
    try {
      channel = await joinPrivate(sb, topic, "job_events", inbox);
      let joined = false;
      let everJoined = false;
      let lostAt: number | undefined = Date.now(); // not joined yet: the join timeout applies
      while (!signal?.aborted) {
        const item = await inbox.next(lostAt !== undefined ? settings.joinTimeoutMs : settings.checkEveryMs, signal);
        if (signal?.aborted) return;
        let check = false;
        if (item === undefined) {
          if (lostAt !== undefined) throw new RealtimeUnavailable(`no (re)join of ${topic} within ${settings.joinTimeoutMs} ms`);
          check = true; // quiet for a while: ask the API what the channel may have lost
        } else if (item.kind === "state") {
          if (item.status !== "SUBSCRIBED") {
            joined = false;
            lostAt ??= Date.now();
            // A refused first join, or a channel the client will not rejoin by itself.
            if (!everJoined || item.status !== "CHANNEL_ERROR") {
              throw new RealtimeUnavailable(`${topic}: ${item.status}${item.error ? ` (${item.error.message})` : ""}`);
            }
            continue;
          }
          joined = everJoined = true;
          lostAt = undefined;
          check = true; // (re)joined: fill the gap from the API
        }
        if (check) {
          // A page's terminal event may be an earlier run's: the page's `done` is the end.
          const [missed, ended] = await this.fill(jobId, cursor, signal);
          yield* missed;
          if (ended) return;
          continue;
        }
        if (item?.kind !== "message" || !joined) continue; // before the (re)join's fill: the fill brings it
        const events = Array.isArray(item.payload.events) ? (item.payload.events as ProgressEvent[]) : [];
        for (const event of [...events].sort((a, b) => a.id - b.id)) {
          if (event.job_id !== jobId || !CpaClient.accept(event, cursor)) continue;
          yield event;
          if (isTerminal(event)) return;
        }
      }
    } finally {
      if (channel) await sb.removeChannel(channel).catch(() => undefined);
    }
  }

  /** Leave every Realtime channel and close the socket (a client made for a `session` stops refreshing). */
  async close(): Promise<void> {
    if (!this.supabasePromise) return;
    const sb = await this.supabasePromise.catch(() => undefined);
    if (!sb || sb === this.options.supabase) return;
    await sb.removeAllChannels().catch(() => undefined);
    sb.realtime.disconnect();
    if (this.options.session) await sb.auth.stopAutoRefresh().catch(() => undefined);
    this.supabasePromise = undefined;
  }
}

/** Re-exported so the agent can use the same channel helpers. */
export { joinPrivate, RealtimeUnavailable };
export type { ChannelItem };
