"""Dependencies: authentication, a request-scoped RLS session, the caller's tenant, limits.

A request runs in one transaction as ``authenticated`` with its verified claims; the tenant
lookup and the Postgres rate limit run inside it too, so a request holds one pooled connection.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from cpa_scheduler import auth, errors, logs, service, settings, store


# Dependencies are coroutines: FastAPI runs a plain ``def`` dependency in its threadpool, a
# thread hop per dependency and request for work that takes microseconds.
async def get_state(request: Request) -> service.Services:
    """The app's services (see :func:`cpa_scheduler.api.create_app`); an app made without
    them builds them from the environment on the first request that needs them, and keeps
    them, so warm Lambda invocations reuse the pool."""
    services: service.Services | None = request.app.state.services
    if services is None:
        services = request.app.state.services = service.build_services(settings.from_env())
    return services


AppState = Annotated[service.Services, Depends(get_state)]


async def get_claims(request: Request, app: AppState) -> auth.Claims:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.AuthError("Send 'Authorization: Bearer <Supabase access token>'.")
    if app.verifier.may_block(token.strip()):
        # A JWKS-signed token may need the project's keys fetched (blocking HTTP): off the loop.
        return await asyncio.to_thread(app.verifier.verify, token.strip())
    return app.verifier.verify(token.strip())


VerifiedClaims = Annotated[auth.Claims, Depends(get_claims)]


async def get_session(app: AppState, claims: VerifiedClaims) -> AsyncIterator[store.Session]:
    """One transaction as ``authenticated`` with the caller's verified claims."""
    async with app.store.user(claims.for_database()) as session:
        yield session


# Function scope: the transaction commits before the response is sent, so a client reading its
# job right after the answer finds it, and a failing commit (the events flush runs at commit)
# becomes the answer instead of following a 201 (request scope would close it after sending).
UserSession = Annotated[store.Session, Depends(get_session, scope="function")]


@dataclass(frozen=True)
class Caller:
    claims: auth.Claims
    tenant_id: uuid.UUID


def _uuid_schema(schema: dict[str, Any]) -> None:
    schema.pop("anyOf", None)
    schema.update(type="string", format="uuid")


# Checked by wanted_tenant (the POST /v1/jobs shortcut reads the header itself and must answer
# alike), documented as the UUID it must be.
TenantHeader = Annotated[
    str | None,
    Header(
        description="Act for this tenant (its UUID; optional: the oldest membership).",
        json_schema_extra=_uuid_schema,
    ),
]


def wanted_tenant(claims: auth.Claims, x_cpa_tenant: uuid.UUID | str | None) -> uuid.UUID | None:
    """The tenant the caller asks for (header, else the token's app_metadata), unchecked;
    None: their oldest membership."""
    # An empty header is a wrong tenant id, not an absent one.
    wanted = claims.app_metadata.get("tenant_id") if x_cpa_tenant is None else x_cpa_tenant
    if wanted is None:
        return None
    try:
        return uuid.UUID(str(wanted))
    except ValueError:
        raise errors.InvalidError(f"The tenant id {wanted!r} is not a UUID.") from None


async def get_caller(
    claims: VerifiedClaims, session: UserSession, x_cpa_tenant: TenantHeader = None
) -> Caller:
    tenant = wanted_tenant(claims, x_cpa_tenant)
    tenants = await session.my_tenants()
    if tenant is not None:
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
