"""Supabase access-token verification with PyJWT, and local-mode token minting.

Accepted: asymmetric tokens (ES256, RS256) whose ``kid`` is in the project's JWKS
(``SUPABASE_JWKS_URL``, or derived from ``SUPABASE_URL``; cached), and legacy HS256 tokens
signed with ``SUPABASE_JWT_SECRET``. Every token must carry ``exp``, ``sub``, ``aud =
authenticated`` and, when the issuer is known, the project's ``iss``.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from cpa_scheduler import errors, settings

AUDIENCE = "authenticated"
LOCAL_ISSUER = "cpa-scheduler-local"
_ASYMMETRIC = ["ES256", "RS256"]
VERIFIED_FOR = 300.0  # seconds a verified token is answered from memory (see Verifier.verify)
VERIFIED_MAX = 4096  # tokens kept


class Claims(BaseModel):
    """The verified claims of a request, as set in the transaction for RLS."""

    model_config = ConfigDict(frozen=True, extra="allow")

    sub: uuid.UUID
    role: str = "authenticated"
    aud: str | list[str] = AUDIENCE
    exp: int
    iss: str | None = None
    email: str | None = None
    app_metadata: dict[str, Any] = {}

    def for_database(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Verifier:
    """Verifies bearer tokens against the configured keys."""

    def __init__(
        self,
        *,
        hs256_secret: str | None = None,
        jwks_url: str | None = None,
        issuer: str | None = None,
        leeway: float = 5.0,
    ) -> None:
        if not hs256_secret and not jwks_url:
            raise errors.ConfigError(
                "No way to verify tokens: set SUPABASE_JWT_SECRET or SUPABASE_URL/SUPABASE_JWKS_URL."
            )
        import jwt  # deferred to the first request: PyJWT + cryptography are slow to import

        self._secret = hs256_secret
        self._issuer = issuer
        self._leeway = leeway
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=600) if jwks_url else None
        # Tokens verified before: the exact token text -> (its claims, accepted until). A client
        # sends the same token with every request until it expires; PyJWT checks each of its
        # characters on every decode, a tenth of a request's CPU.
        self._verified: dict[str, tuple[Claims, float]] = {}
        self._lock = threading.Lock()

    def _cached(self, token: str) -> Claims | None:
        hit = self._verified.get(token)
        if hit is None:
            return None
        if time.time() < hit[1]:
            return hit[0]
        self._verified.pop(token, None)
        return None

    def may_block(self, token: str) -> bool:
        """Whether verifying ``token`` may fetch the JWKS (network I/O); HS256 never does."""
        import jwt

        if self._cached(token) is not None:
            return False
        try:
            return self._jwks is not None and jwt.get_unverified_header(token).get("alg") != "HS256"
        except jwt.PyJWTError:
            return False  # verify() refuses it without I/O

    def verify(self, token: str) -> Claims:
        """The token's claims, or :class:`errors.AuthError`.

        A token verified in the last :data:`VERIFIED_FOR` seconds is answered from memory until
        it expires (``exp`` plus the leeway, PyJWT's own rule), so a rotated-out signing key
        stops being accepted within that time; at most :data:`VERIFIED_MAX` tokens are kept."""
        claims = self._cached(token)
        if claims is not None:
            return claims
        claims = self._verify(token)
        now = time.time()
        with self._lock:  # verify may run in a worker thread (a JWKS fetch)
            if len(self._verified) >= VERIFIED_MAX:
                for old in [t for t, (_, until) in self._verified.items() if until <= now]:
                    del self._verified[old]
                while len(self._verified) >= VERIFIED_MAX:  # the oldest first (insertion order)
                    del self._verified[next(iter(self._verified))]
            self._verified[token] = (claims, min(claims.exp + self._leeway, now + VERIFIED_FOR))
        return claims

    def _verify(self, token: str) -> Claims:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise errors.AuthError(
                "The bearer token is not a JWT; send 'Authorization: Bearer <access token>'."
            ) from None
        alg = header.get("alg")
        key: Any
        if alg == "HS256":
            if not self._secret:
                raise errors.AuthError(
                    "HS256 tokens are not accepted here; use a JWKS-signed token."
                )
            key, algorithms = self._secret, ["HS256"]
        elif alg in _ASYMMETRIC and self._jwks is not None:
            try:
                key = self._jwks.get_signing_key_from_jwt(token).key
            except jwt.PyJWKClientError as exc:
                raise errors.AuthError(f"The token's signing key is unknown: {exc}.") from None
            algorithms = _ASYMMETRIC
        else:
            raise errors.AuthError(f"The token algorithm {alg!r} is not accepted.")
        options = {"require": ["exp", "sub", "aud"]}
        try:
            data = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=AUDIENCE,
                issuer=self._issuer,
                leeway=self._leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise errors.AuthError("The access token has expired; sign in again.") from None
        except jwt.InvalidAudienceError:
            raise errors.AuthError("The access token is not for 'authenticated' users.") from None
        except jwt.InvalidIssuerError:
            raise errors.AuthError("The access token was issued by another project.") from None
        except jwt.InvalidSignatureError:
            raise errors.AuthError("The access token's signature is invalid.") from None
        except jwt.PyJWTError as exc:
            raise errors.AuthError(f"The access token is invalid: {exc}.") from None
        try:
            claims = Claims.model_validate(data)
        except ValueError:
            raise errors.AuthError("The access token's 'sub' is not a user id.") from None
        if claims.role != "authenticated":
            raise errors.AuthError(f"The role {claims.role!r} may not call this API.")
        return claims


def local_secret(data_dir: Path) -> str:
    """Local mode's HS256 secret, created once under the data directory."""
    path = data_dir / "jwt-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def verifier(config: settings.Settings) -> Verifier:
    """The verifier for this deployment (local mode: the minted secret and local issuer)."""
    if config.local and not config.supabase_jwt_secret and not config.jwks_url:
        return Verifier(hs256_secret=local_secret(config.data_dir), issuer=LOCAL_ISSUER)
    return Verifier(
        hs256_secret=config.supabase_jwt_secret,
        jwks_url=config.jwks_url,
        issuer=config.issuer,
    )


def mint(
    secret: str,
    user_id: uuid.UUID,
    *,
    issuer: str = LOCAL_ISSUER,
    ttl: int = 24 * 3600,
    email: str | None = None,
    tenant_id: uuid.UUID | None = None,
) -> str:
    """An HS256 access token in Supabase's shape (local mode and tests)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "aud": AUDIENCE,
        "role": "authenticated",
        "iss": issuer,
        "iat": now,
        "exp": now + ttl,
        "email": email,
        "app_metadata": {"tenant_id": str(tenant_id)} if tenant_id else {},
    }
    import jwt

    return jwt.encode(claims, secret, algorithm="HS256")
