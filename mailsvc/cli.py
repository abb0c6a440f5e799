"""Command line: `mailsvc serve`, `token`, `dkim-record`, and the client commands of client_cli."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from mailsvc import client_cli
from mailsvc.config import (
    add_common_flags,
    add_serve_flags,
    config_from,
    data_dir_and_secret,
    secret_file_of,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailsvc", description="gRPC mail service")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    add_serve_flags(serve)

    token = sub.add_parser("token", help="print a signed JWT for a caller")
    add_common_flags(token)
    token.add_argument(
        "--roles",
        action="append",
        required=True,
        help="comma-separated roles (repeatable), e.g. superadmin",
    )
    token.add_argument("--sub", default="operator", help="the caller's name (default operator)")
    token.add_argument("--ttl", type=int, help="seconds until the token expires (default never)")

    move = sub.add_parser(
        "migrate-to-database",
        help="copy the data dir's settings, ACL and suppressions into --database-url",
    )
    move.add_argument("--data-dir", help="data directory (env MAILSVC_DATA_DIR; default ./data)")
    move.add_argument(
        "--database-url", help="postgresql:// URL (env MAILSVC_DATABASE_URL)", metavar="URL"
    )
    move.add_argument(
        "--force", action="store_true", help="overwrite settings the database already holds"
    )

    record = sub.add_parser(
        "dkim-record",
        help="print the DNS TXT record (name, then value) publishing a DKIM key's public half",
    )
    record.add_argument("--domain", required=True, help="the signing domain (d=)")
    record.add_argument("--selector", required=True, help="the selector (s=)")
    record.add_argument(
        "--key-file", required=True, help="the PEM private key (RSA or Ed25519), unencrypted"
    )

    client_cli.add_commands(sub)  # settings get|put, send, render, health
    return parser


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import uvloop

    from mailsvc import logs
    from mailsvc.config import ConfigError
    from mailsvc.server import ListenError, serve
    from mailsvc.storage.base import StorageOpenError
    from mailsvc.store import SettingsFileError

    try:
        config = config_from(args, environ)
    except (ConfigError, ValueError) as exc:
        print(f"mailsvc: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_format)
    os.umask(0o077)  # everything we write (settings, keys, outbox) is for our user only
    try:
        # uvloop: a faster event loop, measured in `make bench` (see README, Benchmark).
        uvloop.run(serve(config, environ))
    except (SettingsFileError, ListenError, StorageOpenError) as exc:
        print(f"mailsvc: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.auth import load_secret, mint_token

    data_dir, secret_file = data_dir_and_secret(args, environ)
    secret = load_secret(environ, secret_file_of(data_dir, secret_file))
    roles = [r.strip() for group in args.roles for r in group.split(",") if r.strip()]
    print(mint_token(secret, roles, args.sub, ttl=args.ttl))
    return 0


def _migrate(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import asyncio
    from pathlib import Path

    from mailsvc.migrate import NotEmpty, copy_to_database
    from mailsvc.storage.base import StorageError
    from mailsvc.store import SettingsFileError

    data_dir = Path(args.data_dir or environ.get("MAILSVC_DATA_DIR") or "data")
    url = args.database_url or environ.get("MAILSVC_DATABASE_URL", "")
    if not url:
        print("mailsvc: --database-url (or MAILSVC_DATABASE_URL) is required", file=sys.stderr)
        return 2
    try:
        copied = asyncio.run(copy_to_database(data_dir, url, force=args.force))
    except NotEmpty as exc:
        print(f"mailsvc: {exc}", file=sys.stderr)
        return 1
    except (SettingsFileError, StorageError) as exc:
        print(f"mailsvc: cannot copy: {exc}", file=sys.stderr)
        return 2
    print(
        f"copied the settings, the settings ACL and {copied.suppressions} suppressions "
        f"from {data_dir} to PostgreSQL at {copied.where}"
    )
    if copied.pending_left:
        print(
            f"warning: {copied.pending_left} queued or scheduled mails stay in {data_dir}: "
            "start the embedded server again until they are sent, then switch",
            file=sys.stderr,
        )
    return 0


def _dkim_record(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Offline: the record to publish for a key file; the key itself is never printed."""
    from mailsvc.addresses import is_host_name
    from mailsvc.dkim import DkimKeyError, dns_txt_record

    for name in ("domain", "selector"):
        value = getattr(args, name)
        if not (value.isascii() and is_host_name(value)):
            print(
                f"mailsvc: --{name} must be a DNS name (IDNs in their xn-- form)", file=sys.stderr
            )
            return 2
    try:
        with open(args.key_file, "rb") as f:
            pem = f.read()
    except OSError as exc:
        print(f"mailsvc: cannot read {args.key_file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        name, value = dns_txt_record(args.selector, args.domain, pem)
    except DkimKeyError as exc:
        print(f"mailsvc: {args.key_file}: {exc}", file=sys.stderr)
        return 2
    print(name)
    print(value)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = dict(os.environ)
    commands = {
        "serve": _serve,
        "token": _token,
        "dkim-record": _dkim_record,
        "migrate-to-database": _migrate,
    }
    if args.command in commands:
        return commands[args.command](args, environ)
    return client_cli.run(args, environ)
