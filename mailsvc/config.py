"""Server configuration: built once from flags and environment, then passed down.

Each option is defined once, as a field of Config: its type, default and help. From that come
the `--flag` (the field's name in kebab case unless `flag=` says otherwise), its env twin
`MAILSVC_<FLAG IN UPPER SNAKE>` and the parsing. Adding an option is one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MAX_MESSAGE_BYTES = 10 * 1024 * 1024
JWT_SECRET_FILE = "jwt-secret"  # in the data dir, when no --jwt-secret-file is given
OUTBOX_DIR = "outbox"  # in the data dir: dev mode's maildir


def meta(
    help: str,
    *,
    flag: str | None = None,
    common: bool = False,
    minimum: float | None = None,
    choices: tuple[str, ...] = (),
    shown_default: str | None = None,
) -> dict[str, Any]:
    """Makes a Config field a `serve` flag with an env twin.

    common: also a flag of `token`. minimum: smaller values are raised to it. shown_default:
    the default as the help shows it, when not the value itself.
    """
    return {
        "help": help,
        "flag": flag,
        "common": common,
        "minimum": minimum,
        "choices": choices,
        "shown_default": shown_default,
    }


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything `mailsvc serve` needs to know, fixed at start."""

    data_dir: Path = field(
        default=Path("data"), metadata=meta("data directory", common=True, shown_default="./data")
    )
    jwt_secret_file: Path | None = field(
        default=None,
        metadata=meta(
            "file holding the JWT secret", common=True, shown_default="<data-dir>/jwt-secret"
        ),
    )
    listen: str = field(default="127.0.0.1:50051", metadata=meta("address to listen on"))
    default_from: str = field(default="no-reply@localhost", metadata=meta("From of mail"))
    mailgun_base_url: str | None = field(
        default=None, metadata=meta("Mailgun API base URL", shown_default="from the region")
    )
    dev: bool = field(
        default=False, metadata=meta("dev mode: unsent mail goes to <data-dir>/outbox")
    )
    max_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metadata=meta("largest message accepted, in bytes", shown_default="10 MiB"),
    )
    max_request_memory: int = field(
        default=256 * 1024 * 1024,
        metadata=meta(
            "bytes all requests being handled may hold together; more are refused",
            shown_default="256 MiB",
            minimum=1,
        ),
    )
    smtp_pool_size: int = field(
        default=4, metadata=meta("reused SMTP connections per server; 0 = one per mail")
    )
    max_in_flight: int = field(
        default=256, metadata=meta("sends handed over at once; more wait", minimum=1)
    )
    send_attempts: int = field(
        default=3, metadata=meta("attempts per transport for transient failures", minimum=1)
    )
    send_timeout: float = field(
        default=60.0, metadata=meta("seconds a send may take when the caller sets no deadline")
    )
    metrics_listen: str = field(
        default="", metadata=meta("host:port for Prometheus /metrics", shown_default="empty = off")
    )
    webhook_listen: str = field(
        default="",
        metadata=meta(
            "host:port for Mailgun's delivery webhooks (POST /webhooks/mailgun, plain HTTP)",
            shown_default="empty = off",
        ),
    )
    log_format: str = field(
        default="text",
        metadata=meta("log lines as text or one JSON object each", choices=("text", "json")),
    )
    tls_cert: Path | None = field(default=None, metadata=meta("server certificate chain, PEM"))
    tls_key: Path | None = field(default=None, metadata=meta("server private key, PEM"))
    tls_client_ca: Path | None = field(
        default=None, metadata=meta("require client certificates signed by this CA, PEM")
    )
    reload_interval: float = field(
        default=2.0,
        metadata=meta("seconds between checks of settings.json for outside edits; 0 = never"),
    )
    grace_seconds: float = field(
        default=30.0,
        metadata=meta("seconds in-flight calls get to finish on SIGTERM", flag="shutdown-grace"),
    )
    queue_workers: int = field(
        default=16, metadata=meta("background delivery attempts in flight at once", minimum=1)
    )
    queue_retry_initial: float = field(
        default=30.0, metadata=meta("seconds before the first retry of a queued mail")
    )
    queue_retry_max: float = field(
        default=1800.0, metadata=meta("longest wait in seconds between retries of a queued mail")
    )
    queue_max_age: float = field(
        default=86400.0, metadata=meta("seconds after its send time a queued mail is failed")
    )
    queue_lease: float = field(
        default=60.0, metadata=meta("seconds an attempt holds its mail before another may take it")
    )
    idempotency_lease: float = field(
        default=30.0,
        metadata=meta(
            "seconds an idempotency key's reservation lasts unless renewed; after that a repeat "
            "may take over the key of a request whose replica died",
            minimum=0.1,
        ),
    )
    message_retention: float = field(
        default=604800.0, metadata=meta("seconds records are kept after their last change")
    )
    database_url: str = field(
        default="",
        repr=False,  # it may carry the database password
        metadata=meta(
            "postgresql:// URL of the database shared by replicas",
            shown_default="empty = embedded store in the data dir",
        ),
    )
    database_pool_size: int = field(
        default=10, metadata=meta("database connections per replica", minimum=2)
    )
    smtp_timeout: float = 30.0  # not a flag
    # gRPC transport limits (not flags): streams per connection, calls in flight overall,
    # keepalive pings, and how long an idle connection is kept.
    max_concurrent_streams: int = 1024
    max_concurrent_rpcs: int = 2048
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    max_connection_idle_seconds: float = 600.0

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / OUTBOX_DIR

    @property
    def secret_file(self) -> Path:
        return secret_file_of(self.data_dir, self.jwt_secret_file)


class ConfigError(Exception):
    """Flags or environment that cannot work together."""


def secret_file_of(data_dir: Path, jwt_secret_file: Path | None) -> Path:
    return jwt_secret_file or data_dir / JWT_SECRET_FILE


def env_flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class _Option:
    field: dataclasses.Field[Any]
    kind: type  # str, Path, int, float or bool (None stripped)

    @property
    def flag(self) -> str:
        return "--" + (self.field.metadata["flag"] or self.field.name.replace("_", "-"))

    @property
    def env(self) -> str:
        return "MAILSVC_" + self.flag[2:].replace("-", "_").upper()

    def help(self) -> str:
        shown = self.field.metadata["shown_default"]
        if shown is None:
            default = self.field.default
            shown = f"{default:g}" if isinstance(default, float) else str(default or "")
        env = f"{self.env}=1" if self.kind is bool else self.env
        text = f"{self.field.metadata['help']} (env {env}"
        return text + (f"; default {shown})" if shown and self.kind is not bool else ")")


def _options() -> Iterator[_Option]:
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if "help" not in f.metadata:
            continue
        kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)]
        yield _Option(f, kinds[0] if kinds else hints[f.name])


def _add(parser: argparse.ArgumentParser, opt: _Option) -> None:
    if opt.kind is bool:
        parser.add_argument(
            opt.flag, dest=opt.field.name, action="store_true", default=None, help=opt.help()
        )
        return
    parser.add_argument(
        opt.flag,
        dest=opt.field.name,
        type=_PARSE[opt.kind],
        metavar=opt.flag[2:].replace("-", "_").upper(),
        choices=opt.field.metadata["choices"] or None,
        help=opt.help(),
    )


_PARSE: dict[type, Callable[[str], Any]] = {int: int, float: float, str: str, Path: str}


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `token`: where the data and the JWT secret live."""
    for opt in _options():
        if opt.field.metadata["common"]:
            _add(parser, opt)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for opt in _options():
        _add(parser, opt)


def _value(opt: _Option, arg: object, environ: Mapping[str, str]) -> Any:
    """The flag, else its env twin, else the default; an empty value counts as unset."""
    if opt.kind is bool:
        return bool(arg) if arg is not None else env_flag(environ.get(opt.env))
    raw = str(arg) if arg is not None else environ.get(opt.env, "")
    if not raw:
        return opt.field.default
    value: Any = int(float(raw)) if opt.kind is int else opt.kind(raw)
    minimum = opt.field.metadata["minimum"]
    if minimum is not None:
        value = max(minimum, value)
    choices = opt.field.metadata["choices"]
    if choices and value not in choices:
        what = opt.field.name.replace("_", " ")
        raise ConfigError(f"{what} must be {' or '.join(choices)}, not {value!r}")
    return value


def data_dir_and_secret(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[Path, Path | None]:
    values = {
        opt.field.name: _value(opt, getattr(args, opt.field.name), environ)
        for opt in _options()
        if opt.field.metadata["common"]
    }
    return values["data_dir"], values["jwt_secret_file"]


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Build the serve configuration: flags win over their env twins, then the defaults."""
    config = Config(
        **{
            opt.field.name: _value(opt, getattr(args, opt.field.name), environ)
            for opt in _options()
        }
    )
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    return config
