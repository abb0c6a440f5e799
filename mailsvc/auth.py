"""Callers: bearer JWT -> Principal, the JWT secret, and the role rules as pure functions."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from mailsvc.errors import PermissionDenied, Unauthenticated

SUPERADMIN = "superadmin"
ADMIN = "admin"
USER = "user"  # every authenticated caller has it
ALGORITHM = "HS256"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's `sub` and its roles (always including `user`)."""

    sub: str
    roles: frozenset[str]

    def has_any(self, roles: Iterable[str]) -> bool:
        return SUPERADMIN in self.roles or not self.roles.isdisjoint(roles)


def load_secret(environ: Mapping[str, str], secret_file: Path) -> bytes:
    """The HS256 secret: env MAILSVC_JWT_SECRET, else the file, made (mode 0600) if missing."""
    value = environ.get("MAILSVC_JWT_SECRET")
    if value:
        return value.encode()
    try:
        return secret_file.read_bytes().strip()
    except FileNotFoundError:
        pass
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    generated = secrets.token_urlsafe(48).encode()
    try:
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return secret_file.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(generated + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return generated


def mint_token(secret: bytes, roles: list[str], sub: str, ttl: int | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "roles": roles, "iat": int(time.time())}
    if ttl:
        claims["exp"] = int(time.time()) + ttl
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenVerifier:
    """Checks bearer tokens; verified tokens are cached until they expire."""

    def __init__(self, secret: bytes, *, cache_size: int = 1024) -> None:
        self._secret = secret
        self._cache: dict[str, tuple[Principal, float | None]] = {}
        self._cache_size = cache_size

    def principal(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated(
                "missing authorization metadata: send 'authorization: Bearer <token>'",
                reason="TOKEN_MISSING",
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "authorization metadata must be 'Bearer <token>'", reason="TOKEN_INVALID"
            )
        cached = self._cache.get(token)
        if cached is not None:
            principal, exp = cached
            if exp is None or exp > time.time():
                return principal
            del self._cache[token]
        principal, exp = self._verify(token)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[token] = (principal, exp)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float | None]:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated(
                "token invalid: bad signature or malformed", reason="TOKEN_INVALID"
            ) from None
        sub = claims.get("sub")
        roles = claims.get("roles", [])
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("token has no 'sub' claim", reason="TOKEN_INVALID")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated(
                "token's 'roles' claim must be a list of strings", reason="TOKEN_INVALID"
            )
        exp = claims.get("exp")
        return Principal(sub, frozenset([*roles, USER])), float(exp) if exp else None


def require(principal: Principal, allowed: Iterable[str], what: str) -> None:
    """Raise PermissionDenied unless the caller is superadmin or has one of `allowed`."""
    if not principal.has_any(allowed):
        raise PermissionDenied(f"caller {principal.sub!r} may not {what}")


def can_send_mail(
    principal: Principal, *, enable_user_full_access: bool, authorized_roles: Iterable[str]
) -> bool:
    if enable_user_full_access:
        return True
    return principal.has_any([ADMIN, *authorized_roles])
