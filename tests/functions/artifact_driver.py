"""Drive the Lambda handlers from a built artifact, as the Lambda runtime would.

Run as ``python -I -S artifact_driver.py ARTIFACT EVENTS_DIR`` with DATABASE_URL,
SUPABASE_URL, SUPABASE_JWT_SECRET and CPA_TEST_TOKEN set: only the artifact is importable.
Prints one JSON line per step for the test to check.
"""

import json
import os
import sys
import time
from pathlib import Path

artifact, events = sys.argv[1], Path(sys.argv[2])
sys.path.insert(0, artifact)

import functions.api  # noqa: E402
import functions.dispatcher  # noqa: E402


class Context:
    function_name = "cpa"
    aws_request_id = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return 8_000


def event(name: str) -> dict:
    raw = (events / name).read_text().replace("{{token}}", os.environ["CPA_TEST_TOKEN"])
    return json.loads(raw)


def say(step: str, **fields: object) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


import psycopg  # noqa: E402  (from the artifact, as the handlers use it)

say("modules", psycopg=psycopg.pq.__impl__, paths=[m.__file__ for m in (functions.api, psycopg)])

health = functions.api.handler(event("function_url_get_healthz.json"), Context())
say("healthz", status=health["statusCode"], body=json.loads(health["body"]))

created = functions.api.handler(event("apigw_v2_post_jobs.json"), Context())
job = json.loads(created["body"])
say("create", status=created["statusCode"], job=job)

get = event("apigw_v2_post_jobs.json")
get["requestContext"]["http"]["method"] = "GET"
get["rawPath"] = get["requestContext"]["http"]["path"] = f"/v1/jobs/{job['id']}"
get["routeKey"] = "GET /v1/jobs/{id}"
get.pop("body", None)
deadline = time.monotonic() + 30
passes = []
while time.monotonic() < deadline:
    passes.append(functions.dispatcher.handler(event("scheduler.json"), Context()))
    answer = functions.api.handler(get, Context())
    status = json.loads(answer["body"])["status"]
    if status in ("done", "failed", "cancelled"):
        break
    time.sleep(0.5)
say("dispatch", status=status, passes=len(passes), first=passes[0])

# The A2A edge from the artifact alone: the SDK imports and answers GetTask for the job.
rpc = event("apigw_v2_post_jobs.json")
rpc.pop("routeKey", None)
rpc["rawPath"] = rpc["requestContext"]["http"]["path"] = "/a2a"
rpc["headers"].pop("idempotency-key")
rpc["headers"]["a2a-version"] = "1.0"
rpc["body"] = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": job["id"]}}
)
answer = functions.api.handler(rpc, Context())
say("a2a", status=answer["statusCode"], body=json.loads(answer["body"]))
