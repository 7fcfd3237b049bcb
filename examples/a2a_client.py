"""Hand CPA Scheduler a job over A2A and print its streamed updates (a2a-sdk's client).

    export CPA_TOKEN=$(cpa-scheduler token --tenant demo --user me)
    python examples/a2a_client.py ["Erinnere mich in 3 Sekunden an den Tee"]

The client reads the Agent Card at CPA_API_URL (default http://127.0.0.1:8000) and sends the
text with SendStreamingMessage; the token is the Supabase access token of the REST API. The
stream starts with the task (the job), then status updates and artifacts (a ToDo's result)
until the job ends. Each update's metadata carries ``cpa.event_id``: after a dropped
connection, SubscribeToTask with the header ``Last-Event-ID: <that id>`` resumes from there.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import httpx
from a2a.client import ClientConfig, create_client
from a2a.types import Message, Part, Role, SendMessageRequest, StreamResponse, TaskState


def describe(event: StreamResponse) -> str:
    """One line for one stream event."""
    if event.HasField("task"):
        state = TaskState.Name(event.task.status.state)
        return f"task {event.task.id} {state}"
    if event.HasField("status_update"):
        status = event.status_update.status
        text = " ".join(p.text for p in status.message.parts if p.text)
        return f"status {TaskState.Name(status.state)}: {text}"
    if event.HasField("artifact_update"):
        artifact = event.artifact_update.artifact
        text = " ".join(p.text for p in artifact.parts if p.text)
        return f"artifact {artifact.name}: {text or artifact.description}"
    return str(event)


async def main(text: str) -> int:
    url = os.environ.get("CPA_API_URL", "http://127.0.0.1:8000")
    token = os.environ.get("CPA_TOKEN")
    if not token:
        print("Set CPA_TOKEN (cpa-scheduler token --tenant demo --user me).", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(headers=headers, timeout=60) as http:
        client = await create_client(url, ClientConfig(httpx_client=http, streaming=True))
        message = Message(
            message_id=str(uuid.uuid4()), role=Role.ROLE_USER, parts=[Part(text=text)]
        )
        state = TaskState.TASK_STATE_UNSPECIFIED
        async for event in client.send_message(SendMessageRequest(message=message)):
            print(describe(event), flush=True)
            if event.HasField("status_update"):
                state = event.status_update.status.state
            elif event.HasField("task"):
                state = event.task.status.state
    return 0 if state == TaskState.TASK_STATE_COMPLETED else 1


if __name__ == "__main__":
    request = " ".join(sys.argv[1:]) or "Erinnere mich in 3 Sekunden an den Tee"
    sys.exit(asyncio.run(main(request)))
