"""Server configuration: built once from flags and environment, then passed down."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_MESSAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything `mailsvc serve` needs to know, fixed at start."""

    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("data")
    default_from: str = "no-reply@localhost"
    jwt_secret_file: Path | None = None
    mailgun_base_url: str | None = None
    dev: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    smtp_timeout: float = 30.0
    send_timeout: float = 60.0
    send_attempts: int = 3
    smtp_pool_size: int = 4
    max_in_flight: int = 256
    grace_seconds: float = 30.0
    metrics_listen: str = ""
    log_format: str = "text"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    reload_interval: float = 2.0
    queue_workers: int = 16
    queue_retry_initial: float = 30.0
    queue_retry_max: float = 1800.0
    queue_max_age: float = 86400.0
    queue_lease: float = 60.0
    message_retention: float = 604800.0
    # gRPC transport limits (no flags yet): streams per connection, calls in flight overall,
    # keepalive pings, and how long an idle connection is kept.
    max_concurrent_streams: int = 1024
    max_concurrent_rpcs: int = 2048
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    max_connection_idle_seconds: float = 600.0

    @property
    def settings_path(self) -> Path:
        return self.data_dir / "settings.json"

    @property
    def acl_path(self) -> Path:
        return self.data_dir / "acl.json"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def secret_file(self) -> Path:
        return self.jwt_secret_file or self.data_dir / "jwt-secret"


class ConfigError(Exception):
    """Flags or environment that cannot work together."""


def env_flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `token`: where the data and the JWT secret live."""
    parser.add_argument("--data-dir", help="data directory (env MAILSVC_DATA_DIR; default ./data)")
    parser.add_argument(
        "--jwt-secret-file",
        help="file holding the JWT secret (env MAILSVC_JWT_SECRET_FILE; "
        "default <data-dir>/jwt-secret)",
    )


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser)
    parser.add_argument("--listen", help="address to listen on (env MAILSVC_LISTEN)")
    parser.add_argument("--default-from", help="From of mail (env MAILSVC_DEFAULT_FROM)")
    parser.add_argument(
        "--mailgun-base-url", help="Mailgun API base URL (env MAILSVC_MAILGUN_BASE_URL)"
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="dev mode: unsent mail goes to <data-dir>/outbox (env MAILSVC_DEV=1)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        help="largest message accepted, in bytes (env MAILSVC_MAX_MESSAGE_BYTES; default 10 MiB)",
    )
    parser.add_argument(
        "--smtp-pool-size",
        type=int,
        help="reused SMTP connections per server; 0 = one per mail "
        "(env MAILSVC_SMTP_POOL_SIZE; default 4)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        help="sends handed over at once; more wait (env MAILSVC_MAX_IN_FLIGHT; default 256)",
    )
    parser.add_argument(
        "--send-attempts",
        type=int,
        help="attempts per transport for transient failures (env MAILSVC_SEND_ATTEMPTS; default 3)",
    )
    parser.add_argument(
        "--send-timeout",
        type=float,
        help="seconds a send may take when the caller sets no deadline "
        "(env MAILSVC_SEND_TIMEOUT; default 60)",
    )
    parser.add_argument(
        "--metrics-listen",
        help="host:port for Prometheus /metrics (env MAILSVC_METRICS_LISTEN; off when empty)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text or one JSON object each (env MAILSVC_LOG_FORMAT; default text)",
    )
    parser.add_argument("--tls-cert", help="server certificate chain, PEM (env MAILSVC_TLS_CERT)")
    parser.add_argument("--tls-key", help="server private key, PEM (env MAILSVC_TLS_KEY)")
    parser.add_argument(
        "--tls-client-ca",
        help="require client certificates signed by this CA, PEM (env MAILSVC_TLS_CLIENT_CA)",
    )
    parser.add_argument(
        "--reload-interval",
        type=float,
        help="seconds between checks of settings.json for outside edits; 0 = never "
        "(env MAILSVC_RELOAD_INTERVAL; default 2)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        help="seconds in-flight calls get to finish on SIGTERM (env MAILSVC_SHUTDOWN_GRACE; "
        "default 30)",
    )
    for flag, kind, help in _QUEUE_FLAGS:
        env = "MAILSVC_" + flag.upper().replace("-", "_")
        parser.add_argument(f"--{flag}", type=kind, help=f"{help} (env {env})")


_QUEUE_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("queue-workers", int, "background delivery attempts in flight at once; default 16"),
    ("queue-retry-initial", float, "seconds before the first retry of a queued mail; default 30"),
    ("queue-retry-max", float, "longest wait between retries of a queued mail; default 1800"),
    ("queue-max-age", float, "seconds after its send time a queued mail fails; default 86400"),
    ("queue-lease", float, "seconds an attempt holds its mail before another may; default 60"),
    (
        "message-retention",
        float,
        "seconds records are kept after their last change; default 604800",
    ),
)


def _pick(arg: object, environ: Mapping[str, str], name: str) -> str | None:
    if arg is not None:
        return str(arg)
    value = environ.get(name)
    return value if value else None


def data_dir_and_secret(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[Path, Path | None]:
    data_dir = Path(_pick(args.data_dir, environ, "MAILSVC_DATA_DIR") or "data")
    secret_file = _pick(args.jwt_secret_file, environ, "MAILSVC_JWT_SECRET_FILE")
    return data_dir, Path(secret_file) if secret_file else None


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Build the serve configuration: flags win over their env twins, then the defaults."""
    data_dir, secret_file = data_dir_and_secret(args, environ)
    dev = args.dev if args.dev is not None else env_flag(environ.get("MAILSVC_DEV"))

    def number(arg: object, name: str, default: float) -> float:
        value = _pick(arg, environ, name)
        return float(value) if value else default

    def path(arg: object, name: str) -> Path | None:
        value = _pick(arg, environ, name)
        return Path(value) if value else None

    config = Config(
        listen=_pick(args.listen, environ, "MAILSVC_LISTEN") or Config.listen,
        data_dir=data_dir,
        default_from=_pick(args.default_from, environ, "MAILSVC_DEFAULT_FROM")
        or Config.default_from,
        jwt_secret_file=secret_file,
        mailgun_base_url=_pick(args.mailgun_base_url, environ, "MAILSVC_MAILGUN_BASE_URL"),
        dev=bool(dev),
        max_message_bytes=int(
            number(args.max_message_bytes, "MAILSVC_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)
        ),
        smtp_pool_size=int(number(args.smtp_pool_size, "MAILSVC_SMTP_POOL_SIZE", 4)),
        max_in_flight=max(1, int(number(args.max_in_flight, "MAILSVC_MAX_IN_FLIGHT", 256))),
        send_attempts=max(1, int(number(args.send_attempts, "MAILSVC_SEND_ATTEMPTS", 3))),
        send_timeout=number(args.send_timeout, "MAILSVC_SEND_TIMEOUT", 60.0),
        grace_seconds=number(args.shutdown_grace, "MAILSVC_SHUTDOWN_GRACE", 30.0),
        metrics_listen=_pick(args.metrics_listen, environ, "MAILSVC_METRICS_LISTEN") or "",
        log_format=_pick(args.log_format, environ, "MAILSVC_LOG_FORMAT") or "text",
        tls_cert=path(args.tls_cert, "MAILSVC_TLS_CERT"),
        tls_key=path(args.tls_key, "MAILSVC_TLS_KEY"),
        tls_client_ca=path(args.tls_client_ca, "MAILSVC_TLS_CLIENT_CA"),
        reload_interval=number(args.reload_interval, "MAILSVC_RELOAD_INTERVAL", 2.0),
        queue_workers=max(1, int(number(args.queue_workers, "MAILSVC_QUEUE_WORKERS", 16))),
        queue_retry_initial=number(args.queue_retry_initial, "MAILSVC_QUEUE_RETRY_INITIAL", 30.0),
        queue_retry_max=number(args.queue_retry_max, "MAILSVC_QUEUE_RETRY_MAX", 1800.0),
        queue_max_age=number(args.queue_max_age, "MAILSVC_QUEUE_MAX_AGE", 86400.0),
        queue_lease=number(args.queue_lease, "MAILSVC_QUEUE_LEASE", 60.0),
        message_retention=number(args.message_retention, "MAILSVC_MESSAGE_RETENTION", 604800.0),
    )
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"log format must be text or json, not {config.log_format!r}")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    return config
