"""The targets: each ratio of the run, its target and whether it was met."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bench.cell import Cell
from bench.scenarios import BY_KEY, SERVER_SYSTEMS

Cells = Mapping[tuple[str, int], Cell]


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    target: str
    met: bool | None  # None: a cell it needs was not measured
    detail: str = ""

    def line(self) -> str:
        if math.isnan(self.value):
            value = "n/a"
        else:  # enough digits that a value just under its target does not print as equal
            value = f"{self.value:.3f}" if self.value < 10 else f"{self.value:.1f}"
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[self.met]
        detail = f" ({self.detail})" if self.detail and self.met is not None else ""
        return f"- {self.name}: {value} (target {self.target}) — **{verdict}**{detail}"


def _get(cells: Cells, key: str, concurrency: int, attr: str) -> float:
    cell = cells.get((key, concurrency))
    return float(getattr(cell, attr)) if cell is not None and cell.calls else math.nan


def _best(cells: Cells, key: str) -> float:
    rates = [c.sends_per_s for (k, _), c in cells.items() if k == key and c.calls]
    return max(rates) if rates else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def _check(name: str, value: float, target: str, ok: Callable[[float], bool], detail: str) -> Check:
    return Check(name, value, target, None if math.isnan(value) else ok(value), detail)


def evaluate(cells: Cells) -> list[Check]:
    """Every ratio of the issue; a cell that did not run makes its ratio not measured."""

    def rate(key: str, concurrency: int) -> float:
        return _get(cells, key, concurrency, "sends_per_s")

    def cpu(key: str, concurrency: int) -> float:
        return _get(cells, key, concurrency, "server_cpu_us_per_call")

    noop16, sink_best = rate("noop", 16), _best(cells, "smtp-ceiling")
    http_best = _best(cells, "http-ceiling")
    p50 = _get(cells, "smtp-pooled", 16, "p50_ms")
    p99 = _get(cells, "smtp-pooled", 16, "p99_ms")
    servers = [
        c.server_peak_rss_mb for (k, _), c in cells.items() if BY_KEY[k].system in SERVER_SYSTEMS
    ]
    rss = max(servers) if servers else math.nan
    return [
        _check(
            "server CPU per SendMail→SMTP with its record (pooled) / per no-op RPC, at 16",
            _ratio(cpu("smtp-pooled", 16), cpu("noop", 16)),
            "≤ 3.5",
            lambda v: v <= 3.5,
            f"{cpu('smtp-pooled', 16):.0f} µs vs {cpu('noop', 16):.0f} µs",
        ),
        _check(
            "SendMail→SMTP at 16 / min(no-op RPC at 16, SMTP sink ceiling)",
            _ratio(rate("smtp-pooled", 16), min(noop16, sink_best)),
            "≥ 0.25",
            lambda v: v >= 0.25,
            f"{rate('smtp-pooled', 16):.0f}/s vs min({noop16:.0f}, {sink_best:.0f})/s",
        ),
        _check(
            "SendMail→SMTP pooled / connection-per-mail baseline, at 16",
            _ratio(rate("smtp-pooled", 16), rate("smtp-per-mail", 16)),
            "≥ 2",
            lambda v: v >= 2,
            f"{rate('smtp-pooled', 16):.0f}/s vs {rate('smtp-per-mail', 16):.0f}/s",
        ),
        _check(
            "SendMail→Mailgun at 64 / at 16",
            _ratio(rate("mailgun", 64), rate("mailgun", 16)),
            "≥ 0.9",
            lambda v: v >= 0.9,
            f"{rate('mailgun', 64):.0f}/s vs {rate('mailgun', 16):.0f}/s",
        ),
        _check(
            "SendMail→Mailgun at 64 / stand-in ceiling",
            _ratio(rate("mailgun", 64), http_best),
            "≥ 0.4",
            lambda v: v >= 0.4,
            f"{rate('mailgun', 64):.0f}/s vs {http_best:.0f}/s",
        ),
        _check(
            "SendTemplatedMail / SendMail (SMTP), at 16",
            _ratio(rate("templated", 16), rate("smtp-pooled", 16)),
            "≥ 0.9",
            lambda v: v >= 0.9,
            f"{rate('templated', 16):.0f}/s vs {rate('smtp-pooled', 16):.0f}/s",
        ),
        _check(
            "tail: p99 / p50 of SendMail→SMTP (pooled) at 16",
            _ratio(p99, p50),
            "≤ 3",
            lambda v: v <= 3,
            f"p99 {p99:.1f} ms, p50 {p50:.1f} ms",
        ),
        *_lifecycle(cells, rate, cpu),
        _check(
            "server peak RSS (MB, largest of the mailsvc servers)",
            rss,
            "≤ 150",
            lambda v: v <= 150,
            "",
        ),
    ]


def _lifecycle(
    cells: Cells, rate: Callable[[str, int], float], cpu: Callable[[str, int], float]
) -> list[Check]:
    """Issues 11 and 13: queued accept, queue drain, records, PostgreSQL and replicas."""
    noop16 = rate("noop", 16)
    drain = cells.get(("drain", 16))
    lost = sum(drain.errors.values()) if drain is not None else math.nan
    p99 = _get(cells, "list", 16, "p99_ms")
    records_rss = max(
        (c.server_peak_rss_mb for (k, _), c in cells.items() if k == "list"), default=math.nan
    )
    one, two = cells.get(("pg-drain-1", 16)), cells.get(("pg-drain-2", 32))
    return [
        _check(
            "SendMail queue=true accept at 16, workers delivering / no-op RPC at 16",
            _ratio(rate("queued", 16), noop16),
            "≥ 0.5",
            lambda v: v >= 0.5,
            f"{rate('queued', 16):.0f}/s vs {noop16:.0f}/s",
        ),
        _check(
            "SendMail queue=true accept at 16, deliveries held / no-op RPC at 16",
            _ratio(rate("backlog", 16), noop16),
            "≥ 0.5",
            lambda v: v >= 0.5,
            f"{rate('backlog', 16):.0f}/s vs {noop16:.0f}/s",
        ),
        _check(
            "queue drain (16 workers) / SendMail→SMTP at 16",
            _ratio(rate("drain", 16), rate("smtp-pooled", 16)),
            "≥ 0.8",
            lambda v: v >= 0.8,
            f"{rate('drain', 16):.0f}/s vs {rate('smtp-pooled', 16):.0f}/s"
            + (f", {drain.calls} mails" if drain is not None else ""),
        ),
        _check(
            "queue drain: mails lost or sent twice (distinct Message-IDs at the sink)",
            lost,
            "= 0",
            lambda v: v == 0,
            ", ".join(f"{n} {k}" for k, n in drain.errors.items()) if drain else "",
        ),
        _check(
            "ListMessages p99 at 16, page of 50 by recipient, 100k records (ms)",
            p99,
            "≤ 50",
            lambda v: v <= 50,
            f"p50 {_get(cells, 'list', 16, 'p50_ms'):.1f} ms, "
            f"p99 at 1 in flight {_get(cells, 'list', 1, 'p99_ms'):.1f} ms",
        ),
        _check(
            "server peak RSS with 100k records (MB)",
            records_rss,
            "≤ 150",
            lambda v: v <= 150,
            "",
        ),
        _check(
            "server CPU per SendMail→SMTP with its record, PostgreSQL / embedded, at 16",
            _ratio(cpu("pg-smtp", 16), cpu("smtp-pooled", 16)),
            "≤ 1.3",
            lambda v: v <= 1.3,
            f"{cpu('pg-smtp', 16):.0f} µs vs {cpu('smtp-pooled', 16):.0f} µs",
        ),
        _check(
            "SendMail queue=true accept at 16, PostgreSQL / embedded",
            _ratio(rate("pg-queued", 16), rate("queued", 16)),
            "≥ 0.5",
            lambda v: v >= 0.5,
            f"{rate('pg-queued', 16):.0f}/s vs {rate('queued', 16):.0f}/s",
        ),
        _check(
            "queue drain, 2 replicas / 1 replica (PostgreSQL)",
            _ratio(two.sends_per_s if two else math.nan, one.sends_per_s if one else math.nan),
            "≥ 1.5",
            lambda v: v >= 1.5,
            _replicas_detail(one, two),
        ),
    ]


def _replicas_detail(one: Cell | None, two: Cell | None) -> str:
    """The rates, and from the CPU figures which limit holds here and the projection with a
    core per replica (what a deployment of replicas on their own machines would see)."""
    if one is None or two is None:
        return ""
    sink = two.downstream_cpu_us_per_call or 0.0
    per_core_one = 1e6 / one.server_cpu_us_per_call
    per_core_two = 2 * 1e6 / two.server_cpu_us_per_call  # two replicas, a core each
    return (
        f"{two.sends_per_s:.0f}/s vs {one.sends_per_s:.0f}/s; mailsvc CPU "
        f"{one.server_cpu_us_per_call:.0f} µs/mail with 1, {two.server_cpu_us_per_call:.0f} "
        f"with 2 (both together), the SMTP sink {sink:.0f} µs/mail, PostgreSQL and the load "
        f"generator besides; machine {one.machine_busy_pct:.0f}% and "
        f"{two.machine_busy_pct:.0f}% busy, so the 2 cores are the limit, not the replicas. "
        f"With a core per replica: {per_core_two:.0f}/s for 2 vs {per_core_one:.0f}/s for 1, "
        f"a projected {per_core_two / per_core_one:.2f}x (if PostgreSQL and the sink keep up)"
    )
