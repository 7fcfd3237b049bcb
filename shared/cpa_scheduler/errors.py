"""Domain errors: one base class, a stable ``code`` each, and messages that are sentences.

Hierarchy::

    CpaError                         (code "error")
    ├── InvalidError                 client input is wrong (HTTP 422)
    │   ├── GraphError               a ToDo graph breaks a rule
    │   │   ├── CycleError           the graph has a cycle; the message names it
    │   │   └── GraphTooLargeError   more ToDos than the limit (HTTP 413)
    │   ├── ActionError              unknown action or params that do not fit its schema
    │   ├── BodyTooLargeError        the request body is over the size limit (HTTP 413)
    │   ├── ProtocolError            a message that is not a valid protocol message
    │   └── ConfigError              configuration is malformed or incomplete (env, YAML,
    │                                extras); HTTP 500: the operator's to fix, not the caller's
    ├── AuthError                    missing, expired or forged token (HTTP 401)
    ├── ForbiddenError               authenticated, but the thing belongs to another user
    │                                (an agent id another user registered; HTTP 403)
    ├── NotFoundError                no such entity, or not visible to the caller (HTTP 404)
    ├── ConflictError                a state transition that is not allowed now (HTTP 409)
    ├── RateLimitedError             too many requests; retry later (HTTP 429)
    ├── UnavailableError             a dependency (the database) is down (HTTP 503)
    │   ├── DeadlockError            the database aborted a statement to break a lock cycle
    │   │                            (40P01); an operation that can is tried again first
    │   └── LockTimeoutError         a statement waited for a lock past lock_timeout (55P03);
    │                                a claim's bounded failure gives up on it
    ├── RegistryError                an executor registered twice, or none for an action
    ├── PlannerError                 no planner configured, or the plan stayed invalid
    └── ExecutorError                raised by an executor while running a ToDo
        ├── RetryableError           transient: the dispatcher backs off and retries
        └── PermanentError           retrying cannot help: the ToDo fails now
            └── TargetRefusedError   an outbound HTTP target is private or loopback

Every error carries ``code`` (stable, for API payloads), ``status`` (the HTTP status the API
answers with) and optional ``errors``: a list of ``{"loc": [...], "msg": ...}`` field errors.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CpaError(Exception):
    """Something went wrong in CPA Scheduler."""

    code: ClassVar[str] = "error"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors: list[dict[str, Any]] = errors or []

    def to_dict(self) -> dict[str, Any]:
        """The problem fields this error contributes to an API answer."""
        body: dict[str, Any] = {"code": self.code, "detail": self.message}
        if self.errors:
            body["errors"] = self.errors
        return body


class InvalidError(CpaError):
    """The input is not valid."""

    code = "invalid"
    status = 422


class GraphError(InvalidError):
    """The ToDo graph breaks a rule."""

    code = "graph_invalid"


class CycleError(GraphError):
    """The ToDo graph has a cycle."""

    code = "graph_cycle"

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        path = " -> ".join(cycle)
        super().__init__(
            f"The graph has a cycle: {path}. Remove one of these dependencies so the ToDos can run."
        )


class GraphTooLargeError(GraphError):
    """The ToDo graph has more ToDos than allowed."""

    code = "graph_too_large"
    status = 413


class ActionError(InvalidError):
    """An unknown action, or params that do not fit the action's schema."""

    code = "action_invalid"


class BodyTooLargeError(InvalidError):
    """The request body is larger than allowed."""

    code = "body_too_large"
    status = 413


class ProtocolError(InvalidError):
    """A message that is not a valid protocol message."""

    code = "message_invalid"


class ConfigError(InvalidError):
    """Configuration is malformed (actions, intents) or incomplete (a missing extra)."""

    code = "config_invalid"
    status = 500


class AuthError(CpaError):
    """The request is not authenticated."""

    code = "unauthenticated"
    status = 401


class ForbiddenError(CpaError):
    """The caller is authenticated but may not use this (an agent id another user holds)."""

    code = "forbidden"
    status = 403


class NotFoundError(CpaError):
    """The entity does not exist or is not visible to the caller."""

    code = "not_found"
    status = 404


class ConflictError(CpaError):
    """The requested change conflicts with the entity's current state."""

    code = "conflict"
    status = 409


class RateLimitedError(CpaError):
    """Too many requests."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(CpaError):
    """A backing service is unavailable."""

    code = "unavailable"
    status = 503


class DeadlockError(UnavailableError):
    """PostgreSQL aborted the statement to break a deadlock (SQLSTATE 40P01)."""


class LockTimeoutError(UnavailableError):
    """A statement waited for a lock longer than ``lock_timeout`` allows (SQLSTATE 55P03)."""


class RegistryError(CpaError):
    """An executor registry problem."""

    code = "registry"


class PlannerError(CpaError):
    """Planning failed or no planner is configured."""

    code = "planner"
    status = 422


class ExecutorError(CpaError):
    """An executor failed to run a ToDo."""

    code = "executor"


class RetryableError(ExecutorError):
    """A transient failure; the ToDo is retried with backoff."""

    code = "retryable"


class PermanentError(ExecutorError):
    """A failure retrying cannot fix; the ToDo fails at once."""

    code = "permanent"


class TargetRefusedError(PermanentError):
    """An outbound request to a private, loopback or link-local address was refused."""

    code = "target_refused"
