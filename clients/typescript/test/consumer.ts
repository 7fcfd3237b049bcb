// Compiled (not run) against dist/: the README's examples type-check with the published
// declarations, in a project without Node's types (a browser or Electron renderer).
import {
  Agent,
  CpaClient,
  NotFoundError,
  RetryableError,
  type Job,
  type Message,
  type ProgressEvent,
} from "../dist/index.js";

export async function example(token: string): Promise<void> {
  const cpa = new CpaClient({ baseUrl: "http://127.0.0.1:8000", token });
  const job: Job = await cpa.submit({ request: "Remind me tomorrow at 9am to call Anna", time_zone: "Europe/Berlin" });
  const status: "pending" | "running" | "done" | "failed" | "cancelled" = job.status;
  for await (const event of cpa.follow(job.id, { via: "sse" })) {
    const e: ProgressEvent = event;
    if (e.kind === "job.status") console.log(status, e.status, e.id.toFixed(0));
  }
  try {
    await cpa.get(job.id);
  } catch (e) {
    if (e instanceof NotFoundError) console.log(e.code, e.status, e.errors.length);
  }
  const page = await cpa.list({ status: "done", limit: 10 });
  console.log(page.jobs.map((j) => j.todos?.map((t) => t.key)), page.next_cursor);
  const agent = new Agent(cpa, {
    agentId: "a",
    handlers: {
      "desktop.open_app": async ({ app }, assign, { inform }) => {
        await inform(`opening ${String(app)} for ${assign.payload.job_id}`);
        if (!app) throw new RetryableError("no app yet");
        return { opened: app };
      },
    },
  });
  await agent.start();
  const reply: Message = await cpa.send({ type: "discover", sender: "a", receiver: "scheduler", payload: {} });
  if (reply.type === "offer") console.log(reply.payload.actions);
}
