"""The child side of the line protocol: `READY <port>`, then one answer per command on stdin."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Mapping


def say(word: str, value: object = "") -> None:
    print(f"{word} {value}".rstrip(), flush=True)


async def answer_commands(handlers: Mapping[str, Callable[[], object]]) -> None:
    """Answer `command` with `command <value>` until `quit` or the end of stdin."""
    while True:
        line = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if not line or line == "quit":
            return
        handler = handlers.get(line)
        say(line, handler() if handler else "?")
