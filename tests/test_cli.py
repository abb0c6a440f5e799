"""End-to-end tests of the command line: `mailsvc token` and `mailsvc health`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from tests.conftest import JWT_SECRET, SUPERADMIN, Server, auth, free_port
from tests.helpers import JWT_RE, clean_env, cli, get_settings

OTHER_SECRET = "file-secret-abcdefghijklmnopqrstuvwxyz0123"


def token_from(result: subprocess.CompletedProcess[str]) -> str:
    """The token a `mailsvc token` run printed: exactly one line, nothing else."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    token = lines[0]
    assert JWT_RE.fullmatch(token), result.stdout
    return token


def claims_of(token: str, secret: str = JWT_SECRET) -> dict[str, Any]:
    return jwt.decode(token, secret, algorithms=["HS256"])


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def spawn(server_factory: Callable[..., Server]) -> Callable[..., Server]:
    """Start a server on data_dir whose JWT secret comes from its own configuration only
    (data dir, flag or `env`), not from the MAILSVC_JWT_SECRET the other tests use."""

    def start(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> Server:
        return server_factory(*args, data_dir=data_dir, env=env, jwt_secret=None)

    return start


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "mailsvc"
    assert script.is_file()
    assert os.access(script, os.X_OK)
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("serve", "token", "health"):
        assert command in result.stdout


# --- mailsvc token ---------------------------------------------------------------------------


def test_token_with_data_dir_secret_is_accepted_by_the_server(
    tmp_path: Path, spawn: Callable[..., Server]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = token_from(cli("token", "--roles", "superadmin", "--data-dir", str(data_dir)))
    secret_file = data_dir / "jwt-secret"
    assert secret_file.is_file()
    assert mode_of(secret_file) == 0o600
    secret = secret_file.read_bytes()

    server = spawn(data_dir)
    assert secret_file.read_bytes() == secret
    get_settings(server, auth(token))
    # The server signs with the data dir's secret, not the one the other tests use.
    with pytest.raises(grpc.RpcError) as info:
        get_settings(server, SUPERADMIN)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_server_creates_secret_and_token_uses_it(
    tmp_path: Path, spawn: Callable[..., Server]
) -> None:
    data_dir = tmp_path / "data"
    server = spawn(data_dir)
    secret_file = data_dir / "jwt-secret"
    assert secret_file.is_file()
    assert mode_of(secret_file) == 0o600
    secret = secret_file.read_bytes()
    assert secret.strip()

    token = token_from(cli("token", "--roles", "superadmin", "--data-dir", str(data_dir)))
    assert secret_file.read_bytes() == secret
    get_settings(server, auth(token))


def test_secret_survives_restart(tmp_path: Path, spawn: Callable[..., Server]) -> None:
    data_dir = tmp_path / "data"
    first = spawn(data_dir)
    token = token_from(cli("token", "--roles", "superadmin", "--data-dir", str(data_dir)))
    assert first.stop() == 0
    second = spawn(data_dir)
    get_settings(second, auth(token))


@pytest.mark.parametrize("how", ["flag", "env"])
def test_token_with_jwt_secret_file(tmp_path: Path, spawn: Callable[..., Server], how: str) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(OTHER_SECRET)
    secret_file.chmod(0o600)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if how == "flag":
        args: list[str] = ["--jwt-secret-file", str(secret_file)]
        env = clean_env()
    else:
        args = []
        env = clean_env(MAILSVC_JWT_SECRET_FILE=str(secret_file))
    result = cli("token", "--roles", "superadmin", "--data-dir", str(data_dir), *args, env=env)
    token = token_from(result)
    assert "superadmin" in claims_of(token, OTHER_SECRET)["roles"]

    server = spawn(data_dir, *args, env=env)
    get_settings(server, auth(token))


def test_env_secret_wins(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(OTHER_SECRET)
    secret_file.chmod(0o600)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    result = cli(
        "token",
        "--roles",
        "superadmin",
        "--data-dir",
        str(data_dir),
        "--jwt-secret-file",
        str(secret_file),
        env=clean_env(MAILSVC_JWT_SECRET=JWT_SECRET),
    )
    token = token_from(result)
    assert claims_of(token, JWT_SECRET)["roles"] == ["superadmin"]
    with pytest.raises(jwt.InvalidSignatureError):
        claims_of(token, OTHER_SECRET)


def test_token_with_env_secret_is_accepted(server: Server) -> None:
    result = cli("token", "--roles", "superadmin", env=clean_env(MAILSVC_JWT_SECRET=JWT_SECRET))
    token = token_from(result)
    assert claims_of(token)["roles"] == ["superadmin"]
    get_settings(server, auth(token))


def test_token_ttl_sets_exp() -> None:
    before = int(time.time())
    result = cli(
        "token", "--roles", "admin", "--ttl", "600", env=clean_env(MAILSVC_JWT_SECRET=JWT_SECRET)
    )
    after = int(time.time())
    claims = claims_of(token_from(result))
    assert before + 600 - 1 <= claims["exp"] <= after + 600 + 1


def test_token_sub_and_roles() -> None:
    result = cli(
        "token",
        "--roles",
        "admin,mailer",
        "--roles",
        "ops",
        "--sub",
        "alice",
        env=clean_env(MAILSVC_JWT_SECRET=JWT_SECRET),
    )
    claims = claims_of(token_from(result))
    assert claims["sub"] == "alice"
    assert sorted(claims["roles"]) == ["admin", "mailer", "ops"]


# --- mailsvc health --------------------------------------------------------------------------


@pytest.mark.parametrize("service", [None, "mailsvc.v1.MailService", "mailsvc.v1.SettingsService"])
def test_health_of_serving_server_exits_zero(server: Server, service: str | None) -> None:
    args = ["health", "--server", server.address]
    if service is not None:
        args += ["--service", service]
    result = cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_health_of_unknown_service_exits_non_zero(server: Server) -> None:
    result = cli("health", "--server", server.address, "--service", "nope.v1.Nothing")
    assert result.returncode != 0


def test_health_of_closed_port_exits_non_zero() -> None:
    started = time.monotonic()
    result = cli("health", "--server", f"127.0.0.1:{free_port()}")
    assert result.returncode != 0
    assert time.monotonic() - started < 30
