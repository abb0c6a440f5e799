"""Settings writes and loads that must not go wrong: bad masks, planted temporary files,
deeply nested templates in a hand edit, cancelled updates, and recompiling only changes."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format
from mailsvc.v1 import settings_pb2

from tests.conftest import JWT_SECRET, SUPERADMIN, Server, details, free_port

ServerFactory = Callable[..., Server]
RCPT = "rcpt@example.com"
DEEP = "{% if 1 %}" * 500 + "x" + "{% endif %}" * 500


def template(text: str) -> settings_pb2.MailTemplate:
    return settings_pb2.MailTemplate(to=[RCPT], subject="s", text=text)


def current(server: Server) -> settings_pb2.MailSettings:
    reply: settings_pb2.MailSettings = server.settings.GetMailSettings(
        settings_pb2.GetMailSettingsRequest(), metadata=SUPERADMIN, timeout=5
    )
    return reply


def file_etag(server: Server) -> str:
    return hashlib.sha256((server.data_dir / "settings.json").read_bytes()).hexdigest()[:16]


def write_settings(path: Path, settings: settings_pb2.MailSettings) -> None:
    tmp = path.with_suffix(".edit")
    tmp.write_text(json_format.MessageToJson(settings))
    tmp.replace(path)


def wait_until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_mask_with_an_empty_template_name_is_refused(server: Server) -> None:
    server.put_settings(settings_pb2.MailSettings(templates={"a": template("A")}))
    for path in ("templates.", "smtp.", "smtp..host"):
        request = settings_pb2.UpdateMailSettingsRequest(
            settings=settings_pb2.MailSettings(),
            update_mask=field_mask_pb2.FieldMask(paths=[path]),
        )
        with pytest.raises(grpc.RpcError) as refused:
            server.settings.UpdateMailSettings(request, metadata=SUPERADMIN, timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert "update_mask" in details(refused.value)["violations"], path
    assert list(current(server).templates) == ["a"]


def test_planted_symlink_at_the_temporary_name_is_not_followed(
    server: Server, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    planted = server.data_dir / f".settings.json.{server.proc.pid}.tmp"
    planted.symlink_to(victim)

    server.put_settings(settings_pb2.MailSettings(default_from="ops@example.com"))

    assert victim.read_text() == "original"
    settings_file = server.data_dir / "settings.json"
    assert not settings_file.is_symlink()
    assert "ops@example.com" in settings_file.read_text()
    assert current(server).etag == file_etag(server)


def test_cancelled_update_leaves_file_and_memory_in_step(server_factory: ServerFactory) -> None:
    server = server_factory()
    before = server.put_settings(settings_pb2.MailSettings(default_from="old@example.com"))
    lock = os.open(server.data_dir / ".settings.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the server's write waits for this lock
        request = settings_pb2.UpdateMailSettingsRequest(
            settings=settings_pb2.MailSettings(default_from="new@example.com")
        )
        with pytest.raises(grpc.RpcError) as failed:
            server.settings.UpdateMailSettings(request, metadata=SUPERADMIN, timeout=0.5)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: "UpdateMailSettings caller=root code=CANCELLED" in server.logs())
    finally:
        os.close(lock)  # releases the lock: the server's write goes on, or gives up
    lock = os.open(server.data_dir / ".settings.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the server's write is over
    os.close(lock)

    wait_until(lambda: current(server).etag == file_etag(server), timeout=5)
    # The failed update was not written (or, had it been, it would be live in memory too).
    assert current(server).default_from == "old@example.com"
    assert current(server).etag == before.etag
    server.stop()
    restarted = server_factory()
    assert current(restarted).default_from == "old@example.com"


def test_deep_nesting_in_a_hand_edit_is_ignored_and_reload_goes_on(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--reload-interval", "0.2")
    path = server.data_dir / "settings.json"
    server.put_settings(settings_pb2.MailSettings(default_from="first@example.com"))
    write_settings(path, settings_pb2.MailSettings(templates={"deep": template(DEEP)}))
    wait_until(lambda: "settings file edit ignored" in server.logs())
    assert current(server).default_from == "first@example.com"

    write_settings(path, settings_pb2.MailSettings(default_from="later@example.com"))
    wait_until(lambda: current(server).default_from == "later@example.com")
    assert server.logs().count("settings file edit ignored") == 1
    assert "nested" in server.logs()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{{ " + "(" * 300 + "1" + ")" * 300 + " }}", id="parens"),
        pytest.param(DEEP, id="ifs"),
        pytest.param("{% for i in range(1) %}" * 200 + "x" + "{% endfor %}" * 200, id="fors"),
    ],
)
def test_deep_nesting_at_start_exits_2_naming_the_file(tmp_path: Path, text: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "settings.json"
    write_settings(path, settings_pb2.MailSettings(templates={"deep": template(text)}))
    command = [sys.executable, "-m", "mailsvc", "serve", "--data-dir", str(data_dir)]
    command += ["--listen", f"127.0.0.1:{free_port()}"]
    env = {"PATH": os.environ["PATH"], "MAILSVC_JWT_SECRET": JWT_SECRET}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(path) in result.stderr
    assert "settings.templates.deep.text" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) <= 5, result.stderr[-2000:]


def test_a_write_compiles_only_the_templates_it_changes(tmp_path: Path) -> None:
    from mailsvc.settings import apply_update
    from mailsvc.store import SettingsStore
    from mailsvc.templates import TemplateEngine

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    templates = {f"t{i}": template(f"Hello {i} {{{{ 1 + 1 }}}}") for i in range(50)}
    (data_dir / "settings.json").write_text(
        json_format.MessageToJson(settings_pb2.MailSettings(templates=templates))
    )
    engine = TemplateEngine()
    store = SettingsStore(data_dir, engine)
    after_load = engine.compilations
    assert after_load == 50 * 5  # from_address, to[0], subject, text, html

    change = settings_pb2.MailSettings(templates={"t7": template("changed {{ 2 }}")})
    mask = field_mask_pb2.FieldMask(paths=["templates.t7"])
    snapshot = asyncio.run(store.update(lambda cur: apply_update(cur, change, mask)))

    assert snapshot.templates["t7"].render({}).text == "changed 2"
    assert engine.compilations == after_load + 5
    # An unmasked write of the same settings compiles nothing new.
    asyncio.run(store.update(lambda cur: cur))
    assert engine.compilations == after_load + 5
