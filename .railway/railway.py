"""Railway Infrastructure as Code for CPA Scheduler: the api web service and the dispatcher worker.

This is the successor of Config as Code (``/railway.json`` for the api and
``/infra/railway/dispatcher.json`` for the worker), which Railway stops honouring for existing
services on 2026-12-01. The two describe the same services; ``tests/unit/test_railway.py``
renders this file offline (``main(...).to_graph()``) and checks that they agree. See
``infra/README.md`` for which to use.

Applied with the Railway CLI from the repository root (Python authoring is in beta)::

    pip install railway-sdk==0.7.0       # the dev extra has it
    railway config plan                   # preview; changes nothing
    railway config apply

The source is the GitHub repository named by ``CPA_RAILWAY_REPO`` (``owner/name``; branch
``CPA_RAILWAY_BRANCH``, default ``main``) when it is set while the CLI evaluates this file;
without it the services have no source and ``railway up`` deploys the working directory.
Secrets are not declared here: set ``DATABASE_URL`` (direct or session-pooler URL, since LISTEN
needs a session), ``SUPABASE_URL``, ``SUPABASE_JWT_SECRET`` and the optional variables in
Railway.
"""

from __future__ import annotations

import os
from typing import Any

from railway_sdk import Project, define_railway, github, project, service

BUILD = "RAILPACK"


def _source() -> dict[str, Any] | None:
    repo = os.environ.get("CPA_RAILWAY_REPO", "").strip()
    if not repo:
        return None
    return github(repo, branch=os.environ.get("CPA_RAILWAY_BRANCH", "").strip() or "main")


@define_railway
def main(ctx: Any = None) -> Project:
    # The HTTP API. Migrations run before each deploy, from the installed package.
    api = service(
        "api",
        source=_source(),
        build={
            "builder": BUILD,
            "watchPatterns": ["functions/**", "shared/**", "supabase/**", "pyproject.toml"],
        },
        start="uvicorn cpa_scheduler.api:app --host 0.0.0.0 --port $PORT",
        preDeploy=["cpa-scheduler migrate"],
        healthcheck="/readyz",
        healthcheckTimeout=120,
        deploy={"restartPolicyType": "ON_FAILURE", "restartPolicyMaxRetries": 5},
    )
    # The long-running dispatcher, woken by LISTEN/NOTIFY; SIGTERM lets it finish what it holds.
    # One replica: more would only compete for the same ready ToDos (safe, but no faster).
    dispatcher = service(
        "dispatcher",
        source=_source(),
        build={"builder": BUILD, "watchPatterns": ["functions/**", "shared/**", "pyproject.toml"]},
        start="cpa-scheduler dispatch",
        replicas=1,
        deploy={"restartPolicyType": "ALWAYS", "drainingSeconds": 60},
    )
    return project("cpa-scheduler", resources=[api, dispatcher])
