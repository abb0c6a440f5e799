"""asyncpg vs psycopg 3 (+ psycopg_pool) on the PostgreSQL store's workload.

    python -m bench.pg_drivers [--ops 2000] [--concurrency 16] [--pool 8]

Starts its own PostgreSQL (tests/pg.py), one fresh database per driver, and measures, with
`--concurrency` tasks sharing a pool of `--pool` connections on uvloop:

- reserve: an idempotency key, INSERT ... ON CONFLICT DO NOTHING RETURNING;
- insert: one message row + its event + pg_notify in one transaction;
- batch: 100 messages + 100 events + one notify in one transaction (per message);
- claim: 10 due messages with FOR UPDATE SKIP LOCKED (per message);
- finish: the conditional update + event + notify of one attempt's outcome.

Prints ops/s (wall) and client CPU µs per op (process time of this process, which also runs
the event loop; the server's CPU is the same SQL for both drivers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import asyncpg
import psycopg_pool
import uvloop

from tests.pg import remove, start_session_server

SCHEMA = """
CREATE TABLE messages (
    id text PRIMARY KEY, caller text NOT NULL, status smallint NOT NULL,
    rcpt text[] NOT NULL, subject text NOT NULL, create_time float8 NOT NULL,
    update_time float8 NOT NULL, due_time float8, attempts int NOT NULL DEFAULT 0,
    payload bytea, lease_owner text NOT NULL DEFAULT '', lease_until float8,
    transport text NOT NULL DEFAULT '', message_id text NOT NULL DEFAULT '');
CREATE INDEX messages_due ON messages (due_time) WHERE due_time IS NOT NULL;
CREATE TABLE events (seq bigserial PRIMARY KEY, message_id text NOT NULL, time float8 NOT NULL,
    status smallint NOT NULL, detail text NOT NULL, caller text NOT NULL);
CREATE TABLE idempotency (caller text, key text, fingerprint text NOT NULL, response bytea,
    expire_time float8 NOT NULL, PRIMARY KEY (caller, key));
"""
RESERVE = (
    "INSERT INTO idempotency (caller, key, fingerprint, expire_time) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT DO NOTHING RETURNING 1"
)
INSERT_MSG = (
    "INSERT INTO messages (id, caller, status, rcpt, subject, create_time, update_time,"
    " due_time, payload) VALUES ($1, $2, 1, $3, $4, $5, $5, $5, $6)"
)
INSERT_EVENT = (
    "INSERT INTO events (message_id, time, status, detail, caller) VALUES ($1, $2, $3, $4, $5)"
)
NOTIFY = "SELECT pg_notify('bench', $1)"
CLAIM = """
WITH due AS (
    SELECT id FROM messages WHERE due_time <= $1 ORDER BY due_time LIMIT $2
    FOR UPDATE SKIP LOCKED)
UPDATE messages m SET status = 3, attempts = m.attempts + 1, lease_owner = $3,
    lease_until = $1 + 60, due_time = $1 + 60, update_time = $1
FROM due WHERE m.id = due.id
RETURNING m.id, m.caller, m.payload, m.attempts, m.lease_until
"""
FINISH = """
UPDATE messages SET status = 4, payload = NULL, lease_owner = '', lease_until = NULL,
    due_time = NULL, transport = 'smtp', message_id = $3, update_time = $4
WHERE id = $1 AND status = 3 AND lease_owner = $2 RETURNING caller
"""
PAYLOAD = b"x" * 2000


def _psyco(sql: str) -> str:
    """$n placeholders (asyncpg, PostgreSQL's own) as psycopg's named ones."""
    for n in range(9, 0, -1):
        sql = sql.replace(f"${n}", f"%(p{n})s")
    return sql


def _args(*values: Any) -> dict[str, Any]:
    return {f"p{n}": v for n, v in enumerate(values, 1)}


class Driver(Protocol):
    name: str

    async def open(self, url: str, size: int) -> None: ...
    async def close(self) -> None: ...
    async def reserve(self, key: str) -> None: ...
    async def insert(self, ids: list[str]) -> None: ...
    async def claim(self, limit: int) -> list[str]: ...
    async def finish(self, id: str) -> None: ...


def _rows(ids: list[str], now: float) -> list[tuple[Any, ...]]:
    return [(i, "bench", ["a@example.com"], "subject", now, PAYLOAD) for i in ids]


def _events(ids: list[str], now: float, status: int) -> list[tuple[Any, ...]]:
    return [(i, now, status, "", "bench") for i in ids]


class Asyncpg:
    name = "asyncpg"

    async def open(self, url: str, size: int) -> None:
        self.pool = await asyncpg.create_pool(url, min_size=size, max_size=size)

    async def close(self) -> None:
        await self.pool.close()

    async def reserve(self, key: str) -> None:
        await self.pool.fetchval(RESERVE, "bench", key, "fp", time.time() + 3600)

    async def insert(self, ids: list[str]) -> None:
        now = time.time()
        async with self.pool.acquire() as conn, conn.transaction():
            if len(ids) == 1:
                await conn.execute(INSERT_MSG, *_rows(ids, now)[0])
                await conn.execute(INSERT_EVENT, *_events(ids, now, 1)[0])
            else:
                await conn.executemany(INSERT_MSG, _rows(ids, now))
                await conn.executemany(INSERT_EVENT, _events(ids, now, 1))
            await conn.execute(NOTIFY, json.dumps(ids[:50]))

    async def claim(self, limit: int) -> list[str]:
        rows = await self.pool.fetch(CLAIM, time.time(), limit, "owner")
        return [r["id"] for r in rows]

    async def finish(self, id: str) -> None:
        now = time.time()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.fetchval(FINISH, id, "owner", "<m@x>", now)
            await conn.execute(INSERT_EVENT, *_events([id], now, 4)[0])
            await conn.execute(NOTIFY, id)


class Psycopg:
    name = "psycopg"

    async def open(self, url: str, size: int) -> None:
        self.pool = psycopg_pool.AsyncConnectionPool(
            url, min_size=size, max_size=size, open=False, kwargs={"autocommit": True}
        )
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.pool.close()

    async def reserve(self, key: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(_psyco(RESERVE), _args("bench", key, "fp", time.time() + 3600))

    async def insert(self, ids: list[str]) -> None:
        now = time.time()
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor()
            if len(ids) == 1:
                await cur.execute(_psyco(INSERT_MSG), _args(*_rows(ids, now)[0]))
                await cur.execute(_psyco(INSERT_EVENT), _args(*_events(ids, now, 1)[0]))
            else:
                await cur.executemany(_psyco(INSERT_MSG), [_args(*r) for r in _rows(ids, now)])
                await cur.executemany(
                    _psyco(INSERT_EVENT), [_args(*r) for r in _events(ids, now, 1)]
                )
            await cur.execute(_psyco(NOTIFY), _args(json.dumps(ids[:50])))

    async def claim(self, limit: int) -> list[str]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(_psyco(CLAIM), _args(time.time(), limit, "owner"))
            return [str(r[0]) for r in await cur.fetchall()]

    async def finish(self, id: str) -> None:
        now = time.time()
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor()
            await cur.execute(_psyco(FINISH), _args(id, "owner", "<m@x>", now))
            await cur.execute(_psyco(INSERT_EVENT), _args(*_events([id], now, 4)[0]))
            await cur.execute(_psyco(NOTIFY), _args(id))


async def _run(
    ops: int, concurrency: int, op: Callable[[int], Awaitable[int]]
) -> tuple[float, float]:
    """(ops/s, CPU µs per op) of `ops` units; `op(i)` does some and returns how many."""
    counter = iter(range(ops))
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in counter:
            done += await op(i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return done / wall, cpu / max(done, 1) * 1e6


async def bench(
    driver: Driver, url: str, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    conn = await asyncpg.connect(url)
    await conn.execute(SCHEMA)
    await conn.close()
    await driver.open(url, args.pool)
    n, c = args.ops, args.concurrency
    try:
        out: dict[str, tuple[float, float]] = {}

        async def reserve(i: int) -> int:
            await driver.reserve(f"k{i}-{secrets.token_hex(4)}")
            return 1

        async def insert(i: int) -> int:
            await driver.insert([secrets.token_hex(8)])
            return 1

        async def batch(i: int) -> int:
            await driver.insert([secrets.token_hex(8) for _ in range(100)])
            return 100

        claimed: list[str] = []

        async def claim(i: int) -> int:
            got = await driver.claim(10)
            claimed.extend(got)
            return len(got)

        async def finish(i: int) -> int:
            await driver.finish(claimed[i])
            return 1

        out["reserve"] = await _run(n, c, reserve)
        out["insert"] = await _run(n, c, insert)
        out["batch x100"] = await _run(max(n // 100, 4), min(c, 4), batch)
        out["claim x10"] = await _run(n // 10, c, claim)
        out["finish"] = await _run(len(claimed), c, finish)
        return out
    finally:
        await driver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per driver")
    args = parser.parse_args()
    server = start_session_server()
    try:
        results: dict[str, list[dict[str, tuple[float, float]]]] = {}
        for _ in range(args.rounds):
            for driver in (Asyncpg(), Psycopg()):
                url = server.create_database()
                got = uvloop.run(bench(driver, url, args))
                results.setdefault(driver.name, []).append(got)
    finally:
        remove(server)
    print(f"{'operation':<12} {'driver':<8} {'ops/s':>9} {'CPU µs/op':>10}  (best of rounds)")
    for op in results["asyncpg"][0]:
        for name, runs in results.items():
            rate = max(r[op][0] for r in runs)
            cpu = min(r[op][1] for r in runs)
            print(f"{op:<12} {name:<8} {rate:>9,.0f} {cpu:>10,.0f}")


if __name__ == "__main__":
    main()
