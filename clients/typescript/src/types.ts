/** The API's types, named: all of them come from the generated files. */
import type { components, paths } from "./generated/openapi.js";
import type { ProgressEvent } from "./generated/event.js";
import type * as protocol from "./generated/protocol.js";

type S = components["schemas"];

export type { components, paths } from "./generated/openapi.js";
export type { ProgressEvent } from "./generated/event.js";
export type {
  Message,
  Assign,
  AssignPayload,
  Done,
  Failure,
  Offer,
  Agree,
  Refuse,
  Inform,
} from "./generated/protocol.js";

/** A job as `GET /v1/jobs/{id}` answers it; `created_by` names its owner (and so its topic). */
export type Job = S["JobOut"];
export type Todo = S["TodoOut"];
export type JobPage = Omit<S["JobPage"], "jobs"> & { jobs: Job[] };
export type JobCreate = S["JobCreate"];
export type GraphSpec = S["GraphSpec"];
export type TodoSpec = S["TodoSpec"];
export type JobStatus = Job["status"];
export type Schedule = S["ScheduleOut"];
export type ScheduleCreate = S["ScheduleCreate"];
/** The claim body; `wait`: seconds to long-poll (0-20). */
export type ClaimBody = S["ClaimBody"];

/** An agent as `GET /v1/agents` lists it. */
export type AgentInfo = S["AgentOut"];
/** `GET /v1/agents`: the caller's agents, and the tenant and user that name the wake-up topic. */
export type AgentList = S["AgentList"];

type EventsGet = paths["/v1/jobs/{job_id}/events"]["get"];
/** One JSON long-poll answer of `GET /v1/jobs/{id}/events?after=`. */
export type EventPage = Omit<EventsGet["responses"][200]["content"]["application/json"], "events"> & {
  events: ProgressEvent[];
};

/** An `assign` message as a claim answers it (its payload names the ToDo). */
export type AssignMessage = protocol.Assign & { type: "assign"; id: string };

/** The statuses after which a job has no further event (until it is retried). */
export const TERMINAL: ReadonlySet<string> = new Set(["done", "failed", "cancelled"]);

/** Whether an event is its job's last one: a `job.status` event with a final status. */
export function isTerminal(event: ProgressEvent): boolean {
  return event.kind === "job.status" && event.status !== null && TERMINAL.has(event.status);
}
