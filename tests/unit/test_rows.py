"""The typed rows: each query built as a frozen row selects exactly the row's fields, in order."""

from __future__ import annotations

import dataclasses
import re

import pytest
from cpa_scheduler import sql, store

TYPED = {
    "job_create": store.JobRow,
    "job_get": store.JobRow,
    "job_list": store.JobRow,
    "task_list": store.JobRow,
    "job_cancel": store.JobRow,
    "job_retry": store.JobRow,
    "job_by_idempotency_key": store.JobRow,
    "schedule_fire": store.JobRow,
    "todo_claim": store.TodoRow,
}


@pytest.mark.parametrize("name", sorted(TYPED))
def test_query_selects_the_row_fields(name: str) -> None:
    found = re.match(r"select\s+(.*?)\s+from\s", sql.get(name), re.DOTALL)
    assert found is not None, name
    selected = [column.strip() for column in found.group(1).split(",")]
    assert selected == [f.name for f in dataclasses.fields(TYPED[name])]
