"""The PostgreSQL store's pure helpers: quota retry times, URLs."""

from __future__ import annotations

import pytest

from mailsvc.storage.base import StorageError
from mailsvc.storage.pg_feed import describe_url
from mailsvc.storage.postgres import _recipient_keys, _retry_after

NOW = 1_800_000_000.0


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
