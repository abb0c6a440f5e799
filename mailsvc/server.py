"""build_server(config) and serve(): wiring, health, reflection, TLS, reload, graceful stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from mailsvc.api.interceptors import RpcInterceptor
from mailsvc.api.mail import MailServicer
from mailsvc.api.settings import SettingsServicer
from mailsvc.api.suppressions import SuppressionServicer
from mailsvc.auth import SUPERADMIN, TokenVerifier, load_secret, mint_token
from mailsvc.config import Config
from mailsvc.idempotency import IdempotencyStore
from mailsvc.lifecycle import PageTokens, RetryPolicy, page_token_key
from mailsvc.mailer import Mailer
from mailsvc.metrics import Metrics, attempt_recorder, refresh_queue_gauges
from mailsvc.queue import Attempt, QueueWorkers
from mailsvc.sending import Sender
from mailsvc.storage.base import Status, Storage, StorageError
from mailsvc.storage.factory import Stores, open_stores
from mailsvc.store import SettingsBackend, SettingsFileError
from mailsvc.templates import TemplateEngine
from mailsvc.transports.base import Delivery
from mailsvc.v1 import (
    mail_pb2,
    mail_pb2_grpc,
    settings_pb2,
    settings_pb2_grpc,
    suppression_pb2,
    suppression_pb2_grpc,
)
from mailsvc.webhooks import PATH as WEBHOOK_PATH
from mailsvc.webhooks import MailgunWebhook, StoreApplier, WebhookServer, make_app

log = logging.getLogger(__name__)
SETTLE_SECONDS = 0.5
# Room for the other fields of a request besides its message and attachments.
MESSAGE_HEADROOM_BYTES = 1024 * 1024
PROTOSET = "mailsvc.protoset"
SERVICES = (
    mail_pb2.DESCRIPTOR.services_by_name["MailService"].full_name,
    settings_pb2.DESCRIPTOR.services_by_name["SettingsService"].full_name,
    suppression_pb2.DESCRIPTOR.services_by_name["SuppressionService"].full_name,
)
QUEUE_GAUGES_SECONDS = 5.0  # how often the queue's gauges are read from the store
HEALTH_CHECK_SECONDS = 1.0  # how often a shared database is checked for health
HEALTH_CHECK_TIMEOUT = 2.0  # a database slower than this to answer counts as away
FEED_RETRY_SECONDS = 1.0  # wait before following the change feed again after it broke
GC_YOUNG_THRESHOLD = 5000  # allocations between young collections (default 700)


class ListenError(Exception):
    """The listen address could not be bound, or its TLS files not read."""


@dataclass
class Running:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    interceptor: RpcInterceptor
    mailer: Mailer
    idempotency: IdempotencyStore
    metrics: Metrics
    mail: MailServicer
    workers: QueueWorkers
    webhook: MailgunWebhook
    stores: Stores


def _options(config: Config) -> list[tuple[str, int]]:
    """gRPC's limits, set deliberately rather than left to the library's defaults."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes + MESSAGE_HEADROOM_BYTES),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.keepalive_time_ms", int(config.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients may ping this often without calls; faster pings are a protocol abuse.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_connection_idle_ms", int(config.max_connection_idle_seconds * 1000)),
        ("grpc.so_reuseport", 0),
    ]


def reflection_pool() -> descriptor_pool.DescriptorPool | None:
    """Descriptors for reflection from protoc's descriptor set, which (unlike the ones compiled
    into the _pb2 modules) carry json_name, so clients like grpcurl print camelCase names."""
    try:
        data = resources.files("mailsvc.v1").joinpath(PROTOSET).read_bytes()
    except OSError:
        log.warning("%s not found next to mailsvc.v1: reflection shows proto field names", PROTOSET)
        return None
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.AddSerializedFile(file.SerializeToString())
    # Health, reflection, and the error details our statuses carry, so clients can decode them.
    for module in (health_pb2, reflection_pb2, error_details_pb2, status_pb2):
        _add_file(pool, module.DESCRIPTOR)
    return pool


def _add_file(pool: descriptor_pool.DescriptorPool, file: Any) -> None:
    """Add a file descriptor and, first, whatever it imports that the pool lacks."""
    try:
        pool.FindFileByName(file.name)
        return
    except KeyError:
        pass
    for dependency in file.dependencies:
        _add_file(pool, dependency)
    pool.AddSerializedFile(file.serialized_pb)


def _bind(server: grpc.aio.Server, config: Config) -> None:
    try:
        if config.tls_cert and config.tls_key:
            client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(config.listen, credentials)
        else:
            port = server.add_insecure_port(config.listen)
    except OSError as exc:
        raise ListenError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {config.listen}") from exc
    if port == 0:
        raise ListenError(f"cannot listen on {config.listen}")


async def build_server(config: Config, environ: Mapping[str, str]) -> Running:
    """Everything wired and bound, not yet started. Raises SettingsFileError, ListenError."""
    secret = load_secret(environ, config.secret_file)
    stores = await open_stores(config, TemplateEngine())
    store = stores.settings
    metrics = Metrics()
    mailer = Mailer(config, metrics, current_etag=lambda: store.snapshot.etag)
    try:
        return _wire(config, secret, stores, metrics, mailer)
    except BaseException:
        await stores.close()
        await mailer.aclose()
        raise


def _wire(
    config: Config,
    secret: bytes,
    stores: Stores,
    metrics: Metrics,
    mailer: Mailer,
) -> Running:
    store, storage = stores.settings, stores.storage
    idempotency = IdempotencyStore(storage, lease=config.idempotency_lease)
    tokens = PageTokens(page_token_key(secret))
    sender = Sender(storage, mailer, metrics)

    async def attempt(queued: Attempt) -> Delivery:
        return await sender.attempt(queued, store.snapshot)

    workers = QueueWorkers(
        storage,
        attempt,
        owner=f"{socket.gethostname()}:{os.getpid()}",
        workers=config.queue_workers,
        policy=RetryPolicy(
            initial=config.queue_retry_initial,
            maximum=config.queue_retry_max,
            max_age=config.queue_max_age,
        ),
        lease=config.queue_lease,
        retention=config.message_retention,
        on_finish=attempt_recorder(metrics),
    )
    sender.wake = workers.wake
    interceptor = RpcInterceptor(
        TokenVerifier(secret), metrics, max_request_memory=config.max_request_memory
    )
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    mail_servicer = MailServicer(config, store, sender, storage, idempotency, metrics, tokens)
    mail_pb2_grpc.add_MailServiceServicer_to_server(mail_servicer, server)
    settings_pb2_grpc.add_SettingsServiceServicer_to_server(SettingsServicer(store), server)
    suppression_pb2_grpc.add_SuppressionServiceServicer_to_server(
        SuppressionServicer(storage, sender.suppressions, tokens), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server, pool=reflection_pool()
    )
    _bind(server, config)
    if config.dev:
        token = mint_token(secret, [SUPERADMIN], "dev", ttl=None)
        print(f"dev mode: superadmin token: {token}", flush=True)
    return Running(
        server,
        health_servicer,
        interceptor,
        mailer,
        idempotency,
        metrics,
        mail_servicer,
        workers,
        _webhook(store, storage, metrics, sender),
        stores,
    )


async def _reload_forever(store: SettingsBackend, metrics: Metrics, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            if await store.reload_if_changed():
                metrics.settings_reloads.labels("ok").inc()
                log.info("settings file changed outside the service: reloaded")
        except SettingsFileError as exc:
            metrics.settings_reloads.labels("invalid").inc()
            log.error("settings file edit ignored, the last good settings keep serving: %s", exc)
        except Exception:  # whatever it was, the reload must go on for the next edit
            metrics.settings_reloads.labels("error").inc()
            log.exception("settings reload failed; the last good settings keep serving")


def _webhook(
    store: SettingsBackend, storage: Storage, metrics: Metrics, sender: Sender
) -> MailgunWebhook:
    """Mailgun's webhook handler; the signing key is read per call from the settings in use,
    so a key stored now is used by the next call."""
    return MailgunWebhook(
        signing_key=lambda: store.snapshot.settings.mailgun.webhook_signing_key,
        apply=StoreApplier(storage, on_suppressed=sender.suppressions.note_added),
        count_outcome=lambda outcome: metrics.webhook_requests.labels(outcome).inc(),
        count_event=lambda kind: metrics.webhook_events.labels(kind).inc(),
    )


async def _start_webhooks(config: Config, running: Running) -> WebhookServer:
    host, _, port = config.webhook_listen.rpartition(":")
    try:
        return await WebhookServer.start(
            make_app(running.webhook), host.strip("[]") or "0.0.0.0", int(port)
        )
    except (OSError, ValueError) as exc:
        raise ListenError(f"cannot serve webhooks on {config.webhook_listen}") from exc


async def _queue_gauges_forever(metrics: Metrics, storage: Storage) -> None:
    while True:
        try:
            await refresh_queue_gauges(metrics, storage, now=time.time())
        except StorageError as exc:
            log.warning("queue metrics not refreshed: %s", exc)
        await asyncio.sleep(QUEUE_GAUGES_SECONDS)


async def _set_health(health_servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", *SERVICES):
        await health_servicer.set(name, status)


async def _watch_database(
    probe: Callable[[], Awaitable[None]], health_servicer: health.aio.HealthServicer
) -> None:
    """NOT_SERVING while the shared database does not answer, so load balancers send calls
    to replicas that can serve them; SERVING again once it does."""
    up = True
    while True:
        await asyncio.sleep(HEALTH_CHECK_SECONDS)
        try:
            async with asyncio.timeout(HEALTH_CHECK_TIMEOUT):
                await probe()
            now_up = True
        except (StorageError, TimeoutError) as exc:
            now_up = False
            if up:
                log.error("database unreachable, health NOT_SERVING: %s", exc or "timed out")
        if now_up != up:
            if now_up:
                log.info("database reachable again, health SERVING")
            await _set_health(
                health_servicer,
                health_pb2.HealthCheckResponse.SERVING
                if now_up
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            up = now_up


async def _wake_on_queued(storage: Storage, wake: Callable[[], None]) -> None:
    """Wake this replica's queue workers when any replica queues or reschedules a mail."""
    while True:
        events = storage.events()
        try:
            async for event in events:
                if event.status in (Status.QUEUED, Status.SCHEDULED):
                    wake()
        except StorageError as exc:
            log.warning("queue wake-ups from other replicas paused: %s", exc)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
        wake()  # whatever was queued meanwhile
        await asyncio.sleep(FEED_RETRY_SECONDS)


async def serve(config: Config, environ: Mapping[str, str]) -> None:
    """Run until SIGTERM or SIGINT, then refuse new work, drain in-flight calls and stop."""
    running = await build_server(config, environ)
    metrics_server = None
    if config.metrics_listen:
        try:
            metrics_server = running.metrics.serve(config.metrics_listen)
        except (OSError, ValueError) as exc:
            raise ListenError(f"cannot serve metrics on {config.metrics_listen}") from exc
    await running.server.start()
    webhooks = None
    if config.webhook_listen:
        try:
            webhooks = await _start_webhooks(config, running)
        except ListenError:
            await running.server.stop(None)
            await running.stores.close()
            raise
        log.info("mailgun webhooks on http://%s%s", config.webhook_listen, WEBHOOK_PATH)
    await _set_health(running.health, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "mailsvc listening on %s%s (%s)",
        config.listen,
        " with TLS" if config.tls_cert else "",
        f"data dir {config.data_dir}" if running.stores.file_settings else "shared database",
    )
    # What start-up made (modules, protos, settings) lives as long as the process: kept out
    # of the collector's full passes, and young passes less often (about 2% of SendMail's CPU).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running.workers.start()
    background: list[asyncio.Task[None]] = []
    stores = running.stores
    if metrics_server is not None:
        background.append(
            asyncio.create_task(_queue_gauges_forever(running.metrics, stores.storage))
        )
    if stores.probe is not None:
        background.append(asyncio.create_task(_watch_database(stores.probe, running.health)))
    if stores.shared:
        background.append(
            asyncio.create_task(_wake_on_queued(stores.storage, running.workers.wake))
        )
    if config.reload_interval > 0 and stores.file_settings:
        background.append(
            asyncio.create_task(
                _reload_forever(stores.settings, running.metrics, config.reload_interval)
            )
        )
    await stop.wait()
    log.info("shutting down: draining in-flight calls (grace %.0fs)", config.grace_seconds)
    for task in background:
        task.cancel()
    running.interceptor.draining = True
    await running.health.enter_graceful_shutdown()
    running.mail.end_watches()
    # stop() cancels calls that arrived but were not handed to a handler yet; during this
    # moment they are answered UNAVAILABLE instead, which clients know to retry.
    await asyncio.sleep(min(SETTLE_SECONDS, config.grace_seconds))
    # Queue work stops being claimed now; attempts in flight finish while calls drain.
    await asyncio.gather(
        running.server.stop(config.grace_seconds),
        running.workers.aclose(config.grace_seconds),
    )
    if webhooks is not None:
        await webhooks.aclose()
    await running.idempotency.aclose(timeout=config.grace_seconds)
    await running.mailer.aclose()
    await running.stores.close()
    if metrics_server is not None:
        metrics_server[0].shutdown()
    log.info("stopped")
