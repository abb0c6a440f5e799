"""One cell of the table: a scenario at one concurrency, measured with load generator processes."""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench import procfs
from bench.procs import Processes
from bench.scenarios import Plan, Scenario


@dataclass
class Cell:
    scenario: str
    concurrency: int
    calls: int  # successful measured calls
    errors: dict[str, int]
    seconds: float
    sends_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_cpu_us_per_call: float
    server_peak_rss_mb: float
    downstream_cpu_us_per_call: float | None  # the sink's or stand-in's, for mailsvc rows
    loadgen_cpu_us_per_call: float
    machine_busy_pct: float  # all cores, during the measured phase: others' load shows here
    delivered: int = 0  # successful calls, warm-up included: what the sink should have counted


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; `ordered` is sorted."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass(frozen=True)
class Target:
    """Where a scenario's calls go and whose process counts as the server."""

    address: str
    server_pid: int
    downstream_pid: int | None = None


def measure(
    procs: Processes,
    scenario: Scenario,
    concurrency: int,
    target: Target,
    plan: Plan,
    *,
    token: str,
    label: str = "",
) -> Cell:
    """Warm up, then measure: CPU of the server is read just before GO and after the last result."""
    warmup, calls = plan.calls_for(scenario, concurrency)
    n = max(1, min(plan.loadgen_procs if concurrency > 1 else 1, concurrency))
    env = {**os.environ, "BENCH_TOKEN": token}
    children = []
    for i, (c, k, w) in enumerate(
        zip(_split(concurrency, n), _split(calls, n), _split(warmup, n), strict=True)
    ):
        argv = [sys.executable, "-m", "bench.loadgen", scenario.kind, target.address]
        argv += ["--concurrency", str(c), "--calls", str(k), "--warmup", str(w)]
        argv += ["--max-seconds", str(plan.max_seconds)]
        name = f"loadgen-{scenario.key}-{concurrency}{label}-{i}"
        children.append(procs.start(name, argv, env=env, talk=True))
    try:
        warm = [json.loads(child.expect("WARM", plan.max_seconds + 30)) for child in children]
        server_cpu = procfs.cpu_seconds(target.server_pid)
        downstream_cpu = procfs.cpu_seconds(target.downstream_pid) if target.downstream_pid else 0
        machine = procfs.CpuTimes.now()
        for child in children:
            child.send("GO")
        results = [json.loads(child.expect("RESULT", plan.max_seconds + 30)) for child in children]
        server_cpu = procfs.cpu_seconds(target.server_pid) - server_cpu
        if target.downstream_pid:
            downstream_cpu = procfs.cpu_seconds(target.downstream_pid) - downstream_cpu
        busy = procfs.CpuTimes.now().busy_percent_since(machine)
        rss = procfs.peak_rss_mb(target.server_pid)
    finally:
        for child in children:
            procs.stop(child)

    latencies = sorted(ms for r in results for ms in r["latencies_ms"])
    ok = len(latencies)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    per_call = 1e6 / ok if ok else math.nan
    return Cell(
        scenario=scenario.key,
        concurrency=concurrency,
        calls=ok,
        errors=dict(errors) | _warm_errors(warm),
        seconds=round(seconds, 3),
        sends_per_s=ok / seconds if seconds > 0 else math.nan,
        p50_ms=percentile(latencies, 0.50),
        p95_ms=percentile(latencies, 0.95),
        p99_ms=percentile(latencies, 0.99),
        server_cpu_us_per_call=server_cpu * per_call,
        server_peak_rss_mb=rss,
        downstream_cpu_us_per_call=downstream_cpu * per_call if target.downstream_pid else None,
        loadgen_cpu_us_per_call=sum(r["cpu_seconds"] for r in results) * per_call,
        machine_busy_pct=busy,
        delivered=ok + sum(w["ok"] for w in warm),
    )


def _warm_errors(warm: list[dict[str, Any]]) -> dict[str, int]:
    errors: Counter[str] = Counter()
    for w in warm:
        errors.update({f"warm-up {name}": n for name, n in w["errors"].items()})
    return dict(errors)
