"""The verifier answers a token it verified before from memory, and still refuses it once it
expires; a bad token is never cached."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest
from cpa_scheduler import auth, errors

SECRET = "s" * 40
ISSUER = "https://example.supabase.co/auth/v1"


def _token(exp: int, secret: str = SECRET) -> str:
    claims = {"sub": str(uuid.uuid4()), "aud": "authenticated", "role": "authenticated",
              "iss": ISSUER, "exp": exp}  # fmt: skip
    return jwt.encode(claims, secret, algorithm="HS256")


def test_a_verified_token_is_answered_from_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    v = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER)
    token = _token(int(time.time()) + 600)
    first = v.verify(token)
    calls: list[str] = []
    monkeypatch.setattr(v, "_verify", lambda t: calls.append(t))  # would answer None
    assert v.verify(token) is first and not calls
    assert not v.may_block(token)


def test_a_cached_token_is_refused_once_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    v = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER, leeway=1)
    now = time.time()
    token = _token(int(now) + 2)
    v.verify(token)
    asked: list[str] = []

    def verify_again(t: str) -> auth.Claims:  # what PyJWT says once the token expired
        asked.append(t)
        raise errors.AuthError("The access token has expired; sign in again.")

    monkeypatch.setattr(v, "_verify", verify_again)
    monkeypatch.setattr(time, "time", lambda: int(now) + 2.9)  # within exp + leeway
    v.verify(token)
    assert not asked
    monkeypatch.setattr(time, "time", lambda: int(now) + 3)  # exp + leeway: PyJWT refuses
    with pytest.raises(errors.AuthError, match="expired"):
        v.verify(token)
    assert asked == [token]


def test_a_verified_token_is_verified_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    v = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER)
    now = time.time()
    token = _token(int(now) + 3600)
    v.verify(token)
    calls: list[str] = []
    real = v._verify
    monkeypatch.setattr(v, "_verify", lambda t: calls.append(t) or real(t))
    monkeypatch.setattr(time, "time", lambda: now + auth.VERIFIED_FOR + 1)
    v.verify(token)
    assert calls == [token]  # a rotated-out key stops being accepted within VERIFIED_FOR


def test_bad_tokens_are_not_cached_and_the_cache_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER)
    forged = _token(int(time.time()) + 600, secret="x" * 40)
    for _ in range(2):
        with pytest.raises(errors.AuthError, match="signature"):
            v.verify(forged)
    monkeypatch.setattr(auth, "VERIFIED_MAX", 3)
    tokens = [_token(int(time.time()) + 600 + i) for i in range(5)]
    for t in tokens:
        v.verify(t)
    assert list(v._verified) == tokens[2:]
