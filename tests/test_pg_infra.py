"""The test PostgreSQL itself (tests/pg.py): it starts from the wheel in seconds, never as
root, gives each test an empty database, and never outlives the process that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests import pg


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_the_server_never_runs_as_root(pg_server: pg.PgServer) -> None:
    assert pg_server.proc is not None
    uid = _uid(pg_server.proc.pid)
    assert uid != 0
    if os.geteuid() == 0:
        assert uid == pg.NOBODY
    assert (
        pg_server.psql("SELECT current_setting('server_version_num')::int >= 180000").strip() == "t"
    )


def test_each_test_gets_an_empty_database(pg_url: str, pg_server: pg.PgServer) -> None:
    name = pg_url.rsplit("/", 1)[1]
    tables = pg_server.psql(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", database=name
    )
    assert tables.strip() == "0"
    assert pg_server.create_database() != pg_url


def test_a_server_starts_in_seconds_and_stops_cleanly() -> None:
    started = time.monotonic()
    server = pg.start_session_server()
    try:
        assert time.monotonic() - started < 20
        assert server.proc is not None
        pid = server.proc.pid
        assert server.psql("SELECT 1").strip() == "1"
    finally:
        pg.remove(server)
    assert not _alive(pid)
    assert not server.base.exists()


STARTER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from tests import pg
    server = pg.start_session_server()
    print(server.proc.pid, server.base, flush=True)
    time.sleep(3600)
    """
)


def test_the_server_stops_when_its_test_process_is_killed() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", STARTER, root], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    pid_text, base = proc.stdout.readline().split()
    pid = int(pid_text)
    try:
        assert _alive(pid)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, 9)
        subprocess.run(["rm", "-rf", base], check=False)
