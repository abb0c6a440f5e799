"""Config parsing: a flag wins over its env twin, which wins over the default."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from mailsvc.config import Config, ConfigError, add_serve_flags, config_from, data_dir_and_secret


def parse(*flags: str, **environ: str) -> Config:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    return config_from(parser.parse_args(list(flags)), environ)


def test_defaults() -> None:
    assert parse() == Config()
    config = parse()
    assert config.listen == "127.0.0.1:50051"
    assert config.data_dir == Path("data")
    assert config.default_from == "no-reply@localhost"
    assert config.jwt_secret_file is None
    assert config.secret_file == Path("data/jwt-secret")
    assert config.outbox_dir == Path("data/outbox")
    assert config.mailgun_base_url is None
    assert config.dev is False
    assert config.max_message_bytes == 10 * 1024 * 1024
    assert (config.smtp_pool_size, config.max_in_flight, config.send_attempts) == (4, 256, 3)
    assert (config.send_timeout, config.grace_seconds, config.reload_interval) == (60, 30, 2)
    assert (config.metrics_listen, config.log_format) == ("", "text")
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (None, None, None)


# (flag, env name, value given, the Config field and the value it must get)
OPTIONS = [
    ("--listen", "MAILSVC_LISTEN", "0.0.0.0:1", "listen", "0.0.0.0:1"),
    ("--data-dir", "MAILSVC_DATA_DIR", "/srv/d", "data_dir", Path("/srv/d")),
    ("--default-from", "MAILSVC_DEFAULT_FROM", "a@b.c", "default_from", "a@b.c"),
    ("--jwt-secret-file", "MAILSVC_JWT_SECRET_FILE", "/s", "jwt_secret_file", Path("/s")),
    ("--mailgun-base-url", "MAILSVC_MAILGUN_BASE_URL", "http://x", "mailgun_base_url", "http://x"),
    ("--max-message-bytes", "MAILSVC_MAX_MESSAGE_BYTES", "2000", "max_message_bytes", 2000),
    ("--smtp-pool-size", "MAILSVC_SMTP_POOL_SIZE", "0", "smtp_pool_size", 0),
    ("--max-in-flight", "MAILSVC_MAX_IN_FLIGHT", "7", "max_in_flight", 7),
    ("--send-attempts", "MAILSVC_SEND_ATTEMPTS", "5", "send_attempts", 5),
    ("--send-timeout", "MAILSVC_SEND_TIMEOUT", "1.5", "send_timeout", 1.5),
    ("--metrics-listen", "MAILSVC_METRICS_LISTEN", ":9090", "metrics_listen", ":9090"),
    ("--log-format", "MAILSVC_LOG_FORMAT", "json", "log_format", "json"),
    ("--reload-interval", "MAILSVC_RELOAD_INTERVAL", "0", "reload_interval", 0.0),
    ("--shutdown-grace", "MAILSVC_SHUTDOWN_GRACE", "4", "grace_seconds", 4.0),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "env", "given", "name", "expected"), OPTIONS)
def test_flag_and_env_twin(flag: str, env: str, given: str, name: str, expected: object) -> None:
    assert getattr(parse(flag, given), name) == expected
    assert getattr(parse(**{env: given}), name) == expected


@pytest.mark.parametrize(("flag", "env", "given", "name", "expected"), OPTIONS)
def test_flag_wins_over_env_and_empty_env_is_unset(
    flag: str, env: str, given: str, name: str, expected: object
) -> None:
    default = getattr(Config(), name)
    assert getattr(parse(**{env: ""}), name) == default
    other = "text" if name == "log_format" else "9"
    assert getattr(parse(flag, given, **{env: other}), name) == expected


def test_dev_flag_and_env() -> None:
    assert parse("--dev").dev is True
    for value in ("1", "true", "YES", "on"):
        assert parse(MAILSVC_DEV=value).dev is True
    for value in ("", "0", "no", "off"):
        assert parse(MAILSVC_DEV=value).dev is False


def test_minimums_and_choices() -> None:
    assert parse("--max-in-flight", "0").max_in_flight == 1
    assert parse(MAILSVC_SEND_ATTEMPTS="-3").send_attempts == 1
    assert parse(MAILSVC_MAX_MESSAGE_BYTES="1e6").max_message_bytes == 1_000_000
    with pytest.raises(ConfigError, match="log format must be text or json"):
        parse(MAILSVC_LOG_FORMAT="xml")
    with pytest.raises(ValueError):
        parse(MAILSVC_SEND_TIMEOUT="soon")


def test_tls_flags_go_together() -> None:
    with pytest.raises(ConfigError, match="--tls-key"):
        parse("--tls-cert", "c.pem")
    with pytest.raises(ConfigError, match="--tls-client-ca"):
        parse(MAILSVC_TLS_CLIENT_CA="ca.pem")
    config = parse("--tls-cert", "c.pem", MAILSVC_TLS_KEY="k.pem")
    assert (config.tls_cert, config.tls_key) == (Path("c.pem"), Path("k.pem"))


def test_every_option_has_a_flag_and_an_env_twin() -> None:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    options = [f for f in dataclasses.fields(Config) if f.metadata]
    assert {f.name for f in options} == set(flags) - {"help"}
    for f in options:
        assert "(env MAILSVC_" in (flags[f.name].help or "")


def test_data_dir_and_secret_of_the_token_command() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir")
    parser.add_argument("--jwt-secret-file")
    args = parser.parse_args([])
    assert data_dir_and_secret(args, {}) == (Path("data"), None)
    assert data_dir_and_secret(args, {"MAILSVC_JWT_SECRET_FILE": "/s"}) == (
        Path("data"),
        Path("/s"),
    )
