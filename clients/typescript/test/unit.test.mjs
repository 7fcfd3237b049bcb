// Pieces without a server: the SSE reader, the typed errors, the topics.
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  ConflictError,
  CpaClient,
  CpaError,
  ForbiddenError,
  InvalidError,
  NotFoundError,
  RateLimitedError,
  errorFromAnswer,
  isTerminal,
} from "../dist/index.js";
import { readSse } from "../dist/sse.js";

function stream(chunks) {
  const enc = new TextEncoder();
  return new ReadableStream({
    start(c) {
      for (const chunk of chunks) c.enqueue(enc.encode(chunk));
      c.close();
    },
  });
}

test("SSE: fields split across chunks, comments, CRLF, multi-line data, an unfinished event dropped", async () => {
  const body = stream(["retry: 10", "00\n\n: heartbeat\n\nid: 7\nevent: job.st", "atus\ndata: {\"a\":\n",
                       "data: 1}\r", "\n\r\nid: 8\ndata: {\"b\":2}\n\nid: 9\ndata: {\"c\""]);
  const got = [];
  for await (const f of readSse(body)) got.push(f);
  assert.deepEqual(got, [
    { kind: "retry", value: "1000" },
    { kind: "data", value: "{\"a\":\n1}", id: "7", event: "job.status" },
    { kind: "data", value: "{\"b\":2}", id: "8", event: undefined },
  ]);
});

test("problem+json codes map to error classes; the code and fields are kept", () => {
  const h = new Headers({ "Retry-After": "7" });
  const problem = (status, code, extra = {}) =>
    errorFromAnswer(status, JSON.stringify({ type: "about:blank", title: "t", status, code, detail: `d ${code}`, ...extra }), h);
  const cycle = problem(422, "graph_cycle", { errors: [{ loc: ["body", "graph"], msg: "cycle" }] });
  assert.ok(cycle instanceof InvalidError);
  assert.equal(cycle.code, "graph_cycle");
  assert.deepEqual(cycle.errors[0].loc, ["body", "graph"]);
  assert.ok(problem(404, "not_found") instanceof NotFoundError);
  assert.ok(problem(409, "conflict") instanceof ConflictError);
  assert.ok(problem(403, "forbidden") instanceof ForbiddenError);
  const limited = problem(429, "rate_limited");
  assert.ok(limited instanceof RateLimitedError);
  assert.equal(limited.retryAfter, 7);
  const unknown = problem(418, "teapot");
  assert.ok(unknown instanceof CpaError && !(unknown instanceof InvalidError));
  assert.equal(unknown.code, "teapot");
  const html = errorFromAnswer(502, "<html>Bad Gateway</html>", h);
  assert.equal(html.status, 502);
  assert.equal(html.code, "http_502");
});

test("a job's topic is its owner's, or the tenant's on a server without created_by", () => {
  assert.equal(CpaClient.jobTopic({ tenant_id: "t", created_by: "u" }), "tenant:t:user:u");
  assert.equal(CpaClient.jobTopic({ tenant_id: "t" }), "tenant:t");
});

test("only a job.status event with a final status ends a job", () => {
  const e = (kind, status) => ({ id: 1, job_id: "j", todo_id: null, kind, status, data: {}, created_at: "" });
  assert.ok(isTerminal(e("job.status", "cancelled")));
  assert.ok(!isTerminal(e("todo.status", "done")));
  assert.ok(!isTerminal(e("job.status", "running")));
});
