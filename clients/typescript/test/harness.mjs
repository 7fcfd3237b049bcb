// Test fixtures: a real `cpa-scheduler serve` (embedded PostgreSQL in a temporary
// CPA_DATA_DIR, a free port), tokens from `cpa-scheduler token`, the repository's Realtime test
// double beside it, and a TCP proxy that can cut connections to force reconnects.
import { execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, "../../..");
const VENV_BIN = process.env.CPA_VENV_BIN ?? join(REPO, ".venv/bin");
const run = promisify(execFile);

export function freePort() {
  return new Promise((ok, fail) => {
    const srv = net.createServer();
    srv.once("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function until(check, ms = 15_000, what = "condition") {
  const end = Date.now() + ms;
  for (;;) {
    if (await check()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

/** Starts `cpa-scheduler serve`; `token(user)` mints a token of the test tenant. */
export async function startServer() {
  const bin = join(VENV_BIN, "cpa-scheduler");
  if (!existsSync(bin)) throw new Error(`${bin} is missing: run 'make install' in the repository first.`);
  const dataDir = mkdtempSync(join(tmpdir(), "cpa-ts-"));
  const port = await freePort();
  const env = { ...process.env, CPA_DATA_DIR: dataDir, CPA_LOG_LEVEL: "warning" };
  for (const name of ["DATABASE_URL", "SUPABASE_URL", "SUPABASE_JWT_SECRET", "CPA_API_URL", "CPA_TOKEN"]) delete env[name];
  const child = spawn(bin, ["serve", "--host", "127.0.0.1", "--port", String(port)], {
    env,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  child.stderr.on("data", (d) => (log = (log + d).slice(-20_000)));
  const url = `http://127.0.0.1:${port}`;
  try {
    await until(async () => {
      if (child.exitCode !== null) throw new Error(`serve exited (${child.exitCode}):\n${log}`);
      return fetch(`${url}/healthz`).then((r) => r.ok, () => false);
    }, 120_000, "serve to answer /healthz");
  } catch (error) {
    child.kill("SIGTERM");
    throw error;
  }
  const tokens = new Map();
  return {
    url,
    env,
    dataDir,
    get log() {
      return log;
    },
    /** A token of `user` in `tenant` (cached unless `ttl` is given). */
    async token(user = "ts-user", tenant = "ts-tenant", ttl = undefined) {
      const key = `${tenant}/${user}`;
      if (ttl === undefined && tokens.has(key)) return tokens.get(key);
      const args = ["token", "--tenant", tenant, "--user", user];
      if (ttl !== undefined) args.push("--ttl", String(ttl));
      const { stdout } = await run(bin, args, { env });
      const token = stdout.trim();
      if (ttl === undefined) tokens.set(key, token);
      return token;
    },
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once("exit", r));
        child.kill("SIGTERM");
        await Promise.race([exited, sleep(20_000)]);
        if (child.exitCode === null) child.kill("SIGKILL");
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** The Realtime test double (tests/realtime_double.py) over the server's database. */
export async function startRealtimeDouble(server) {
  const child = spawn(join(VENV_BIN, "python"), [join(here, "realtime_double.py")], {
    env: server.env,
    cwd: REPO,
    stdio: ["pipe", "pipe", "pipe"],
  });
  let err = "";
  child.stderr.on("data", (d) => (err = (err + d).slice(-20_000)));
  const lines = createInterface({ input: child.stdout });
  const pending = [];
  const answers = [];
  lines.on("line", (line) => {
    const value = JSON.parse(line);
    const waiter = pending.shift();
    if (waiter) waiter(value);
    else answers.push(value);
  });
  const next = () => (answers.length ? Promise.resolve(answers.shift()) : new Promise((r) => pending.push(r)));
  const first = await Promise.race([
    next(),
    new Promise((_, fail) => child.once("exit", (c) => fail(new Error(`the Realtime double exited (${c}):\n${err}`)))),
  ]);
  const command = (line) => {
    child.stdin.write(`${line}\n`);
    return next();
  };
  return {
    url: first.url,
    drop: (refuseForSeconds = 0) => command(`drop ${refuseForSeconds}`),
    stats: () => command("stats"),
    async stop() {
      child.stdin.end();
      await Promise.race([new Promise((r) => child.once("exit", r)), sleep(5000)]);
      if (child.exitCode === null) child.kill("SIGKILL");
    },
  };
}

/** A TCP proxy to `target`; `cut(ms)` drops every connection and refuses new ones for `ms`. */
export async function startProxy(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  let refuseUntil = 0;
  let connections = 0;
  const server = net.createServer((client) => {
    if (Date.now() < refuseUntil) return client.destroy();
    connections += 1;
    const upstream = net.connect(Number(port), hostname);
    sockets.add(client).add(upstream);
    const close = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("error", close).on("close", close);
    upstream.on("error", close).on("close", close);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    get connections() {
      return connections;
    },
    cut(refuseMs = 0) {
      refuseUntil = Date.now() + refuseMs;
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    stop: () => {
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(r));
    },
  };
}

/** A chain of `n` noop ToDos of `ms` each: s0 -> s1 -> ... */
export function chain(n, ms) {
  return {
    todos: Array.from({ length: n }, (_, i) => ({
      key: `s${i}`,
      action: "noop",
      params: { duration_ms: ms },
      depends_on: i ? [`s${i - 1}`] : [],
    })),
  };
}

/** Every stored event of a job, by the long-poll API. */
export async function storedEvents(client, jobId) {
  const out = [];
  let after = 0;
  for (;;) {
    const page = await client.events(jobId, { after, wait: 0 });
    out.push(...page.events);
    after = page.last_event_id;
    if (page.done || !page.events.length) return out;
  }
}

export async function collect(iterable, onEvent = () => undefined) {
  const out = [];
  for await (const event of iterable) {
    out.push(event);
    await onEvent(event, out);
  }
  return out;
}
