"""build_server(config) and serve(): wiring, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mailsvc.api.interceptors import RpcInterceptor
from mailsvc.api.mail import MailServicer
from mailsvc.api.settings import SettingsServicer
from mailsvc.auth import SUPERADMIN, TokenVerifier, load_secret, mint_token
from mailsvc.config import Config
from mailsvc.idempotency import IdempotencyStore
from mailsvc.mailer import Mailer
from mailsvc.store import SettingsStore
from mailsvc.templates import TemplateEngine
from mailsvc.v1 import mail_pb2, mail_pb2_grpc, settings_pb2, settings_pb2_grpc

log = logging.getLogger(__name__)
SERVICES = (
    mail_pb2.DESCRIPTOR.services_by_name["MailService"].full_name,
    settings_pb2.DESCRIPTOR.services_by_name["SettingsService"].full_name,
)


class ListenError(Exception):
    """The listen address could not be bound."""


@dataclass
class Running:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    mailer: Mailer
    idempotency: IdempotencyStore
    port: int


async def build_server(config: Config, environ: Mapping[str, str]) -> Running:
    """Everything wired and bound, not yet started. Raises SettingsFileError, ListenError."""
    secret = load_secret(environ, config.secret_file)
    store = SettingsStore(config.data_dir, TemplateEngine())
    mailer = Mailer(config)
    idempotency = IdempotencyStore(config.data_dir / "idempotency.sqlite3")
    server = grpc.aio.server(
        interceptors=[RpcInterceptor(TokenVerifier(secret))],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes + 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    mail_pb2_grpc.add_MailServiceServicer_to_server(
        MailServicer(config, store, mailer, idempotency), server
    )
    settings_pb2_grpc.add_SettingsServiceServicer_to_server(SettingsServicer(store), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {config.listen}") from exc
    if port == 0:
        raise ListenError(f"cannot listen on {config.listen}")
    if config.dev:
        token = mint_token(secret, [SUPERADMIN], "dev", ttl=None)
        print(f"dev mode: superadmin token: {token}", flush=True)
    return Running(server, health_servicer, mailer, idempotency, port)


async def _purge_forever(idempotency: IdempotencyStore) -> None:
    while True:
        await asyncio.sleep(3600)
        purged = await asyncio.to_thread(idempotency.purge)
        log.info("forgot %d idempotency keys older than 24 hours", purged)


async def serve(config: Config, environ: Mapping[str, str]) -> None:
    """Run until SIGTERM or SIGINT, then refuse new work, drain in-flight calls and stop."""
    running = await build_server(config, environ)
    await running.server.start()
    for name in ("", *SERVICES):
        await running.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("mailsvc listening on %s (data dir %s)", config.listen, config.data_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    purger = asyncio.create_task(_purge_forever(running.idempotency))
    await stop.wait()
    purger.cancel()
    log.info("shutting down: draining in-flight calls (grace %.0fs)", config.grace_seconds)
    await running.health.enter_graceful_shutdown()
    await running.server.stop(config.grace_seconds)
    await running.mailer.aclose()
    running.idempotency.close()
    log.info("stopped")
