"""Per-caller rate limits: which rule applies (pure), and the check against the shared counts.

A caller's limit is the most generous among the rules of its roles, taken per dimension
(per minute and per day separately); 0 is no limit and beats any number; the rule of role
`user` applies to every caller; no matching rule means no limit; superadmin is never limited.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from mailsvc.auth import SUPERADMIN, USER, Principal
from mailsvc.errors import FieldViolation, ResourceExhausted
from mailsvc.storage.base import QuotaResult

MAX_LIMIT = 10_000_000
DAY = 86_400.0
MINUTE = 60.0
UNLIMITED = (0, 0)
# Distinct role sets seen are few in practice; the bound keeps odd tokens from growing it.
_CACHE_SIZE = 1024


class Rule(Protocol):
    """A rate-limit rule as the settings hold it (mailsvc.v1.RateLimit)."""

    @property
    def role(self) -> str: ...
    @property
    def per_minute(self) -> int: ...
    @property
    def per_day(self) -> int: ...


class QuotaStore(Protocol):
    """The part of mailsvc.storage.base.Storage the limiter uses."""

    async def consume_quota(
        self, caller: str, count: int, *, now: float, per_minute: int, per_day: int
    ) -> QuotaResult: ...


class QuotaExceeded(ResourceExhausted):
    """A caller went over its limit; nothing was sent or queued."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        retry_after: float | None,
        quota_subject: str,
        quota_description: str,
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after  # seconds until a retry would fit; None if none would
        self.quota_subject = quota_subject  # google.rpc.QuotaFailure.Violation.subject
        self.quota_description = quota_description


def _more_generous(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else max(a, b)


def _combine(rules: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
    found: tuple[int, int] | None = None
    for minute, day in rules:
        if found is None:
            found = (minute, day)
        else:
            found = (_more_generous(found[0], minute), _more_generous(found[1], day))
    return found


class LimitTable:
    """The rules of one settings version, compiled for a lookup per call."""

    __slots__ = ("_by_role", "_cache")

    def __init__(self, rules: Sequence[Rule]) -> None:
        by_role: dict[str, tuple[int, int]] = {}
        for rule in rules:
            pair = (max(rule.per_minute, 0), max(rule.per_day, 0))
            old = by_role.get(rule.role)
            if old is not None:
                pair = (_more_generous(old[0], pair[0]), _more_generous(old[1], pair[1]))
            by_role[rule.role] = pair
        self._by_role = by_role
        self._cache: dict[frozenset[str], tuple[int, int]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_role)

    def for_roles(self, roles: frozenset[str]) -> tuple[int, int]:
        """(per_minute, per_day) for a caller with these roles; 0 = no limit."""
        if not self._by_role or SUPERADMIN in roles:
            return UNLIMITED
        hit = self._cache.get(roles)
        if hit is not None:
            return hit
        wanted = roles | {USER}
        found = _combine(v for r, v in self._by_role.items() if r in wanted) or UNLIMITED
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[roles] = found
        return found


def effective_limit(rules: Sequence[Rule], roles: Iterable[str]) -> tuple[int, int]:
    """(per_minute, per_day) for a caller with `roles` under `rules`; 0 = no limit."""
    return LimitTable(rules).for_roles(frozenset(roles))


def validate_rules(rules: Sequence[Rule], prefix: str = "settings") -> list[FieldViolation]:
    """What is wrong with the rules, each naming e.g. `settings.rate_limits[2].per_day`."""
    found: list[FieldViolation] = []
    for i, rule in enumerate(rules):
        path = f"{prefix}.rate_limits[{i}]"
        if not rule.role.strip():
            found.append(FieldViolation(f"{path}.role", "must not be empty"))
        elif rule.role != rule.role.strip():
            found.append(FieldViolation(f"{path}.role", "must not start or end with a space"))
        for name in ("per_minute", "per_day"):
            value = getattr(rule, name)
            if value < 0:
                found.append(FieldViolation(f"{path}.{name}", "must be 0 (no limit) or more"))
            elif value > MAX_LIMIT:
                found.append(FieldViolation(f"{path}.{name}", f"must be at most {MAX_LIMIT:,}"))
    return found


class RateLimiter:
    """Counts accepted mails per caller in the shared store and refuses those over the limit."""

    __slots__ = ("_storage",)

    def __init__(self, storage: QuotaStore) -> None:
        self._storage = storage

    async def check(self, principal: Principal, count: int, limits: LimitTable, now: float) -> None:
        """Count `count` mails for the caller, or raise QuotaExceeded and count nothing."""
        per_minute, per_day = limits.for_roles(principal.roles)
        if (per_minute == 0 and per_day == 0) or count <= 0:
            return
        result = await self._storage.consume_quota(
            principal.sub, count, now=now, per_minute=per_minute, per_day=per_day
        )
        if result.allowed:
            return
        subject = f"caller:{principal.sub}"
        if per_day and (per_minute == 0 or result.day_count + count > per_day):
            # The counts restart at the next UTC midnight; a batch larger than the quota never fits.
            retry = DAY - now % DAY if count <= per_day else None
            raise QuotaExceeded(
                f"daily quota exceeded: at most {per_day} mails per UTC day"
                f" ({result.day_count} already today)",
                reason="DAILY_QUOTA_EXCEEDED",
                retry_after=retry,
                quota_subject=subject,
                quota_description=f"at most {per_day} mails per caller per UTC day",
            )
        retry = None
        if count <= per_minute:
            retry = result.retry_after if result.retry_after is not None else MINUTE
        raise QuotaExceeded(
            f"rate limit exceeded: at most {per_minute} mails per minute",
            reason="RATE_LIMITED",
            retry_after=retry,
            quota_subject=subject,
            quota_description=f"at most {per_minute} mails per caller per rolling minute",
        )
