// The client against a real `cpa-scheduler serve`: jobs, follow (SSE, long-poll, a forced
// reconnect), cancel and retry, paging, schedules, typed errors and the agent helper.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  Agent,
  CpaClient,
  InvalidError,
  NotFoundError,
  AuthError,
  ConflictError,
  RetryableError,
  isTerminal,
} from "../dist/index.js";
import { chain, collect, startProxy, startServer, storedEvents, until } from "./harness.mjs";

let server;
let client;

before(async () => {
  server = await startServer();
  client = new CpaClient({ baseUrl: server.url, token: await server.token() });
});
after(async () => {
  await server?.stop();
});

const ids = (events) => events.map((e) => e.id);
const unique = (list) => new Set(list).size === list.length;

describe("jobs", () => {
  test("submit a graph and follow it to done over SSE", async () => {
    const job = await client.submit({ graph: chain(3, 20) });
    assert.equal(job.status, "pending");
    const events = await collect(client.follow(job.id));
    const last = events.at(-1);
    assert.deepEqual([last.kind, last.status], ["job.status", "done"]);
    assert.ok(isTerminal(last));
    assert.deepEqual(ids(events), ids(await storedEvents(client, job.id)));
    assert.ok(events.every((e) => e.job_id === job.id));
    const done = await client.get(job.id);
    assert.equal(done.status, "done");
    assert.deepEqual(done.todos.map((t) => t.status), ["done", "done", "done"]);
  });

  test("follow over the JSON long-poll, resuming after a given event", async () => {
    const job = await client.submit({ graph: chain(2, 20) });
    const all = await collect(client.follow(job.id, { via: "poll" }));
    assert.equal(all.at(-1).status, "done");
    const rest = await collect(client.follow(job.id, { via: "poll", after: all[1].id }));
    assert.deepEqual(ids(rest), ids(all.slice(2)));
  });

  test("a text request with time_zone and run_at, and the Idempotency-Key", async () => {
    const runAt = new Date(Date.now() + 3600_000);
    const body = { request: "Remind me in 2 hours to call Anna", time_zone: "Europe/Berlin", idempotencyKey: "ts-key-1" };
    const first = await client.submit(body);
    const again = await client.submit(body);
    assert.equal(again.id, first.id);
    const changed = await client.submit({ ...body, time_zone: "UTC" }).catch((e) => e);
    assert.ok(changed instanceof ConflictError, String(changed));
    assert.equal(changed.status, 409);
    const timed = await client.submit({ graph: chain(1, 0), run_at: runAt, time_zone: "Europe/Berlin" });
    assert.ok(Math.abs(new Date(timed.run_at).getTime() - runAt.getTime()) < 1000, timed.run_at);
    await client.cancel(first.id);
    await client.cancel(timed.id);
  });

  test("a gap is filled after a forced reconnect: every event once, in order", async () => {
    const proxy = await startProxy(server.url);
    try {
      const viaProxy = new CpaClient({ baseUrl: proxy.url, token: await server.token() });
      const job = await viaProxy.submit({ graph: chain(12, 120) });
      let cut = false;
      const events = await collect(viaProxy.follow(job.id), (_e, got) => {
        if (got.length === 4 && !cut) {
          cut = true;
          proxy.cut(700); // events happen while the client cannot reach the server
        }
      });
      assert.ok(cut);
      assert.ok(proxy.connections >= 2, "the client reconnected");
      assert.deepEqual(ids(events), ids(await storedEvents(client, job.id)));
      assert.ok(unique(ids(events)));
      assert.equal(events.at(-1).status, "done");
    } finally {
      await proxy.stop();
    }
  });

  test("cancel, then retry: the follow ends at each final event", async () => {
    const job = await client.submit({
      graph: { todos: [{ key: "long", action: "wait", params: { seconds: 600 } }] },
    });
    const cancelled = await client.cancel(job.id);
    assert.equal(cancelled.status, "cancelled");
    const events = await collect(client.follow(job.id));
    assert.deepEqual([events.at(-1).kind, events.at(-1).status], ["job.status", "cancelled"]);

    const retried = await client.retry(job.id);
    assert.ok(["pending", "running"].includes(retried.status), retried.status);
    await client.cancel(job.id);
    const more = await collect(client.follow(job.id, { after: events.at(-1).id }));
    assert.equal(more.at(-1).status, "cancelled");
    assert.ok(more.every((e) => e.id > events.at(-1).id));
    // From the start, the first run's end does not end the follow: the last event does.
    for (const via of ["sse", "poll"]) {
      const whole = await collect(client.follow(job.id, { via }));
      assert.deepEqual(ids(whole), ids(await storedEvents(client, job.id)), via);
      assert.equal(whole.filter((e) => e.kind === "job.status" && e.status === "cancelled").length, 2, via);
    }
  });

  test("aborting the signal ends a follow early, without an error", async () => {
    const job = await client.submit({ graph: { todos: [{ key: "long", action: "wait", params: { seconds: 600 } }] } });
    const stop = new AbortController();
    const events = await collect(client.follow(job.id, { signal: stop.signal }), () => stop.abort());
    assert.equal(events.length, 1);
    await client.cancel(job.id);
  });

  test("list with paging", async () => {
    for (let i = 0; i < 3; i++) await client.submit({ graph: chain(1, 0) });
    const first = await client.list({ limit: 2 });
    assert.equal(first.jobs.length, 2);
    assert.ok(first.next_cursor);
    const second = await client.list({ limit: 2, cursor: first.next_cursor });
    assert.ok(second.jobs.length >= 1);
    assert.ok(!second.jobs.some((j) => first.jobs.some((f) => f.id === j.id)));
    const all = [];
    for await (const job of client.listAll({ pageSize: 2 })) all.push(job.id);
    assert.ok(all.length >= 5 && unique(all));
  });
});

describe("typed errors", () => {
  test("another's or a missing job: NotFoundError (404, not_found)", async () => {
    const error = await client.get("00000000-0000-4000-8000-000000000000").catch((e) => e);
    assert.ok(error instanceof NotFoundError, String(error));
    assert.equal(error.status, 404);
    assert.equal(error.code, "not_found");
    const other = new CpaClient({ baseUrl: server.url, token: await server.token("ts-other", "ts-other-tenant") });
    const job = await client.submit({ graph: chain(1, 0) });
    await assert.rejects(other.get(job.id), NotFoundError);
  });

  test("an invalid graph and an unknown zone: InvalidError (422) with the code and fields", async () => {
    const cycle = await client
      .submit({ graph: { todos: [
        { key: "a", action: "noop", depends_on: ["b"] },
        { key: "b", action: "noop", depends_on: ["a"] },
      ] } })
      .catch((e) => e);
    assert.ok(cycle instanceof InvalidError, String(cycle));
    assert.equal(cycle.status, 422);
    assert.equal(cycle.code, "graph_cycle");
    assert.match(cycle.message, /cycle/);

    const zone = await client.submit({ request: "Remind me at 9 to call Anna", time_zone: "Mars/Olympus" }).catch((e) => e);
    assert.ok(zone instanceof InvalidError, String(zone));
    assert.equal(zone.status, 422);

    const body = await client.submit({ graph: { todos: [] } }).catch((e) => e);
    assert.ok(body instanceof InvalidError);
    assert.equal(body.code, "invalid");
    assert.ok(body.errors.some((e) => e.loc.includes("todos")), JSON.stringify(body.errors));
  });

  test("a bad token: AuthError (401)", async () => {
    const bad = new CpaClient({ baseUrl: server.url, token: "not-a-token" });
    const error = await bad.list().catch((e) => e);
    assert.ok(error instanceof AuthError);
    assert.equal(error.code, "unauthenticated");
  });
});

describe("schedules", () => {
  test("create, list, pause, resume, delete; a bad cron is a 422", async () => {
    const made = await client.createSchedule({ cron: "0 9 * * 1", time_zone: "Europe/Berlin", request: "Remind me to water the plants" });
    assert.equal(made.cron, "0 9 * * 1");
    assert.ok((await client.listSchedules()).some((s) => s.id === made.id));
    assert.equal((await client.pauseSchedule(made.id)).paused, true);
    assert.equal((await client.resumeSchedule(made.id)).paused, false);
    assert.equal((await client.getSchedule(made.id)).id, made.id);
    await client.deleteSchedule(made.id);
    await assert.rejects(client.getSchedule(made.id), NotFoundError);
    await assert.rejects(client.createSchedule({ cron: "61 * * * *", time_zone: "UTC", request: "x" }), InvalidError);
  });
});

describe("agent helper", () => {
  test("runs a desktop ToDo end to end: offer, claim, handler, done; and a failure", async () => {
    const seen = [];
    const agent = new Agent(client, {
      agentId: "ts-agent-1",
      push: "long-poll",
      wait: 2,
      handlers: {
        "desktop.open_app": async ({ app }, assign, ctx) => {
          seen.push(assign.payload.key);
          await ctx.inform(`opening ${app}`);
          return { opened: app };
        },
        "file.write": () => {
          throw new Error("The disk is full.");
        },
      },
      onError: () => undefined,
    });
    const running = agent.start();
    try {
      const job = await client.submit({ graph: { todos: [
        { key: "open", action: "desktop.open_app", params: { app: "Notes" } },
        { key: "after", action: "noop", params: {}, depends_on: ["open"] },
      ] } });
      const events = await collect(client.follow(job.id));
      assert.equal(events.at(-1).status, "done");
      const done = await client.get(job.id);
      const open = done.todos.find((t) => t.key === "open");
      assert.deepEqual(open.result, { opened: "Notes" });
      assert.equal(open.target, "desktop");
      assert.deepEqual(seen, ["open"]);
      assert.ok(events.some((e) => e.kind === "agent.inform"), "the inform reached the job's events");

      const failing = await client.submit({ graph: { todos: [
        { key: "write", action: "file.write", params: { path: "a.txt", content: "x" }, max_attempts: 1 },
      ] } });
      const end = await collect(client.follow(failing.id));
      assert.equal(end.at(-1).status, "failed");
      assert.match((await client.get(failing.id)).todos[0].error, /disk is full/);
      assert.equal(agent.handled, 2);
    } finally {
      await agent.stop();
    }
    await running;
    assert.equal(agent.mode, "stopped");
  });

  test("stop() while the claim waits goes offline at once", async () => {
    const agent = new Agent(client, { agentId: "ts-agent-2", push: "long-poll", handlers: { "desktop.open_app": () => ({}) }, onError: () => undefined });
    const running = agent.start();
    await new Promise((r) => setTimeout(r, 500));
    const t0 = Date.now();
    await agent.stop();
    await running;
    assert.ok(Date.now() - t0 < 3000, `stopped in ${Date.now() - t0} ms`);
  });

  test("stop() lets a running handler finish and answers it", async () => {
    let started;
    const began = new Promise((r) => (started = r));
    const agent = new Agent(client, {
      agentId: "ts-agent-3",
      push: "long-poll",
      wait: 2,
      handlers: {
        "desktop.open_app": async ({ app }, _assign, { signal }) => {
          started();
          await new Promise((r) => setTimeout(r, 400));
          return { opened: app, stopping: signal.aborted };
        },
      },
      onError: () => undefined,
    });
    const running = agent.start();
    const job = await client.submit({ graph: { todos: [{ key: "open", action: "desktop.open_app", params: { app: "Calendar" } }] } });
    await began;
    await agent.stop();
    await running;
    assert.equal(agent.handled, 1);
    assert.deepEqual((await client.get(job.id)).todos[0].result, { opened: "Calendar", stopping: true });
  });

  test("a RetryableError answers a retryable failure", () => {
    assert.equal(new RetryableError("later").retryable, true);
  });
});
