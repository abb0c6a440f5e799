"""The load generator, a process of its own: a warm-up, then one measured phase.

    python -m bench.loadgen KIND TARGET --concurrency N --calls N --warmup N

KIND is noop, send:smtp, send:mailgun, templated:smtp (gRPC to TARGET host:port; the suffix is
the transport each reply must name), smtp (the sink, directly) or http (the stand-in's base
URL, directly). The token comes from env BENCH_TOKEN. Protocol on stdout: `WARM <json>` after
the warm-up, then it waits for `GO` on stdin, then `RESULT <json>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from bench.control import say
from bench.drivers import Driver, error_name, open_driver


@dataclass
class Phase:
    """What one phase of calls did; latencies of the successful calls only."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    started: float = 0.0  # wall clock, comparable between processes
    ended: float = 0.0
    cpu_seconds: float = 0.0  # this load generator's own CPU time


async def run_phase(driver: Driver, calls: int, concurrency: int, max_seconds: float) -> Phase:
    """Make `calls` calls, `concurrency` at a time, stopping early after `max_seconds`."""
    phase = Phase()
    errors: Counter[str] = Counter()
    remaining = calls
    deadline = time.monotonic() + max_seconds
    reported = 0

    async def worker() -> None:
        nonlocal remaining, reported
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            start = time.perf_counter()
            try:
                await driver.call()
            except Exception as exc:
                errors[error_name(exc)] += 1
                if reported < 3:
                    reported += 1
                    print(f"call failed: {error_name(exc)}: {exc}", file=sys.stderr)
                continue
            phase.latencies_ms.append((time.perf_counter() - start) * 1000)

    cpu = time.process_time()
    phase.started = time.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.ended = time.time()
    phase.cpu_seconds = time.process_time() - cpu
    phase.ok = len(phase.latencies_ms)
    phase.errors = dict(errors)
    return phase


async def run(args: argparse.Namespace) -> None:
    token = os.environ.get("BENCH_TOKEN", "")
    driver = await open_driver(args.kind, args.target, concurrency=args.concurrency, token=token)
    try:
        warm = await run_phase(driver, args.warmup, args.concurrency, args.max_seconds)
        say("WARM", json.dumps({"ok": warm.ok, "errors": warm.errors}))
        if (await asyncio.to_thread(sys.stdin.readline)).strip() != "GO":
            return
        measured = await run_phase(driver, args.calls, args.concurrency, args.max_seconds)
        say("RESULT", json.dumps(asdict(measured)))
    finally:
        await driver.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind")
    parser.add_argument("target")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
