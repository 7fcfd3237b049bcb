// The Realtime path through supabase-js (with `ws` on Node < 22) against the repository's
// Realtime test double, which authorizes joins by the migrations' RLS policies and relays what
// the database broadcasts; and the token refresh through supabase-js for a given session.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";
import { Agent, CpaClient } from "../dist/index.js";
import { chain, collect, sleep, startRealtimeDouble, startServer, storedEvents, until } from "./harness.mjs";

const KEY = "sb_publishable_test-double-key";
let server;
let realtime;
let token;
let pushContract = false; // the server has the desktop push contract (claim `wait`, todo_ready)

before(async () => {
  server = await startServer();
  realtime = await startRealtimeDouble(server);
  token = await server.token("rt-user", "rt-tenant");
  const openapi = await (await fetch(`${server.url}/openapi.json`)).json();
  pushContract = "wait" in (openapi.components.schemas.ClaimBody?.properties ?? {});
});
after(async () => {
  await realtime?.stop();
  await server?.stop();
});

const ids = (events) => events.map((e) => e.id);
const accepted = async () => (await realtime.stats()).joins.filter((j) => j.accepted);

function realtimeClient(options = {}) {
  return new CpaClient({
    baseUrl: server.url,
    token,
    supabaseUrl: realtime.url,
    supabaseKey: KEY,
    // The double speaks Phoenix's JSON frames (vsn 1.0.0), which hosted Realtime speaks too.
    realtime: { reconnectAfterMs: 200, clientOptions: { vsn: "1.0.0" }, ...options },
  });
}

describe("follow over Realtime", () => {
  test("joins the owner's private topic with the token and receives the job's events", async () => {
    const client = realtimeClient();
    try {
      // A timer first: the ToDos after it run once the follow has joined, so their events
      // come over the socket (the join's fill brings what came before).
      const graph = chain(3, 50);
      graph.todos[0].depends_on = ["timer"];
      graph.todos.unshift({ key: "timer", action: "wait", params: { seconds: 2 } });
      const job = await client.submit({ graph });
      const before = (await realtime.stats()).relayed;
      const events = await collect(client.follow(job.id));
      assert.deepEqual(ids(events), ids(await storedEvents(client, job.id)));
      assert.equal(events.at(-1).status, "done");
      const joins = await accepted();
      assert.equal(joins.at(-1).topic, CpaClient.jobTopic(await client.get(job.id)));
      assert.match(joins.at(-1).topic, /^tenant:[0-9a-f-]{36}:user:[0-9a-f-]{36}$/); // the owner's topic
      assert.ok((await realtime.stats()).relayed > before, "events came over the socket");
    } finally {
      await client.close();
    }
  });

  test("a dropped socket rejoins and the gap is filled from the API: nothing lost, nothing twice", async () => {
    const client = realtimeClient();
    try {
      const job = await client.submit({ graph: chain(14, 120) });
      const joinsBefore = (await accepted()).length;
      let dropped = false;
      const events = await collect(client.follow(job.id), async (_e, got) => {
        if (got.length === 5 && !dropped) {
          dropped = true;
          await realtime.drop(0.6); // events of a few ToDos happen while it is down
        }
      });
      assert.ok(dropped);
      assert.deepEqual(ids(events), ids(await storedEvents(client, job.id)));
      assert.equal(new Set(ids(events)).size, events.length);
      assert.equal(events.at(-1).status, "done");
      assert.ok((await accepted()).length >= joinsBefore + 2, "joined, then rejoined after the drop");
    } finally {
      await client.close();
    }
  });

  test("a caller's own supabase-js client carries the follow", async () => {
    const { createClient } = await import("@supabase/supabase-js");
    const { default: ws } = await import("ws");
    const supabase = createClient(realtime.url, KEY, {
      accessToken: async () => token,
      realtime: { transport: ws, vsn: "1.0.0" },
    });
    const client = new CpaClient({ baseUrl: server.url, token, supabase });
    try {
      const joinsBefore = (await accepted()).length;
      const job = await client.submit({ graph: chain(2, 20) });
      const events = await collect(client.follow(job.id));
      assert.deepEqual(ids(events), ids(await storedEvents(client, job.id)));
      assert.equal((await accepted()).length, joinsBefore + 1);
    } finally {
      await supabase.removeAllChannels();
      await supabase.realtime.disconnect();
    }
  });

  test("another tenant's job cannot be followed: 404 before any join", async () => {
    const client = realtimeClient();
    const other = new CpaClient({ baseUrl: server.url, token: await server.token("rt-other", "rt-other-tenant") });
    try {
      const job = await other.submit({ graph: chain(1, 0) });
      await assert.rejects(collect(client.follow(job.id)), { name: "NotFoundError" });
    } finally {
      await client.close();
    }
  });

  test("Realtime unreachable: follows over SSE instead", async () => {
    const client = new CpaClient({
      baseUrl: server.url,
      token,
      supabaseUrl: "http://127.0.0.1:9", // nothing listens there
      supabaseKey: KEY,
      realtime: { joinTimeoutMs: 1500, reconnectAfterMs: 200 },
    });
    const warn = console.warn;
    console.warn = () => undefined;
    try {
      const job = await client.submit({ graph: chain(2, 20) });
      const events = await collect(client.follow(job.id));
      assert.equal(events.at(-1).status, "done");
      assert.deepEqual(ids(events), ids(await storedEvents(client, job.id)));
    } finally {
      console.warn = warn;
      await client.close();
    }
  });
});

describe("agent woken over Realtime", () => {
  test("todo_ready on tenant:<tid>:agents:<uid> wakes the agent", async (t) => {
    if (!pushContract) {
      t.skip("the server lacks the desktop push contract (claim `wait`, the todo_ready topic)");
      return;
    }
    const client = realtimeClient();
    const agent = new Agent(client, {
      agentId: "rt-agent",
      push: "realtime",
      handlers: { "desktop.open_app": ({ app }) => ({ opened: app }) },
    });
    const running = agent.start();
    try {
      await until(() => agent.mode === "realtime", 10_000, "the wake topic to be joined");
      const joins = await accepted();
      assert.match(joins.at(-1).topic, /^tenant:[0-9a-f-]{36}:agents:[0-9a-f-]{36}$/);
      await sleep(300); // the agent's first claim found nothing and now waits for a wake-up
      const t0 = Date.now();
      const job = await client.submit({ graph: { todos: [{ key: "open", action: "desktop.open_app", params: { app: "Mail" } }] } });
      const events = await collect(client.follow(job.id, { via: "sse" }));
      assert.equal(events.at(-1).status, "done");
      assert.ok(Date.now() - t0 < 5000, `woken and done in ${Date.now() - t0} ms`);
      assert.deepEqual((await client.get(job.id)).todos[0].result, { opened: "Mail" });
    } finally {
      await agent.stop();
      await running;
      await client.close();
    }
  });
});

describe("agent ids belong to their user", () => {
  test("another user's agent id: start() rejects with ForbiddenError (403 forbidden)", async (t) => {
    if (!pushContract) {
      t.skip("the server lacks the desktop push contract (agent ids bound to their user)");
      return;
    }
    const mine = new CpaClient({ baseUrl: server.url, token });
    const theirs = new CpaClient({ baseUrl: server.url, token: await server.token("rt-someone", "rt-tenant") });
    const handlers = { "desktop.open_app": () => ({}) };
    const first = new Agent(mine, { agentId: "rt-shared-id", push: "long-poll", wait: 1, handlers, onError: () => undefined });
    const running = first.start();
    await until(async () => (await mine.agents()).agents.some((a) => a.agent_id === "rt-shared-id"), 10_000, "the offer");
    await first.stop();
    await running;
    const second = new Agent(theirs, { agentId: "rt-shared-id", push: "long-poll", handlers, onError: () => undefined });
    const error = await second.start().catch((e) => e);
    assert.equal(error?.name, "ForbiddenError", String(error));
    assert.equal(error.status, 403);
    assert.equal(error.code, "forbidden");
  });
});

describe("token refresh through supabase-js", () => {
  test("an expired session token is refreshed before the API call", async () => {
    const expired = await server.token("rt-user", "rt-tenant", 1);
    const fresh = await server.token("rt-user", "rt-tenant", 3600);
    const refreshes = [];
    const user = { id: "u", aud: "authenticated", role: "authenticated", email: "u@local.invalid",
                   app_metadata: {}, user_metadata: {}, created_at: new Date().toISOString() };
    const auth = createServer((req, res) => {
      let body = "";
      req.on("data", (d) => (body += d));
      req.on("end", () => {
        res.setHeader("Content-Type", "application/json");
        if (req.url.startsWith("/auth/v1/token")) {
          refreshes.push(JSON.parse(body).refresh_token);
          res.end(JSON.stringify({ access_token: fresh, token_type: "bearer", expires_in: 3600,
                                   expires_at: Math.floor(Date.now() / 1000) + 3600, refresh_token: "r2", user }));
        } else if (req.url.startsWith("/auth/v1/user")) {
          res.end(JSON.stringify(user));
        } else {
          res.statusCode = 404;
          res.end("{}");
        }
      });
    });
    await new Promise((r) => auth.listen(0, "127.0.0.1", r));
    await sleep(1100); // the first token has expired
    const client = new CpaClient({
      baseUrl: server.url,
      supabaseUrl: `http://127.0.0.1:${auth.address().port}`,
      supabaseKey: KEY,
      session: { access_token: expired, refresh_token: "r1" },
      realtime: false,
    });
    try {
      const job = await client.submit({ graph: chain(1, 0) });
      assert.equal((await client.get(job.id)).id, job.id);
      assert.deepEqual(refreshes, ["r1"]);
      assert.equal(await client.accessToken(), fresh);
    } finally {
      await client.close();
      auth.close();
    }
  });
});
