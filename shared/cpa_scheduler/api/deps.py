"""Dependencies: authentication, a request-scoped RLS session, the caller's tenant, limits.

A request runs in one transaction as ``authenticated`` with its verified claims; the tenant
lookup and the Postgres rate limit run inside it too, so a request holds one pooled connection.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from cpa_scheduler import auth, errors, logs, store
from cpa_scheduler.api import state as state_mod


def get_state() -> state_mod.State:
    return state_mod.get()


AppState = Annotated[state_mod.State, Depends(get_state)]


def get_claims(request: Request, app: AppState) -> auth.Claims:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.AuthError("Send 'Authorization: Bearer <Supabase access token>'.")
    return app.verifier.verify(token.strip())


VerifiedClaims = Annotated[auth.Claims, Depends(get_claims)]


async def get_session(app: AppState, claims: VerifiedClaims) -> AsyncIterator[store.Session]:
    """One transaction as ``authenticated`` with the caller's verified claims."""
    async with app.store.user(claims.for_database()) as session:
        yield session


UserSession = Annotated[store.Session, Depends(get_session)]


@dataclass(frozen=True)
class Caller:
    claims: auth.Claims
    tenant_id: uuid.UUID


async def get_caller(
    claims: VerifiedClaims,
    session: UserSession,
    x_cpa_tenant: Annotated[
        str | None, Header(description="Act for this tenant (optional).")
    ] = None,
) -> Caller:
    wanted = x_cpa_tenant or claims.app_metadata.get("tenant_id")
    tenants = await session.my_tenants()
    if wanted is not None:
        try:
            tenant = uuid.UUID(str(wanted))
        except ValueError:
            raise errors.InvalidError(f"The tenant id {wanted!r} is not a UUID.") from None
        if tenant not in tenants:
            raise errors.NotFoundError(
                f"The tenant {tenant} does not exist or you are not a member."
            )
        logs.annotate(tenant_id=tenant)
        return Caller(claims, tenant)
    if not tenants:
        raise errors.NotFoundError(
            "You are not a member of any tenant; ask an owner to add you (local mode: "
            "cpa-scheduler token --tenant NAME --user NAME)."
        )
    logs.annotate(tenant_id=tenants[0])
    return Caller(claims, tenants[0])


CurrentCaller = Annotated[Caller, Depends(get_caller)]
