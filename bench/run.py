"""`make bench`: each scenario at 1, 16 and 64 calls in flight; the table, the targets, a chart.

    python -m bench.run [--calls 2000] [--warmup 200] [--profile auto|always|never] [--strict]

Every process (servers, sink, stand-in, load generators) is a child of this one and is stopped
when it ends, however it ends. Results go to bench/results/ (latest.json, a timestamped copy,
latest.md, latest.png). Exit status 1 when a call failed or the mails were wrong; with
--strict also when a target was not met.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench import report, workload
from bench.cell import Cell, Target, measure
from bench.correctness import Counted, check_samples, verdict
from bench.procs import Processes
from bench.pyspy import Profile, Recorder
from bench.ratios import evaluate
from bench.scenarios import BY_KEY, CONCURRENCY, Plan, Scenario
from bench.servers import Helper, start_mailsvc, start_sink, start_standin

RESULTS = Path(__file__).resolve().parent / "results"
SINK_BOUND = ("smtp-ceiling", "smtp-per-mail", "smtp-pooled", "templated")
STANDIN_BOUND = ("http-ceiling", "mailgun")


@dataclass
class Run:
    """Everything measured so far."""

    plan: Plan
    token: str
    concurrency: tuple[int, ...]
    cells: dict[tuple[str, int], Cell] = field(default_factory=dict)
    extra_delivered: Counter[str] = field(default_factory=Counter)  # profile cells, by helper
    profiles: list[Profile] = field(default_factory=list)

    def scenario(self, procs: Processes, scenario: Scenario, target: Target) -> None:
        for concurrency in self.concurrency:
            started = time.monotonic()
            cell = measure(procs, scenario, concurrency, target, self.plan, token=self.token)
            self.cells[scenario.key, concurrency] = cell
            errors = f", {sum(cell.errors.values())} errors" if cell.errors else ""
            say(
                f"  {scenario.key:>14} @{concurrency:<2}  {cell.calls:5d} calls  "
                f"{cell.sends_per_s:8.0f}/s  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms  "
                f"server {cell.server_cpu_us_per_call:5.0f} µs/call  "
                f"machine {cell.machine_busy_pct:3.0f}% busy{errors}  "
                f"({time.monotonic() - started:.1f} s)"
            )

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

    if only & {"noop", "smtp-pooled", "templated"}:
        say("one pooled server: no-op RPC, SendMail→SMTP, SendTemplatedMail→SMTP")
        server = start_mailsvc(procs, "mailsvc-pooled", work / "pooled")
        server.put_settings(workload.smtp_settings("127.0.0.1", sink.port))
        scenarios(Target(server.address, server.child.pid), "noop")
        target = Target(server.address, server.child.pid, sink.child.pid)
        scenarios(target, "smtp-pooled", "templated")
        unmet = [c for c in evaluate(run.cells) if c.met is False]
        if profile == "always" or (profile == "auto" and unmet):
            _profile(run, procs, work, BY_KEY["smtp-pooled"], 16, target, "sink")
        procs.stop(server.child)
    return sink, standin


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
    if only & {"smtp-per-mail", "smtp-pooled"}:
        subjects.add(workload.PLAIN_SUBJECT)
    if "templated" in only:
        subjects.add(workload.TEMPLATED_SUBJECT)
    return subjects


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=Plan.calls, help="measured calls per cell")
    parser.add_argument("--warmup", type=int, default=Plan.warmup, help="warm-up calls per cell")
    parser.add_argument("--loadgen-procs", type=int, default=Plan.loadgen_procs)
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
    plan = Plan(calls=args.calls, warmup=args.warmup, loadgen_procs=args.loadgen_procs)
    run = Run(plan, workload.token(["superadmin"], "bench"), CONCURRENCY)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix="mailsvc-bench-"))
    (work / "logs").mkdir()
    started = time.monotonic()
    ok = False
    try:
        with Processes(work / "logs", cwd=RESULTS.parent.parent) as procs:
            sink, standin = _measure_all(run, procs, work, only, args.profile)
            sink_count = int(sink.child.ask("count"))
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

    outcome = report.Outcome(
        stamp=stamp,
        duration_s=duration,
        plan=run.plan,
        cells=list(run.cells.values()),
        checks=checks,
        correctness=correctness,
        profiles=run.profiles,
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
