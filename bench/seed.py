"""Fill a data dir's embedded store with finished records, before the server starts.

    python -m bench.seed DATA_DIR --records 100000

Records go in through SqliteStorage.insert (the same call and rows a synchronous SendMail
makes), 1,000 per transaction: SENT, one recipient each (rcpt<n % 100>@example.com), spread
over the last day. Prints `SEEDED <records> <seconds>`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench import workload
from bench.control import say
from mailsvc.storage.base import NewMessage, Status
from mailsvc.storage.sqlite import FILE_NAME, SqliteStorage

BATCH = 1000


def records(start: int, count: int, *, now: float, total: int) -> list[NewMessage]:
    out = []
    for n in range(start, start + count):
        at = now - 86400 + 86400 * n / total
        out.append(
            NewMessage(
                id=f"seed{n:08d}",
                caller="bench",
                status=Status.SENT,
                to=(workload.record_recipient(n),),
                subject=workload.PLAIN_SUBJECT,
                create_time=at,
                send_time=at,
                transport="smtp",
                message_id=f"<seed{n:08d}@bench.example.com>",
                header_message_id=f"<seed{n:08d}@bench.example.com>",
                detail="handed over to smtp",
            )
        )
    return out


async def seed(path: Path, total: int) -> None:
    storage = SqliteStorage(path)
    await storage.open()
    now = time.time()
    try:
        for start in range(0, total, BATCH):
            await storage.insert(records(start, min(BATCH, total - start), now=now, total=total))
    finally:
        await storage.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    asyncio.run(seed(args.data_dir / FILE_NAME, args.records))
    say("SEEDED", f"{args.records} {time.monotonic() - started:.1f}")


if __name__ == "__main__":
    main()
