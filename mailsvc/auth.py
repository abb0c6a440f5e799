"""Callers: bearer JWT -> Principal, the JWT secret, and the role rules as pure functions."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt

from mailsvc.errors import PermissionDenied, Unauthenticated

if TYPE_CHECKING:
    from mailsvc.v1.settings_pb2 import MailSettings, SettingsAcl

SUPERADMIN = "superadmin"
ADMIN = "admin"
USER = "user"  # every authenticated caller has it
ALGORITHM = "HS256"
# Clocks of callers and server differ a little; a token minted "now" elsewhere must pass here.
LEEWAY_SECONDS = 30


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
            if exp is None or exp + LEEWAY_SECONDS > time.time():
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
                leeway=LEEWAY_SECONDS,
                options={"require": ["sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated(
                "token not valid yet (iat or nbf in the future)", reason="TOKEN_NOT_YET_VALID"
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature does not match") from None
        except jwt.DecodeError:
            raise Unauthenticated("token malformed") from None
        except jwt.MissingRequiredClaimError:
            raise Unauthenticated("token has no 'sub' claim") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("token invalid (a claim is malformed)") from None
        sub = claims.get("sub")
        roles = claims.get("roles", [])
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("token has no 'sub' claim")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("token's 'roles' claim must be a list of strings")
        exp = claims.get("exp")
        return Principal(sub, frozenset([*roles, USER])), float(exp) if exp else None


# --- role rules: every authorization decision of the service is one of these ----------------


def _require(principal: Principal, allowed: Iterable[str], what: str) -> None:
    if not principal.has_any(allowed):
        raise PermissionDenied(f"caller {principal.sub!r} may not {what}")


def require_superadmin(principal: Principal, what: str) -> None:
    """Only superadmin (e.g. the settings ACL)."""
    _require(principal, (), what)


def can_read_settings(principal: Principal, acl: SettingsAcl) -> bool:
    return principal.has_any(acl.read_roles)


def require_settings_read(principal: Principal, acl: SettingsAcl) -> None:
    """superadmin, or a role in the ACL's read_roles."""
    _require(principal, acl.read_roles, "read the mail settings")


def require_settings_update(principal: Principal, acl: SettingsAcl, what: str = "update") -> None:
    """superadmin, or a role in the ACL's update_roles (which does not grant read)."""
    _require(principal, acl.update_roles, f"{what} the mail settings")


def require_send_mail(principal: Principal, settings: MailSettings) -> None:
    """admin, superadmin, a role in authorized_roles; anyone when enable_user_full_access."""
    if not settings.enable_user_full_access:
        _require(principal, (ADMIN, *settings.authorized_roles), "send mail")


def require_template(principal: Principal, name: str, roles: Iterable[str]) -> None:
    """superadmin, or a role in the template's roles (`user` there = any caller)."""
    _require(principal, roles, f"use template {name!r}")


def can_see_all_messages(principal: Principal) -> bool:
    """admin and superadmin see every caller's messages; others only their own."""
    return principal.has_any((ADMIN,))


def require_admin(principal: Principal, what: str) -> None:
    """admin or superadmin (e.g. the suppression list)."""
    _require(principal, (ADMIN,), what)
