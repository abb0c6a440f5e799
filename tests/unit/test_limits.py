"""Rate-limit rules (pure) and the limiter's decisions over a counting store stand-in."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from mailsvc.v1.settings_pb2 import MailSettings, RateLimit

from mailsvc.auth import Principal
from mailsvc.limits import (
    MAX_LIMIT,
    LimitTable,
    QuotaExceeded,
    RateLimiter,
    effective_limit,
    validate_rules,
)
from mailsvc.storage.base import QuotaResult, Storage

# 2026-11-24 23:59:30 UTC: 30 s before the UTC day ends
NOW = 1795651170.0


def rules(*specs: tuple[str, int, int]) -> list[RateLimit]:
    return [RateLimit(role=r, per_minute=m, per_day=d) for r, m, d in specs]


@pytest.mark.parametrize(
    ("specs", "roles", "expected"),
    [
        ([], {"user"}, (0, 0)),  # no rules: no limit
        ([("sender", 10, 100)], {"user"}, (0, 0)),  # no matching rule: no limit
        ([("sender", 10, 100)], {"user", "sender"}, (10, 100)),
        ([("user", 5, 50)], {"user"}, (5, 50)),
        ([("user", 5, 50)], set(), (5, 50)),  # "user" applies to every caller
        ([("user", 5, 50), ("sender", 10, 20)], {"user", "sender"}, (10, 50)),  # per dimension
        ([("user", 5, 50), ("bulk", 0, 20)], {"user", "bulk"}, (0, 50)),  # 0 beats any number
        ([("user", 5, 50), ("bulk", 0, 0)], {"bulk"}, (0, 0)),
        ([("user", 5, 50)], {"user", "superadmin"}, (0, 0)),  # superadmin is never limited
        ([("superadmin", 1, 1)], {"superadmin"}, (0, 0)),
        ([("sender", 10, 100), ("sender", 20, 0)], {"sender"}, (20, 0)),  # duplicate roles
    ],
)
def test_effective_limit(
    specs: list[tuple[str, int, int]], roles: set[str], expected: tuple[int, int]
) -> None:
    assert effective_limit(rules(*specs), roles) == expected


def test_rules_straight_from_the_settings_message() -> None:
    settings = MailSettings(rate_limits=rules(("user", 5, 50), ("admin", 100, 0)))
    table = LimitTable(settings.rate_limits)
    assert table.for_roles(frozenset({"user"})) == (5, 50)
    assert table.for_roles(frozenset({"user", "admin"})) == (100, 0)
    assert table.for_roles(frozenset({"user", "admin"})) == (100, 0)  # cached answer
    assert not LimitTable([])


def test_validate_rules_names_each_bad_field() -> None:
    bad = rules(("user", 10, 100), ("", 1, 1), ("ops", -1, MAX_LIMIT + 1), (" x", 0, 0))
    found = {(v.field, v.description) for v in validate_rules(bad)}
    assert found == {
        ("settings.rate_limits[1].role", "must not be empty"),
        ("settings.rate_limits[2].per_minute", "must be 0 (no limit) or more"),
        ("settings.rate_limits[2].per_day", "must be at most 10,000,000"),
        ("settings.rate_limits[3].role", "must not start or end with a space"),
    }
    assert validate_rules(rules(("user", 0, 0), ("a", MAX_LIMIT, MAX_LIMIT))) == []


@dataclass
class CountingStore:
    """Stands in for Storage.consume_quota: a rolling minute and a UTC day, in memory."""

    calls: list[tuple[str, int, int, int]] = field(default_factory=list)
    recent: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    days: dict[tuple[str, int], int] = field(default_factory=dict)

    async def consume_quota(
        self, caller: str, count: int, *, now: float, per_minute: int, per_day: int
    ) -> QuotaResult:
        self.calls.append((caller, count, per_minute, per_day))
        window = [(t, n) for t, n in self.recent.get(caller, []) if t > now - 60]
        minute = sum(n for _, n in window)
        day_key = (caller, int(now // 86400))
        day = self.days.get(day_key, 0)
        over_minute = per_minute and minute + count > per_minute
        if over_minute or (per_day and day + count > per_day):
            retry = window[0][0] + 60 - now if over_minute and window else None
            return QuotaResult(allowed=False, minute_count=minute, day_count=day, retry_after=retry)
        self.recent[caller] = [*window, (now, count)]
        self.days[day_key] = day + count
        return QuotaResult(allowed=True, minute_count=minute + count, day_count=day + count)


def _check(
    store: CountingStore, who: Principal, count: int, table: LimitTable, now: float = NOW
) -> None:
    asyncio.run(RateLimiter(store).check(who, count, table, now))


ALICE = Principal(sub="alice", roles=frozenset({"user"}))
ROOT = Principal(sub="root", roles=frozenset({"user", "superadmin"}))


def test_unlimited_callers_never_reach_the_store() -> None:
    store = CountingStore()
    table = LimitTable(rules(("sender", 1, 1)))
    for _ in range(5):
        _check(store, ALICE, 1, table)  # alice has no matching rule
    _check(store, ROOT, 1000, LimitTable(rules(("user", 1, 1))))
    assert store.calls == []


def test_per_minute_limit_refuses_with_retry_after() -> None:
    store = CountingStore()
    table = LimitTable(rules(("user", 3, 100)))
    _check(store, ALICE, 2, table, NOW - 20)
    _check(store, ALICE, 1, table, NOW - 10)
    with pytest.raises(QuotaExceeded) as info:
        _check(store, ALICE, 1, table)
    err = info.value
    assert (err.code, err.reason) == ("RESOURCE_EXHAUSTED", "RATE_LIMITED")
    assert err.retry_after == pytest.approx(40)
    assert err.quota_subject == "caller:alice"
    assert "3 mails per caller per rolling minute" in err.quota_description
    assert not err.transient  # the mailer must not retry it
    # nothing was counted for the refused call; once the window moves on it fits again
    _check(store, ALICE, 2, table, NOW + 41)
    assert store.calls[-1] == ("alice", 2, 3, 100)


def test_daily_quota_refuses_until_utc_midnight() -> None:
    store = CountingStore()
    table = LimitTable(rules(("user", 0, 5)))
    _check(store, ALICE, 5, table, NOW - 3600)
    with pytest.raises(QuotaExceeded) as info:
        _check(store, ALICE, 1, table)
    assert info.value.reason == "DAILY_QUOTA_EXCEEDED"
    assert info.value.retry_after == pytest.approx(30)  # 23:59:30 -> midnight
    assert info.value.quota_description == "at most 5 mails per caller per UTC day"
    _check(store, ALICE, 5, table, NOW + 31)  # a new UTC day


def test_batch_that_can_never_fit_has_no_retry_after() -> None:
    store = CountingStore()
    with pytest.raises(QuotaExceeded) as minute:
        _check(store, ALICE, 11, LimitTable(rules(("user", 10, 0))))
    assert (minute.value.reason, minute.value.retry_after) == ("RATE_LIMITED", None)
    with pytest.raises(QuotaExceeded) as day:
        _check(store, ALICE, 101, LimitTable(rules(("user", 1000, 100))))
    assert (day.value.reason, day.value.retry_after) == ("DAILY_QUOTA_EXCEEDED", None)


def test_callers_are_counted_apart() -> None:
    store = CountingStore()
    table = LimitTable(rules(("user", 1, 0)))
    _check(store, ALICE, 1, table)
    _check(store, Principal(sub="bob", roles=frozenset({"user"})), 1, table)
    with pytest.raises(QuotaExceeded):
        _check(store, ALICE, 1, table)


def test_storage_protocol_fits_the_limiter() -> None:
    # the real stores are typed as Storage; the limiter must accept them
    def build(store: Storage) -> RateLimiter:
        return RateLimiter(store)

    assert build.__name__ == "build"
