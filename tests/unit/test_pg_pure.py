"""The PostgreSQL store's pure helpers: NOTIFY payload splitting, quota retry times, URLs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mailsvc.storage.base import StorageError
from mailsvc.storage.pg_feed import describe_url, event_of
from mailsvc.storage.postgres import _recipient_keys, _retry_after

NOW = 1_800_000_000.0


def _rows(n: int, detail: str) -> list[Any]:
    return [(i, f"m{i}", NOW, 1, detail, "alice") for i in range(n)]


def test_payloads_stay_under_the_limit_and_keep_every_event_in_order() -> None:
    from mailsvc.storage.pg_feed import _payloads

    rows = _rows(40, "x" * 900)
    payloads = _payloads(rows)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= 7900 for p in payloads)
    items = [item for p in payloads for item in json.loads(p)]
    assert [event_of(i).message_id for i in items] == [f"m{i}" for i in range(40)]


def test_an_event_too_large_alone_is_sent_as_its_seq() -> None:
    from mailsvc.storage.pg_feed import _payloads

    payloads = _payloads([(7, "m", NOW, 1, "é" * 5000, "c")])  # type: ignore[list-item]
    assert [json.loads(p) for p in payloads] == [[[7]]]


def test_retry_after_minute_window() -> None:
    window = [(NOW - 50, 3), (NOW - 20, 2)]  # 5 of 5 used
    assert _retry_after(window, 1, NOW, 5, 0, False, True) == pytest.approx(10)
    assert _retry_after(window, 3, NOW, 5, 0, False, True) == pytest.approx(10)
    assert _retry_after(window, 4, NOW, 5, 0, False, True) == pytest.approx(40)
    assert _retry_after(window, 6, NOW, 5, 0, False, True) is None


def test_retry_after_day_is_the_next_utc_midnight() -> None:
    midnight = (NOW // 86400 + 1) * 86400
    assert _retry_after([], 1, NOW, 0, 10, True, False) == pytest.approx(midnight - NOW)
    assert _retry_after([], 11, NOW, 0, 10, True, False) is None


def test_recipient_keys_hold_the_addr_spec_and_the_text() -> None:
    assert _recipient_keys(["Bob <BOB@Example.org>", "c@x.org"]) == [
        "bob <bob@example.org>",
        "bob@example.org",
        "c@x.org",
    ]


def test_describe_url_names_host_port_database_only() -> None:
    where = describe_url("postgresql://u:s3cret@db.internal:6543/mail?sslmode=require")
    assert str(where) == "db.internal:6543/mail"
    assert str(describe_url("postgres://u@h/d")) == "h:5432/d"
    with pytest.raises(StorageError):
        describe_url("mysql://h/d")
