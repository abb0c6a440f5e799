"""Prometheus metrics: one registry per server, passed to whoever counts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mailsvc.storage.base import PENDING, Claimed, Finish, Status, Storage


class Metrics:
    """The service's series; names follow Prometheus conventions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "mailsvc_rpc_requests",
            "RPCs handled, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "mailsvc_rpc_duration_seconds",
            "RPC latency, by method",
            ["method"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.sends = Counter(
            "mailsvc_sends",
            "Mails handed to a transport, by transport and outcome",
            ["transport", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "mailsvc_send_retries",
            "Send attempts retried after a transient failure",
            ["transport"],
            registry=r,
        )
        self.failovers = Counter(
            "mailsvc_failovers",
            "Mails moved to the next transport after transient failures",
            ["from_transport", "to_transport"],
            registry=r,
        )
        self.replays = Counter(
            "mailsvc_idempotent_replays",
            "Repeated requests answered from the idempotency store",
            registry=r,
        )
        self.smtp_pool_in_use = Gauge(
            "mailsvc_smtp_pool_connections_in_use",
            "SMTP connections currently sending",
            registry=r,
        )
        self.settings_reloads = Counter(
            "mailsvc_settings_reloads",
            "Settings file changes picked up, by result",
            ["result"],
            registry=r,
        )

        self.webhook_requests = Counter(
            "mailsvc_webhook_requests",
            "Mailgun webhook calls answered, by outcome (ok, unauthorized, replayed, ...)",
            ["outcome"],
            registry=r,
        )
        self.webhook_events = Counter(
            "mailsvc_webhook_events",
            "Mailgun events taken (signed, new, well-formed), by type",
            ["type"],
            registry=r,
        )
        self.messages = Gauge(
            "mailsvc_messages",
            "Message records by status (refreshed every few seconds from the store)",
            ["status"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "mailsvc_queue_depth",
            "Messages still to be sent: queued, scheduled or being attempted",
            registry=r,
        )
        self.queue_oldest_due_age = Gauge(
            "mailsvc_queue_oldest_due_age_seconds",
            "How long the oldest due message has been waiting for an attempt (0: none waits)",
            registry=r,
        )
        self.queue_attempts = Counter(
            "mailsvc_queue_attempts",
            "Background attempts, by transport and outcome (sent, retry, failed)",
            ["transport", "outcome"],
            registry=r,
        )
        self.queue_attempt_seconds = Histogram(
            "mailsvc_queue_attempt_duration_seconds",
            "Duration of background attempts",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.rate_limited = Counter(
            "mailsvc_rate_limited",
            "Sends refused by a rate limit, by reason",
            ["reason"],
            registry=r,
        )
        self.suppressed_recipients = Counter(
            "mailsvc_suppressed_recipients",
            "Recipients left out because they are on the suppression list",
            registry=r,
        )

    def track_pool(self, in_use: Callable[[], float]) -> None:
        self.smtp_pool_in_use.set_function(in_use)

    def serve(self, listen: str) -> tuple[WSGIServer, threading.Thread]:
        """Serve /metrics on host:port in a thread of its own."""
        host, _, port = listen.rpartition(":")
        return start_http_server(int(port), host.strip("[]") or "0.0.0.0", registry=self.registry)


_OUTCOMES = {Status.SENT: "sent", Status.QUEUED: "retry", Status.FAILED: "failed"}


def attempt_recorder(metrics: Metrics) -> Callable[[Claimed, Finish, float], None]:
    """The queue's on_finish hook: counts each recorded attempt by transport and outcome."""

    def record(claimed: Claimed, outcome: Finish, seconds: float) -> None:
        transport = outcome.transport or "none"
        metrics.queue_attempts.labels(transport, _OUTCOMES.get(outcome.status, "other")).inc()
        metrics.queue_attempt_seconds.observe(seconds)

    return record


async def refresh_queue_gauges(metrics: Metrics, storage: Storage, *, now: float) -> None:
    """Read the counts by status and the oldest due time from the store into the gauges."""
    counts = await storage.queue_stats(now=now)
    for status in Status:
        if status is not Status.UNSPECIFIED:
            metrics.messages.labels(status.name).set(counts.get(status, 0))
    metrics.queue_depth.set(sum(counts.get(s, 0) for s in PENDING))
    oldest = await storage.oldest_due(now=now)
    metrics.queue_oldest_due_age.set(max(now - oldest, 0.0) if oldest is not None else 0.0)
