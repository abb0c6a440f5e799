"""The queue drain: a backlog queued while the sink holds every sender, then released.

The sink holds MAIL FROM (nothing fails, so no attempt is rescheduled: the workers just wait
with their claimed mails), the backlog is accepted through SendMail queue=true (that is the
"deliveries held" accept cell), then the sink lets go and the row measures from the release
until the sink has the whole backlog. Lost and doubled mails come from the distinct
Message-IDs the sink saw; the store must then hold nothing QUEUED, SENDING or FAILED.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import grpc
from mailsvc.v1 import mail_pb2, mail_pb2_grpc

from bench import procfs, workload
from bench.cell import Cell, Target, measure
from bench.procs import Processes
from bench.scenarios import BY_KEY, Plan
from bench.servers import Helper, Mailsvc

STALL_SECONDS = 30.0  # no new mail at the sink for this long: the drain is over, short
POLL_SECONDS = 0.1


def _backlog_seen(sink: Helper) -> tuple[int, int]:
    """(mails, distinct Message-IDs) of the backlog subject at the sink."""
    seen = json.loads(sink.child.ask("ids"))
    total, distinct = seen.get(workload.BACKLOG_SUBJECT, [0, 0])
    return int(total), int(distinct)


def fill(
    procs: Processes, server: Mailsvc, sink: Helper, plan: Plan, *, token: str, label: str = ""
) -> Cell:
    """Hold the sink and queue `plan.backlog` mails through `server` (warm-up included)."""
    sink.child.ask("hold")
    warmup = min(plan.warmup, plan.backlog // 10)
    fill_plan = replace(
        plan, calls=plan.backlog - warmup, warmup=warmup, max_seconds=max(plan.max_seconds, 300)
    )
    target = Target(server.address, server.child.pid)
    return measure(procs, BY_KEY["backlog"], 16, target, fill_plan, token=token, label=label)


def drain(key: str, servers: list[Mailsvc], sink: Helper, queued: int, workers: int) -> Cell:
    """Release the sink and time the backlog into it; the row of `key`."""
    total0, distinct0 = _backlog_seen(sink)
    cpu0 = [procfs.cpu_seconds(s.child.pid) for s in servers]
    sink_cpu0 = procfs.cpu_seconds(sink.child.pid)
    machine = procfs.CpuTimes.now()
    started = time.monotonic()
    sink.child.ask("release")
    total, distinct = total0, distinct0
    last_change = ended = started
    while total - total0 < queued and time.monotonic() - last_change < STALL_SECONDS:
        time.sleep(POLL_SECONDS)
        now_total, distinct = _backlog_seen(sink)
        if now_total != total:
            total, last_change = now_total, time.monotonic()
            ended = last_change
    busy = procfs.CpuTimes.now().busy_percent_since(machine)
    cpu = sum(procfs.cpu_seconds(s.child.pid) - c for s, c in zip(servers, cpu0, strict=True))
    sink_cpu = procfs.cpu_seconds(sink.child.pid) - sink_cpu0
    delivered, new_distinct = total - total0, distinct - distinct0
    seconds = ended - started
    errors = {}
    if queued - new_distinct:
        errors["lost"] = queued - new_distinct
    if delivered - new_distinct:
        errors["sent twice"] = delivered - new_distinct
    left = _left_in_store(servers[0])
    if left:
        errors.update({f"records left {name}": n for name, n in left.items()})
    per_mail = 1e6 / new_distinct if new_distinct else math.nan
    return Cell(
        scenario=key,
        concurrency=workers,
        calls=new_distinct,
        errors=errors,
        seconds=round(seconds, 3),
        sends_per_s=new_distinct / seconds if seconds > 0 else math.nan,
        p50_ms=math.nan,
        p95_ms=math.nan,
        p99_ms=math.nan,
        server_cpu_us_per_call=cpu * per_mail,
        server_peak_rss_mb=max(procfs.peak_rss_mb(s.child.pid) for s in servers),
        downstream_cpu_us_per_call=sink_cpu * per_mail,
        loadgen_cpu_us_per_call=0.0,
        machine_busy_pct=busy,
        delivered=delivered,
    )


def _left_in_store(server: Mailsvc) -> dict[str, int]:
    """Statuses that must be empty once the backlog is out (one page of 1 is enough)."""
    metadata = (("authorization", f"Bearer {workload.token(['superadmin'], 'root')}"),)
    left = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = mail_pb2_grpc.MailServiceStub(channel)
        for status in ("QUEUED", "SENDING", "FAILED"):
            request = mail_pb2.ListMessagesRequest(page_size=1, status=f"MESSAGE_STATUS_{status}")
            reply = stub.ListMessages(request, metadata=metadata, timeout=30)
            if reply.messages:  # 1: some, 2: more than one
                left[status] = len(reply.messages) + (1 if reply.next_page_token else 0)
    return left
