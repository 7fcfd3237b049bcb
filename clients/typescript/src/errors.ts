/**
 * Typed errors from the API's problem+json answers (RFC 9457 with a stable `code`).
 *
 * Each error class matches one family of the server's `code`s (see the server's `errors.py`);
 * `error.code` keeps the exact code, so a caller can branch on a class or on the code.
 */
import type { components } from "./generated/openapi.js";

/** The problem+json body the API answers errors with. */
export type Problem = components["schemas"]["Problem"];

/** One field error of a 422: where (`loc`) and what (`msg`). */
export interface FieldError {
  loc: string[];
  msg: string;
  type?: string;
}

/** Anything the scheduler answered with an error, or a failure to reach it. */
export class CpaError extends Error {
  /** The stable problem code, e.g. `not_found`, `invalid`, `graph_cycle`. */
  readonly code: string;
  /** The HTTP status (0 when the server was not reached). */
  readonly status: number;
  /** Field errors of an invalid request (422), else empty. */
  readonly errors: FieldError[];
  /** The whole problem body, when there was one. */
  readonly problem: Problem | undefined;

  constructor(message: string, init: { code?: string; status?: number; errors?: FieldError[];
                                       problem?: Problem; cause?: unknown } = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.code = init.code ?? "error";
    this.status = init.status ?? 0;
    this.errors = init.errors ?? [];
    this.problem = init.problem;
  }
}

/** The request is invalid (422; 413 when too large): `errors` names the fields. */
export class InvalidError extends CpaError {}
/** Missing, expired or forged access token (401). */
export class AuthError extends CpaError {}
/** Authenticated, but the thing belongs to another user (403), e.g. another's agent id. */
export class ForbiddenError extends CpaError {}
/** No such job/schedule, or it is not visible to the caller (404). */
export class NotFoundError extends CpaError {}
/** The entity's state does not allow the change now (409), e.g. retrying a running job. */
export class ConflictError extends CpaError {}
/** Too many requests (429); retry after `retryAfter` seconds. */
export class RateLimitedError extends CpaError {
  readonly retryAfter: number;
  constructor(message: string, init: ConstructorParameters<typeof CpaError>[1] & { retryAfter: number }) {
    super(message, init);
    this.retryAfter = init.retryAfter;
  }
}
/** The scheduler (or its database) is unavailable or unreachable (503, or no answer). */
export class UnavailableError extends CpaError {}
/** Planning failed or no planner is configured (422 `planner`). */
export class PlannerError extends CpaError {}
/** A protocol message the server or this client cannot accept. */
export class ProtocolError extends InvalidError {}

const BY_CODE: Record<string, typeof CpaError> = {
  invalid: InvalidError,
  graph_invalid: InvalidError,
  graph_cycle: InvalidError,
  graph_too_large: InvalidError,
  action_invalid: InvalidError,
  body_too_large: InvalidError,
  message_invalid: ProtocolError,
  unauthenticated: AuthError,
  forbidden: ForbiddenError,
  not_found: NotFoundError,
  conflict: ConflictError,
  rate_limited: RateLimitedError,
  unavailable: UnavailableError,
  planner: PlannerError,
};

const BY_STATUS: Record<number, typeof CpaError> = {
  401: AuthError,
  403: ForbiddenError,
  404: NotFoundError,
  409: ConflictError,
  413: InvalidError,
  422: InvalidError,
  429: RateLimitedError,
  503: UnavailableError,
};

/** The typed error of an API answer with status >= 400 (its body already read as text). */
export function errorFromAnswer(status: number, text: string, headers: Headers): CpaError {
  let problem: Problem | undefined;
  try {
    const body: unknown = JSON.parse(text);
    if (body && typeof body === "object" && "detail" in body) problem = body as Problem;
  } catch {
    // Not JSON (a proxy's error page): the status and the text are all there is.
  }
  const code = problem?.code ?? `http_${status}`;
  const detail = problem?.detail ?? (text.trim().slice(0, 300) || `HTTP ${status}`);
  const cls = BY_CODE[code] ?? BY_STATUS[status] ?? CpaError;
  const errors = Array.isArray(problem?.errors) ? (problem.errors as unknown as FieldError[]) : [];
  const init = { code, status, errors, problem };
  if (cls === RateLimitedError) {
    const retryAfter = Number(headers.get("Retry-After") ?? "1");
    return new RateLimitedError(detail, { ...init, retryAfter: Number.isFinite(retryAfter) ? retryAfter : 1 });
  }
  return new cls(detail, init);
}
