"""Progress events: the one public shape shared by SSE, JSON long-polling and Realtime.

``docs/events.schema.json`` is the contract; the commit-time flush of the events
(``private.job_events_flush_v4``, in supabase/schemas/40_events_and_realtime.sql) builds the
same object in SQL for the broadcast.
"""

from __future__ import annotations

from typing import Any

from cpa_scheduler import graph

TERMINAL: frozenset[graph.Status] = frozenset({"done", "failed", "cancelled"})
TOPIC_EVENT = "job_events"  # the event name on the user and tenant topics
WAKE_EVENT = "todo_ready"  # the event name on a user's agents topic


def view(row: dict[str, Any]) -> dict[str, Any]:
    """A ``job_events`` row as the public event object."""
    return {
        "id": int(row["id"]),
        "job_id": str(row["job_id"]),
        "todo_id": str(row["todo_id"]) if row["todo_id"] else None,
        "kind": row["kind"],
        "status": row["status"],
        "data": row["data"],
        "created_at": row["created_at"].isoformat(),
    }


def is_terminal(event: dict[str, Any]) -> bool:
    """The job's last event: nothing follows it unless the job is retried."""
    return event.get("kind") == "job.status" and event.get("status") in TERMINAL


def ends(batch: list[dict[str, Any]], *, terminal: bool, complete: bool) -> bool:
    """Whether a read of a job's events reached its end: the job's status (read before the
    events) was final, the read was not cut by its page size, and its last event is the job's
    terminal one (or there was none left after the reader's position). A terminal event
    followed by more (the job was retried) is not the end."""
    if not terminal or not complete:
        return False
    return not batch or is_terminal(batch[-1])


def topic(tenant_id: object) -> str:
    """The tenant's Realtime topic, every event of the tenant; only its owners and admins may
    join it (topics are named without the client's ``realtime:`` prefix)."""
    return f"tenant:{tenant_id}"


def user_topic(tenant_id: object, user_id: object) -> str:
    """The events of the jobs a user owns; joinable by that user and the tenant's owners and
    admins."""
    return f"tenant:{tenant_id}:user:{user_id}"


def agents_topic(tenant_id: object, user_id: object) -> str:
    """``todo_ready`` wake-ups for a user's desktop agents; joinable by that user only."""
    return f"tenant:{tenant_id}:agents:{user_id}"
