"""SuppressionCache: the store is read only when the list may have entries."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from mailsvc.sending import SUPPRESSION_CHECK_SECONDS, SuppressionCache

pytestmark = pytest.mark.unit


class CountingList:
    """The two Storage calls the cache makes, over an in-memory list."""

    def __init__(self) -> None:
        self.entries: set[str] = set()
        self.listings = 0
        self.lookups = 0

    async def list_suppressions(self, *, page_size: int, after: str = "") -> list[str]:
        self.listings += 1
        return sorted(self.entries)[:page_size]

    async def suppressed(self, addresses: Sequence[str]) -> set[str]:
        self.lookups += 1
        return self.entries & set(addresses)


def test_an_empty_list_is_looked_at_once_per_interval() -> None:
    store = CountingList()
    now = [100.0]
    cache = SuppressionCache(store, clock=lambda: now[0])  # type: ignore[arg-type]

    async def run() -> None:
        for _ in range(5):
            assert await cache.suppressed(["a@example.com"]) == set()
        assert (store.listings, store.lookups) == (1, 0)
        store.entries.add("a@example.com")  # another replica adds one
        now[0] += SUPPRESSION_CHECK_SECONDS
        assert await cache.suppressed(["a@example.com"]) == {"a@example.com"}
        assert (store.listings, store.lookups) == (2, 1)

    asyncio.run(run())


def test_an_addition_here_counts_at_once() -> None:
    store = CountingList()
    cache = SuppressionCache(store, clock=lambda: 5.0)  # type: ignore[arg-type]

    async def run() -> None:
        assert await cache.suppressed(["b@example.com"]) == set()
        store.entries.add("b@example.com")
        cache.note_added()
        assert await cache.suppressed(["b@example.com"]) == {"b@example.com"}

    asyncio.run(run())
