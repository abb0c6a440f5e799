"""The role rules of auth.py, and the token checks (clock skew, reasons), without a server."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from mailsvc.v1.settings_pb2 import MailSettings, SettingsAcl

from mailsvc import auth
from mailsvc.auth import Principal, TokenVerifier
from mailsvc.errors import PermissionDenied, Unauthenticated

SECRET = b"unit-test-secret-0123456789abcdef0123456789"


def caller(*roles: str) -> Principal:
    return Principal("alice", frozenset([*roles, auth.USER]))


SUPER = caller("superadmin")
ADMIN = caller("admin")
OPS = caller("ops")
NOBODY = caller()


def test_superadmin_only() -> None:
    auth.require_superadmin(SUPER, "read the settings ACL")
    for principal in (ADMIN, OPS, NOBODY):
        with pytest.raises(PermissionDenied, match="may not read the settings ACL"):
            auth.require_superadmin(principal, "read the settings ACL")


def test_settings_read_and_update_follow_the_acl_separately() -> None:
    acl = SettingsAcl(read_roles=["auditor"], update_roles=["ops"])
    auditor = caller("auditor")
    for principal in (SUPER, auditor):
        auth.require_settings_read(principal, acl)
        assert auth.can_read_settings(principal, acl)
    for principal in (OPS, ADMIN, NOBODY):
        assert not auth.can_read_settings(principal, acl)
        with pytest.raises(PermissionDenied, match="may not read the mail settings"):
            auth.require_settings_read(principal, acl)
    for principal in (SUPER, OPS):
        auth.require_settings_update(principal, acl)
    for principal in (auditor, ADMIN, NOBODY):
        with pytest.raises(PermissionDenied, match="may not delete the mail settings"):
            auth.require_settings_update(principal, acl, "delete")


def test_empty_acl_is_superadmin_only() -> None:
    auth.require_settings_read(SUPER, SettingsAcl())
    auth.require_settings_update(SUPER, SettingsAcl())
    with pytest.raises(PermissionDenied):
        auth.require_settings_read(ADMIN, SettingsAcl())


def test_send_mail() -> None:
    settings = MailSettings(authorized_roles=["billing"])
    for principal in (SUPER, ADMIN, caller("billing")):
        auth.require_send_mail(principal, settings)
    for principal in (OPS, NOBODY):
        with pytest.raises(PermissionDenied, match="'alice' may not send mail"):
            auth.require_send_mail(principal, settings)
    auth.require_send_mail(NOBODY, MailSettings(enable_user_full_access=True))


def test_template_roles() -> None:
    auth.require_template(SUPER, "welcome", [])
    auth.require_template(OPS, "welcome", ["ops"])
    auth.require_template(NOBODY, "welcome", ["user"])  # `user` = any authenticated caller
    with pytest.raises(PermissionDenied, match="may not use template 'welcome'"):
        auth.require_template(ADMIN, "welcome", [])
    with pytest.raises(PermissionDenied):
        auth.require_template(OPS, "welcome", ["billing"])


def test_who_sees_all_messages() -> None:
    assert auth.can_see_all_messages(SUPER)
    assert auth.can_see_all_messages(ADMIN)
    assert not auth.can_see_all_messages(OPS)
    assert not auth.can_see_all_messages(NOBODY)


# --- tokens ----------------------------------------------------------------------------------


def verify(claims: dict[str, Any], secret: bytes = SECRET) -> Principal:
    token = jwt.encode({"sub": "alice", "roles": ["ops"], **claims}, secret, algorithm="HS256")
    return TokenVerifier(SECRET).principal(f"Bearer {token}")


def refusal(claims: dict[str, Any]) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        verify(claims)
    return caught.value


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_small_clock_skew_is_allowed(claim: str) -> None:
    """A token minted on a host whose clock is a little ahead is accepted."""
    assert verify({claim: int(time.time()) + 5}).roles == {"ops", "user"}


def test_recently_expired_token_within_skew_is_accepted() -> None:
    assert verify({"exp": int(time.time()) - 5}).sub == "alice"


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_token_from_the_future_names_the_reason(claim: str) -> None:
    exc = refusal({claim: int(time.time()) + 120})
    assert exc.message.startswith("token not valid yet")
    assert exc.reason == "TOKEN_NOT_YET_VALID"


def test_expired_token() -> None:
    exc = refusal({"exp": int(time.time()) - 120})
    assert (exc.message, exc.reason) == ("token expired", "TOKEN_EXPIRED")


def test_bad_signature_and_malformed_are_told_apart() -> None:
    with pytest.raises(Unauthenticated) as caught:
        verify({}, secret=b"another-secret-0123456789abcdef0123456789")
    assert caught.value.message == "token signature does not match"
    with pytest.raises(Unauthenticated) as caught:
        TokenVerifier(SECRET).principal("Bearer not.a.token")
    assert caught.value.message == "token malformed"
    assert caught.value.reason == "TOKEN_INVALID"
