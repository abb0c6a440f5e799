"""In-process fan-out: every subscriber gets every item published after it subscribed."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

from mailsvc.storage.base import StorageError

T = TypeVar("T")
MAX_BACKLOG = 10_000


class FellBehind(StorageError):
    """A subscriber did not keep up; its subscription ended rather than skip items silently."""


class Subscription(Generic[T]):
    """An async iterator over the items published since it was created; `aclose()` ends it."""

    def __init__(self, hub: Broadcaster[T], max_backlog: int) -> None:
        self._hub = hub
        self._items: deque[T] = deque()
        self._max = max_backlog
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._overflow = False

    def _push(self, item: T) -> None:
        if len(self._items) >= self._max:
            self._overflow = True
            self._hub.unsubscribe(self)
        else:
            self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        while not self._items:
            if self._overflow:
                raise FellBehind("the watcher fell too far behind the changes")
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._hub.unsubscribe(self)
        self._wake()


class Broadcaster(Generic[T]):
    """Publish from the event loop's thread; each subscription keeps its own bounded backlog."""

    def __init__(self, *, max_backlog: int = MAX_BACKLOG) -> None:
        self._subs: set[Subscription[T]] = set()
        self._max = max_backlog

    def subscribe(self) -> Subscription[T]:
        sub = Subscription(self, self._max)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription[T]) -> None:
        self._subs.discard(sub)

    def publish(self, item: T) -> None:
        for sub in list(self._subs):
            sub._push(item)

    def close(self) -> None:
        """End every subscription (after the items already published)."""
        for sub in list(self._subs):
            sub.close()

    def __len__(self) -> int:
        return len(self._subs)
