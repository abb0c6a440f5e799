"""The scenarios of one benchmark run, and how many calls each cell makes."""

from __future__ import annotations

from dataclasses import dataclass

CONCURRENCY = (1, 16, 64)


@dataclass(frozen=True)
class Scenario:
    """One line of the table and the chart.

    `kind` is the load generator's KIND; `system` names what the calls hit, whose process
    is "the server" of the row (its CPU and peak RSS are reported).
    """

    key: str
    title: str
    kind: str
    system: str
    scale: float = 1.0  # of the run's calls per cell, for scenarios that are slow by design
    levels: tuple[int, ...] = CONCURRENCY  # calls in flight of its cells


SERVER_SYSTEMS = ("pooled", "per-mail", "mailgun", "drain", "records", "pg", "pg-2")
# Rows that are not load generator cells: measured by bench/drain.py
DRAINS = ("drain", "pg-drain-1", "pg-drain-2")
PG_KEYS = ("pg-smtp", "pg-queued", "pg-drain-1", "pg-drain-2")

# In the order of the table. Runs are grouped by system instead (see run.py).
SCENARIOS = (
    Scenario("noop", "ceiling: no-op RPC (Health/Check)", "noop", "pooled"),
    Scenario("smtp-ceiling", "ceiling: SMTP sink, direct (4 conns)", "smtp", "sink"),
    Scenario("http-ceiling", "ceiling: Mailgun stand-in, direct", "http", "standin"),
    Scenario(
        "smtp-per-mail", "baseline: SendMail→SMTP, conn per mail", "send:smtp", "per-mail", 0.5
    ),
    Scenario("smtp-pooled", "SendMail→SMTP (pooled)", "send:smtp", "pooled"),
    Scenario("mailgun", "SendMail→Mailgun stand-in", "send:mailgun", "mailgun"),
    Scenario("templated", "SendTemplatedMail→SMTP", "templated:smtp", "pooled"),
    Scenario("queued", "SendMail queue=true: accept, workers delivering", "queue", "pooled"),
    Scenario(
        "backlog", "SendMail queue=true: accept, deliveries held", "backlog", "drain", levels=(16,)
    ),
    Scenario("drain", "queue drain: backlog→SMTP, 16 workers", "", "drain", levels=(16,)),
    Scenario(
        "list", "ListMessages, 50 of 100k records, by recipient", "list", "records", scale=0.5
    ),
    Scenario("pg-smtp", "PostgreSQL: SendMail→SMTP (pooled)", "send:smtp", "pg", levels=(16,)),
    Scenario("pg-queued", "PostgreSQL: SendMail queue=true: accept", "queue", "pg", levels=(16,)),
    Scenario("pg-drain-1", "PostgreSQL: queue drain, 1 replica", "", "pg", levels=(16,)),
    Scenario("pg-drain-2", "PostgreSQL: queue drain, 2 replicas", "", "pg-2", levels=(32,)),
)
BY_KEY = {s.key: s for s in SCENARIOS}


@dataclass(frozen=True)
class Plan:
    """Calls per cell after a warm-up; single-call cells are slower, so they make fewer."""

    calls: int = 8000
    warmup: int = 800
    single_scale: float = 0.5
    loadgen_procs: int = 1
    max_seconds: float = 60.0
    backlog: int = 20_000  # queued mails of the drain
    records: int = 100_000  # records seeded for ListMessages

    def calls_for(self, scenario: Scenario, concurrency: int) -> tuple[int, int]:
        """(warm-up calls, measured calls) of one cell."""
        scale = scenario.scale * (self.single_scale if concurrency == 1 else 1.0)
        calls = max(10, round(self.calls * scale))
        warmup = max(concurrency, round(self.warmup * scale))
        return warmup, calls
