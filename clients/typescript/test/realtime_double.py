"""Runs the repository's Realtime test double (tests/realtime_double.py) for the Node tests.

Beside a ``cpa-scheduler serve`` in local mode (same ``CPA_DATA_DIR``): the double reads the
same embedded PostgreSQL and verifies tokens with the same local secret. It prints one JSON
line ``{"url": ...}`` when it listens, then answers one JSON line per command read from stdin:
``drop <seconds>`` cuts every socket and refuses new ones for that long; ``stats`` reports the
joins (topic, accepted) and how many broadcasts it relayed. It ends when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from cpa_scheduler import auth, embedded, settings

from tests.realtime_double import RealtimeDouble


def _answer(value: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def main() -> None:
    config = settings.from_env()
    url = embedded.EmbeddedPostgres(config.data_dir).url()
    secret = auth.local_secret(config.data_dir)
    async with RealtimeDouble(url, secret, auth.LOCAL_ISSUER) as rt:
        _answer({"url": rt.url})
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command, *args = line.split()
            if command == "drop":
                await rt.drop(refuse_for=float(args[0]) if args else 0.0)
                answer: dict[str, object] = {"ok": True}
            else:
                joins = [{"topic": j["topic"], "accepted": j["accepted"]} for j in rt.joins]
                answer = {"joins": joins, "relayed": rt.relayed, "joined": rt.joined}
            _answer(answer)


if __name__ == "__main__":
    asyncio.run(main())
