"""Supabase-style JWTs (HS256) for the stand-ins: sign a user's or a role's token, verify one.

Supabase signs every key and session token with the project's JWT secret; PostgREST and
Realtime verify it and take `role` (and the rest of the claims) from it. The stand-ins do
the same with TEST_JWT_SECRET.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

TEST_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


class InvalidToken(ValueError):
    """The token is malformed, badly signed or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(claims: dict[str, Any], secret: str = TEST_JWT_SECRET) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(mac)}"


def verify(token: str, secret: str = TEST_JWT_SECRET) -> dict[str, Any]:
    """The token's claims; raises InvalidToken as PostgREST would refuse it."""
    try:
        header, body, mac = token.split(".")
        expected = hmac.new(secret.encode(), f"{header}.{body}".encode(),
                            hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            raise InvalidToken("JWSError JWSInvalidSignature")
        claims = json.loads(_unb64(body))
    except (ValueError, TypeError) as exc:
        raise InvalidToken(f"JWSError {type(exc).__name__}") from exc
    if not isinstance(claims, dict):
        raise InvalidToken("JWSError claims are not an object")
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp < time.time():
        raise InvalidToken("JWT expired")
    return claims


def role_key(role: str, secret: str = TEST_JWT_SECRET) -> str:
    """An API key as Supabase issues them: a long-lived JWT whose role is `role`."""
    return sign({"iss": "supabase", "role": role, "iat": int(time.time()),
                 "exp": int(time.time()) + 10 * 365 * 86400}, secret)


def user_token(user_id: str, *, enterprise_id: str | None = None, ttl: float = 3600,
               secret: str = TEST_JWT_SECRET) -> str:
    """A signed-in user's access token (role `authenticated`, `sub` the user id);
    `enterprise_id` goes in app_metadata, where users cannot edit it."""
    now = int(time.time())
    app_metadata: dict[str, Any] = {"provider": "email"}
    if enterprise_id is not None:
        app_metadata["enterprise_id"] = enterprise_id
    return sign({"aud": "authenticated", "role": "authenticated", "sub": user_id,
                 "iat": now, "exp": now + int(ttl), "app_metadata": app_metadata,
                 "user_metadata": {}}, secret)
