"""The bare FastAPI baseline of the API benchmark: one insert into the same Postgres."""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool

pool = AsyncConnectionPool(
    os.environ["DATABASE_URL"],
    min_size=4,
    max_size=10,
    open=False,
    kwargs={"prepare_threshold": None},
)
app = FastAPI()


@app.post("/bare", status_code=201)
async def bare(body: dict[str, Any]) -> dict[str, Any]:
    if pool.closed:
        await pool.open()
    async with pool.connection() as conn:
        cur = await conn.execute(
            "insert into bare (body) values (%s::jsonb) returning id", (json.dumps(body),)
        )
        row = await cur.fetchone()
    assert row is not None
    return {"id": row[0]}
