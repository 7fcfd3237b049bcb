"""ES256 tokens verified through a JWKS served on 127.0.0.1, as Supabase's signing keys are."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import jwt
import pytest
from cpa_scheduler import auth, errors
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = "https://proj.supabase.co/auth/v1"


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def jwks_url(signing_key: ec.EllipticCurvePrivateKey) -> Iterator[str]:
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signing_key.public_key()))
    body = json.dumps({"keys": [{**public, "kid": "key-1", "alg": "ES256", "use": "sig"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/auth/v1/.well-known/jwks.json"
    server.shutdown()
    server.server_close()


def es256(key: ec.EllipticCurvePrivateKey, kid: str = "key-1", **over: Any) -> str:
    claims = {
        "sub": str(uuid.uuid4()),
        "aud": "authenticated",
        "role": "authenticated",
        "iss": ISSUER,
        "exp": int(time.time()) + 600,
        **over,
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def test_es256_through_jwks(signing_key: ec.EllipticCurvePrivateKey, jwks_url: str) -> None:
    v = auth.Verifier(jwks_url=jwks_url, issuer=ISSUER)
    claims = v.verify(es256(signing_key))
    assert claims.role == "authenticated"


def test_es256_failures(signing_key: ec.EllipticCurvePrivateKey, jwks_url: str) -> None:
    v = auth.Verifier(jwks_url=jwks_url, issuer=ISSUER)
    with pytest.raises(errors.AuthError, match="signing key is unknown"):
        v.verify(es256(signing_key, kid="other"))
    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(errors.AuthError, match="signature"):
        v.verify(es256(other_key))
    with pytest.raises(errors.AuthError, match="expired"):
        v.verify(es256(signing_key, exp=int(time.time()) - 60))
    with pytest.raises(errors.AuthError, match="another project"):
        v.verify(es256(signing_key, iss="https://evil.supabase.co/auth/v1"))
    with pytest.raises(errors.AuthError, match="HS256 tokens are not accepted"):
        v.verify(
            jwt.encode(
                {"sub": str(uuid.uuid4())},
                "secret-secret-secret-secret-secret-00",
                algorithm="HS256",
            )
        )


def test_settings_derive_jwks_and_issuer() -> None:
    from cpa_scheduler import settings

    cfg = settings.from_env(
        {"SUPABASE_URL": "https://abc.supabase.co/", "DATABASE_URL": "postgresql://x"}
    )
    assert cfg.jwks_url == "https://abc.supabase.co/auth/v1/.well-known/jwks.json"
    assert cfg.issuer == "https://abc.supabase.co/auth/v1"
