/**
 * @cpa-scheduler/client: submit and follow CPA Scheduler jobs and act as a desktop agent,
 * from Node 20+, browsers and Electron.
 */
export { CpaClient } from "./client.js";
export type { ClientOptions, FollowOptions, RealtimeOptions, SubmitOptions, TokenSource } from "./client.js";
export { Agent, RetryableError } from "./agent.js";
export type { ActionHandler, AgentOptions, AssignmentContext } from "./agent.js";
export {
  AuthError,
  ConflictError,
  CpaError,
  ForbiddenError,
  InvalidError,
  NotFoundError,
  PlannerError,
  ProtocolError,
  RateLimitedError,
  UnavailableError,
  errorFromAnswer,
} from "./errors.js";
export type { FieldError, Problem } from "./errors.js";
export { RealtimeUnavailable } from "./realtime.js";
export type { WebSocketConstructor } from "./realtime.js";
export { TERMINAL, isTerminal } from "./types.js";
export type * from "./types.js";
