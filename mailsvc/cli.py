"""Command line: `mailsvc serve`, `mailsvc token`, `mailsvc health`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

from mailsvc.config import add_common_flags, add_serve_flags, config_from, data_dir_and_secret


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

    health = sub.add_parser("health", help="exit 0 when the server reports SERVING")
    health.add_argument("--server", help="host:port (env MAILSVC_SERVER; default from --listen)")
    health.add_argument("--service", default="", help="service name; empty = overall")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    return parser


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc import logs
    from mailsvc.config import ConfigError
    from mailsvc.server import ListenError, serve
    from mailsvc.store import SettingsFileError

    try:
        config = config_from(args, environ)
    except (ConfigError, ValueError) as exc:
        print(f"mailsvc: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_format)
    os.umask(0o077)  # everything we write (settings, keys, outbox) is for our user only
    try:
        asyncio.run(serve(config, environ))
    except (SettingsFileError, ListenError) as exc:
        print(f"mailsvc: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.auth import load_secret, mint_token

    data_dir, secret_file = data_dir_and_secret(args, environ)
    secret = load_secret(environ, secret_file or data_dir / "jwt-secret")
    roles = [r.strip() for group in args.roles for r in group.split(",") if r.strip()]
    print(mint_token(secret, roles, args.sub, ttl=args.ttl))
    return 0


def _health(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.server or environ.get("MAILSVC_SERVER")
    if not target:
        listen = environ.get("MAILSVC_LISTEN") or "127.0.0.1:50051"
        host, _, port = listen.rpartition(":")
        target = f"{'127.0.0.1' if host in ('0.0.0.0', '', '[::]') else host}:{port}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = dict(os.environ)
    commands = {"serve": _serve, "token": _token, "health": _health}
    return commands[args.command](args, environ)
