/**
 * The desktop agent: offers its actions, is woken by push, claims its assignments, runs a
 * handler per action and answers `done` or `failure`.
 *
 * Push is a Realtime broadcast (`todo_ready` on `tenant:<tenant_id>:agents:<user_id>`, a topic
 * only that user can join) when Supabase is configured, else a long-polling claim (`wait`).
 * It never polls busily: without push it claims with `wait` and the server answers as soon as
 * there is work.
 */
import type { RealtimeChannel } from "@supabase/supabase-js";
import { type CpaClient, RealtimeUnavailable, joinPrivate } from "./client.js";
import { CpaError, InvalidError, RateLimitedError, UnavailableError } from "./errors.js";
import type { ChannelItem } from "./realtime.js";
import type { AssignMessage, Message } from "./types.js";
import { Inbox, isAbort, jwtClaims, newId, sleep } from "./util.js";

/** What a handler gets besides the assignment. */
export interface AssignmentContext {
  /** Aborted when the agent stops: finish quickly or throw. */
  signal: AbortSignal;
  /** Send an `inform` (progress text and data) about this assignment. */
  inform(text: string, data?: Record<string, unknown>): Promise<void>;
}

/** Runs one assigned ToDo; its return value is the ToDo's result (JSON). */
export type ActionHandler = (params: Record<string, unknown>, assign: AssignMessage, context: AssignmentContext) => unknown;

/** Throw this from a handler for a failure worth retrying (the ToDo backs off and runs again). */
export class RetryableError extends Error {
  readonly retryable = true;
}

export interface AgentOptions {
  /** This agent's id (stable per installation; it belongs to the signed-in user). */
  agentId: string;
  /** A name shown in `GET /v1/agents`. */
  name?: string;
  /** One handler per offered action, e.g. `{"desktop.open_app": ({app}) => ...}`. */
  handlers: Record<string, ActionHandler>;
  /** ToDos per claim, run concurrently (default 5). */
  limit?: number;
  /** Seconds a claim long-polls when there is no Realtime wake-up (default 20, at most 20). */
  wait?: number;
  /** `auto` (default): Realtime wake-ups when configured, else the long-polling claim. */
  push?: "auto" | "realtime" | "long-poll";
  /** The tenant of the wake-up topic; by default as `GET /v1/agents` names it. */
  tenantId?: string;
  /** Send `agree` before running each assignment (default true). */
  agree?: boolean;
  /** Stops the agent when aborted (as `stop()` does). */
  signal?: AbortSignal;
  /** Called with errors the agent survives (a failed claim, a lost answer); default console.warn. */
  onError?: (error: unknown) => void;
  /** Called after each answered assignment. */
  onAnswer?: (assign: AssignMessage, answer: "done" | "failure", reply: Message) => void;
}

const RECEIVER = "scheduler";
const MAX_WAIT = 20;
// After a failed join of the wake-up topic, long-poll this long before joining again.
const REJOIN_AFTER_MS = 5 * 60_000;

/** The delay before the n-th retry after an error: 1, 2, 4 ... 60 s. */
const backoff = (n: number): number => Math.min(60_000, 1000 * 2 ** Math.max(0, n - 1));

/** A running agent; `client.agent({...}).start()` or `new Agent(client, {...}).start()`. */
export class Agent {
  /** Assignments answered so far. */
  handled = 0;
  /** The current wake-up mode: `realtime` while the wake topic is joined, else `long-poll`. */
  mode: "realtime" | "long-poll" | "stopped" = "stopped";
  private readonly client: CpaClient;
  private readonly options: AgentOptions;
  private readonly stopper = new AbortController();
  private running: Promise<void> | undefined;
  private readonly actions: string[];

  constructor(client: CpaClient, options: AgentOptions) {
    this.client = client;
    this.options = options;
    this.actions = Object.keys(options.handlers);
    if (!this.actions.length) throw new InvalidError("An agent needs at least one handler.", { code: "invalid" });
    options.signal?.addEventListener("abort", () => this.stopper.abort(), { once: true });
  }

  /** Starts the agent; the promise ends when it has stopped (it rejects on a fatal error). */
  start(): Promise<void> {
    this.running ??= this.run();
    return this.running;
  }

  /** Goes offline: no further claim, running handlers are answered, the channel is left. */
  async stop(): Promise<void> {
    this.stopper.abort();
    await this.running?.catch(() => undefined);
  }

  private warn(error: unknown): void {
    (this.options.onError ?? ((e: unknown) => console.warn("cpa-scheduler agent:", e)))(error);
  }

  private async run(): Promise<void> {
    const signal = this.stopper.signal;
    const o = this.options;
    const wait = Math.min(MAX_WAIT, Math.max(0, o.wait ?? MAX_WAIT));
    // Offer the actions; a desktop may start offline: try again until the server answers.
    for (let tries = 1; !signal.aborted; tries++) {
      try {
        const offer = { agent_id: o.agentId, name: o.name ?? o.agentId, actions: this.actions };
        await this.client.send(this.message("offer", offer), { signal });
        break;
      } catch (error) {
        if (isAbort(error, signal)) return;
        if (!(error instanceof UnavailableError || error instanceof RateLimitedError)) throw error;
        this.warn(error);
        await sleep(backoff(tries), signal);
      }
    }
    if (signal.aborted) return;
    const wantsPush = o.push === "realtime" || (o.push !== "long-poll" && this.client.realtimeEnabled);
    let wake = wantsPush ? await this.joinWake(signal) : undefined;
    let joinAgainAt = Date.now() + REJOIN_AFTER_MS;
    let supportsWait = true;
    let failures = 0;
    try {
      while (!signal.aborted) {
        if (wantsPush && !wake && Date.now() >= joinAgainAt) {
          wake = await this.joinWake(signal); // Realtime may be back
          joinAgainAt = Date.now() + REJOIN_AFTER_MS;
        }
        wake?.drain();
        const joined = wake !== undefined && this.mode === "realtime";
        // Woken by Realtime: claim at once; without it the claim itself waits for work.
        const claimWait = joined || !supportsWait ? 0 : wait;
        let assigns: AssignMessage[];
        try {
          assigns = await this.client.claim(
            { agent_id: o.agentId, actions: this.actions, limit: o.limit ?? 5, ...(claimWait ? { wait: claimWait } : {}) },
            signal,
          );
          failures = 0;
        } catch (error) {
          if (isAbort(error, signal)) break;
          if (claimWait && error instanceof InvalidError && error.errors.some((e) => e.loc.includes("wait"))) {
            // A server without the long-polling claim: poll it every few seconds instead.
            supportsWait = false;
            this.warn(new CpaError("The server has no long-polling claim (`wait`); polling every 2 s.", { code: "invalid" }));
            continue;
          }
          if (error instanceof CpaError && error.status > 0 && error.status < 500 && error.status !== 429) throw error;
          this.warn(error);
          await sleep(backoff(++failures), signal);
          continue;
        }
        if (signal.aborted) {
          await Promise.all(assigns.map((a) => this.refuse(a, "The agent went offline before starting it.")));
          break;
        }
        if (assigns.length) {
          await Promise.all(assigns.map((a) => this.handle(a, signal)));
          continue; // more may be ready
        }
        if (wake && this.mode === "realtime") await wake.until(signal);
        else if (!supportsWait) await sleep(2000, signal);
      }
    } finally {
      this.mode = "stopped";
      await wake?.leave();
    }
  }

  /** Joins the wake-up topic; undefined: it could not, the claim long-polls instead. */
  private async joinWake(signal: AbortSignal): Promise<Wake | undefined> {
    const o = this.options;
    this.mode = "long-poll";
    // The server names the caller's tenant and user (the topic's parts) in its agent list,
    // for the tenant the client acts in; an older server: the token's claims.
    const listed = await this.client.agents(signal).catch(() => undefined);
    const claims = jwtClaims(await this.client.accessToken()) ?? {};
    const meta = (claims.app_metadata ?? {}) as Record<string, unknown>;
    const tenant = o.tenantId ?? listed?.tenant_id ?? (typeof meta.tenant_id === "string" ? meta.tenant_id : undefined);
    const user = listed?.user_id ?? (typeof claims.sub === "string" ? claims.sub : undefined);
    if (!tenant || !user) {
      this.warn(new CpaError("No tenant for the wake-up topic (pass `tenantId`); using the long-polling claim.", { code: "invalid" }));
      return undefined;
    }
    try {
      const sb = await this.client.supabase();
      const wake = new Wake(sb, `tenant:${tenant}:agents:${user}`, (mode) => (this.mode = mode), this.warn.bind(this));
      await wake.join(signal);
      return wake;
    } catch (error) {
      if (o.push === "realtime" && !(error instanceof RealtimeUnavailable)) throw error;
      this.warn(error);
      return undefined;
    }
  }

  private message(type: string, payload: Record<string, unknown>, to?: AssignMessage): Message {
    return {
      id: newId(),
      type,
      sender: this.options.agentId,
      receiver: to?.sender ?? RECEIVER,
      conversation_id: to?.conversation_id ?? null,
      in_reply_to: to?.id ?? null,
      created_at: new Date().toISOString(),
      ...(to?.trace_id ? { trace_id: to.trace_id } : {}),
      payload,
    } as Message;
  }

  private async refuse(assign: AssignMessage, reason: string): Promise<void> {
    const msg = this.message("refuse", { todo_id: assign.payload.todo_id, job_id: assign.payload.job_id, reason }, assign);
    await this.client.send(msg, { traceparent: assign.payload.traceparent }).catch((e) => this.warn(e));
  }

  private async handle(assign: AssignMessage, signal: AbortSignal): Promise<void> {
    const p = assign.payload;
    const trace = { traceparent: p.traceparent };
    const handler = this.options.handlers[p.action];
    try {
      if (!handler) {
        await this.answer(assign, "failure", { todo_id: p.todo_id, error: `This agent cannot perform '${p.action}'.` });
        return;
      }
      if (this.options.agree !== false) await this.client.send(this.message("agree", { todo_id: p.todo_id }, assign), trace);
      const context: AssignmentContext = {
        signal,
        inform: async (text, data = {}) => {
          await this.client.send(
            this.message("inform", { text, data, todo_id: p.todo_id, job_id: p.job_id }, assign),
            trace,
          );
        },
      };
      let result: unknown;
      try {
        result = await handler((p.params ?? {}) as Record<string, unknown>, assign, context);
      } catch (error) {
        const text = error instanceof Error ? error.message || error.name : String(error);
        const retryable = (error as { retryable?: unknown } | null)?.retryable === true;
        await this.answer(assign, "failure", { todo_id: p.todo_id, error: text || "The action failed.", retryable });
        return;
      }
      await this.answer(assign, "done", { todo_id: p.todo_id, result: result === undefined ? null : result });
    } catch (error) {
      // The answer did not arrive: the lease expires and the ToDo is claimed again.
      this.warn(error);
    }
  }

  private async answer(assign: AssignMessage, type: "done" | "failure", payload: Record<string, unknown>): Promise<void> {
    const reply = await this.client.send(this.message(type, payload, assign), { traceparent: assign.payload.traceparent });
    this.handled += 1;
    this.options.onAnswer?.(assign, type, reply);
  }
}

/** The wake-up channel: `todo_ready` broadcasts set a flag the claim loop waits on. */
class Wake {
  private readonly inbox = new Inbox<ChannelItem>();
  private channel: RealtimeChannel | undefined;
  private pending = false;
  private readonly checkEveryMs = 30_000;

  constructor(
    private readonly sb: Awaited<ReturnType<CpaClient["supabase"]>>,
    private readonly topic: string,
    private readonly setMode: (mode: "realtime" | "long-poll") => void,
    private readonly warn: (error: unknown) => void,
  ) {}

  async join(signal: AbortSignal): Promise<void> {
    this.channel = await joinPrivate(this.sb, this.topic, "todo_ready", this.inbox);
    const first = await this.take(10_000, signal);
    if (first?.kind !== "state" || first.status !== "SUBSCRIBED") {
      await this.leave();
      const why = first?.kind === "state" ? `${first.status}${first.error ? ` (${first.error.message})` : ""}` : "no answer";
      throw new RealtimeUnavailable(`joining ${this.topic} failed: ${why}`);
    }
    this.setMode("realtime");
  }

  /** Take in what arrived (state changes, wake-ups) and forget the wake-ups: the claim that
   * follows takes their ToDos. */
  drain(): void {
    for (let item = this.inbox.poll(); item; item = this.inbox.poll()) this.note(item);
    this.pending = false;
  }

  /** Until a wake-up, a change of the channel's state, `checkEveryMs` (Realtime may lose a
   * message) or a stop. */
  async until(signal: AbortSignal): Promise<void> {
    const end = Date.now() + this.checkEveryMs;
    while (!this.pending && !signal.aborted && Date.now() < end) {
      const item = await this.take(end - Date.now(), signal);
      if (item?.kind === "state") return; // rejoined (claim what was missed) or lost (long-poll)
    }
  }

  private async take(ms: number, signal: AbortSignal): Promise<ChannelItem | undefined> {
    const item = await this.inbox.next(ms, signal);
    if (item) this.note(item);
    return item;
  }

  private note(item: ChannelItem): void {
    if (item.kind === "message") this.pending = true;
    else if (item.status === "SUBSCRIBED") this.setMode("realtime");
    else {
      // Lost: the claim long-polls until the channel is back (supabase-js rejoins by itself).
      this.setMode("long-poll");
      if (item.status !== "CHANNEL_ERROR") this.warn(new RealtimeUnavailable(`${this.topic}: ${item.status}`));
    }
  }

  async leave(): Promise<void> {
    if (this.channel) await this.sb.removeChannel(this.channel).catch(() => undefined);
    this.channel = undefined;
  }
}

/** Kept for callers that want to tell an aborted stop from a failure. */
export { isAbort };
