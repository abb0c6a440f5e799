"""Templates that try to eat memory, CPU or the event loop: bounded, refused by name, fast.

Each hostile template is stored and rendered through the real server. Over a bound the
answer is INVALID_ARGUMENT naming the template field: when the settings are saved if the
template alone goes over it, else when it is rendered. The server stays up and keeps
answering health checks meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import SUPERADMIN, Server, details, start_server

RCPT = "rcpt@example.com"
FIELD = "settings.templates.evil.text"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("hardening") / "data")
    yield server
    server.stop()


def template(text: str, **model: str) -> settings_pb2.MailTemplate:
    return settings_pb2.MailTemplate(to=[RCPT], subject="s", text=text, model=model)


def update(server: Server, templates: dict[str, settings_pb2.MailTemplate]) -> Any:
    """Store these templates; the RpcError when refused, else None."""
    request = settings_pb2.UpdateMailSettingsRequest(
        settings=settings_pb2.MailSettings(templates=templates)
    )
    try:
        server.settings.UpdateMailSettings(request, metadata=SUPERADMIN, timeout=30)
    except grpc.RpcError as err:
        return err
    return None


def render(server: Server, name: str, timeout: float = 30, **params: Any) -> Any:
    """The rendered mail, or the RpcError."""
    parameters = struct_pb2.Struct()
    parameters.update(params)
    request = mail_pb2.RenderTemplateRequest(template_name=name, parameters=parameters)
    try:
        return server.mail.RenderTemplate(request, metadata=SUPERADMIN, timeout=timeout)
    except grpc.RpcError as err:
        return err


def assert_names(err: Any, field: str) -> None:
    assert isinstance(err, grpc.RpcError), f"not refused: {err}"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code()}: {err.details()}"
    assert field in details(err)["violations"], details(err)


# (template text, its model, parameters, where it is refused)
HOSTILE = [
    pytest.param("{{ range(100000)|join('a' * 100000) }}", {}, {}, "render", id="join"),
    pytest.param("{{ 'x'|center(500000000) }}", {}, {}, "save", id="center-const"),
    pytest.param("{{ s|center(500000000) }}", {"s": "string"}, {"s": "x"}, "render", id="center"),
    pytest.param("{{ s|center(5e8) }}", {"s": "string"}, {"s": "x"}, "render", id="center-float"),
    pytest.param("{{ 'x'|indent(500000000) }}", {}, {}, "save", id="indent-const"),
    pytest.param("{{ s|indent(n) }}", {"s": "string", "n": "integer"}, {"s": "a\nb", "n": 5e8},
                 "render", id="indent"),
    pytest.param("{{ '%500000000d'|format(1) }}", {}, {}, "save", id="percent-format-filter"),
    pytest.param("{{ '%*d' % (n, 1) }}", {"n": "integer"}, {"n": 5e8}, "render", id="percent-star"),
    pytest.param("{{ '{:>500000000}'.format(s) }}", {"s": "string"}, {"s": "x"}, "save",
                 id="str-format"),
    pytest.param("{{ f.format(s) }}", {"f": "string", "s": "string"},
                 {"f": "{:>500000000}", "s": "x"}, "render", id="str-format-param"),
    pytest.param("{{ s.center(500000000) }}", {"s": "string"}, {"s": "x"}, "render",
                 id="str-center"),
    pytest.param("{{ (s * 900000)|replace('x', 'xxxx') }}", {"s": "string"}, {"s": "x"},
                 "render", id="replace"),
    pytest.param("{{ (s * 900000)|wordwrap(1) }}", {"s": "string"}, {"s": "x "}, "render",
                 id="wordwrap"),
    pytest.param("{{ (s * 900000) ~ (s * 900000) }}", {"s": "string"}, {"s": "x"}, "render",
                 id="concat"),
    pytest.param(
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}{{ s * 900000 }}"
        "{% endif %}{% endmacro %}{{ f(30)|length }}",
        {"s": "string"}, {"s": "x"}, "render", id="macro-doubling",
    ),
    pytest.param(
        "{% filter length %}{% for i in range(100000) %}{{ s * 900000 }}{% endfor %}"
        "{% endfilter %}",
        {"s": "string"}, {"s": "x"}, "render", id="filter-block",
    ),
    pytest.param(
        "{% for i in range(100000) %}{{ (s * 40000)|wordwrap(3)|length }}{% endfor %}",
        {"s": "string"}, {"s": "x "}, "render", id="cpu-time",
    ),
    pytest.param("{{ " + "(" * 300 + "1" + ")" * 300 + " }}", {}, {}, "save", id="parens"),
    pytest.param("{% if 1 %}" * 500 + "x" + "{% endif %}" * 500, {}, {}, "save", id="ifs"),
    pytest.param("{% for i in range(1) %}" * 200 + "x" + "{% endfor %}" * 200, {}, {}, "save",
                 id="fors"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "model", "params", "where"), HOSTILE)
def test_hostile_template_is_bounded_and_named(
    server: Server, text: str, model: dict[str, str], params: dict[str, Any], where: str
) -> None:
    assert update(server, {"ok": template("fine")}) is None
    started = time.monotonic()
    refused = update(server, {"ok": template("fine"), "evil": template(text, **model)})
    if where == "save":
        assert_names(refused, FIELD)
    else:
        assert refused is None, f"{refused.code()}: {refused.details()}"
        assert_names(render(server, "evil", **params), FIELD)
    # Bounded in time as well: the render deadline is 1 s, compiling a field 2 s.
    assert time.monotonic() - started < 15
    assert server.proc.poll() is None
    assert render(server, "ok").text == "fine"


def test_within_bounds_still_renders(server: Server) -> None:
    text = (
        "{{ s|center(9) }}|{{ '%05d' % n }}|{{ '{:>4}'.format(n) }}|{{ [s, s]|join('-') }}|"
        "{{ s ~ '!' }}|{{ 'a b'|replace(' ', '_') }}|{{ 'x'|indent(2) }}|{{ s.ljust(3) }}|"
        "{{ (s * 3)|wordwrap(2) }}"
    )
    assert update(server, {"fine": template(text, s="string", n="integer")}) is None
    rendered = render(server, "fine", s="ab", n=42)
    assert rendered.text == "    ab   |00042|  42|ab-ab|ab!|a_b|x|ab |ab\nab\nab"


def test_template_source_over_256_kib_is_refused(server: Server) -> None:
    big = template("{{ n }}" * 40000, n="integer")  # 280,000 bytes
    err = update(server, {"big": big})
    assert_names(err, "settings.templates.big")
    # Several strings of one template count together.
    split = settings_pb2.MailTemplate(
        to=[RCPT], subject="x" * 140_000, text="y" * 140_000, html="<p>ok</p>"
    )
    assert_names(update(server, {"split": split}), "settings.templates.split")


def test_settings_over_4_mib_are_refused(server: Server) -> None:
    templates = {f"t{i}": template("x" * 250_000) for i in range(17)}
    assert_names(update(server, templates), "settings")


def test_huge_template_does_not_grow_the_server(server: Server) -> None:
    """The 9.8 MB template of the report: refused by size, before anything compiles it."""
    started = time.monotonic()
    err = update(server, {"huge": template("{{ n }}" * 1_400_000, n="integer")})
    assert_names(err, "settings.templates.huge")
    assert time.monotonic() - started < 10
    rss_kb = _rss_kb(server)
    assert rss_kb < 400_000, f"server RSS {rss_kb} kB"


def _rss_kb(server: Server) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1])


def test_health_answers_while_hostile_renders_run(tmp_path: Path) -> None:
    """Renders run off the event loop: health checks answer meanwhile."""
    server = start_server(tmp_path / "data")
    try:
        slow = template(
            "{% for i in range(40) %}{{ (s * 33000)|wordwrap(5)|length }}{% endfor %}",
            s="string",
        )
        assert update(server, {"slow": slow}) is None
        renders = 6
        with concurrent.futures.ThreadPoolExecutor(renders) as pool:
            futures = [pool.submit(render, server, "slow", 60, s="xy ") for _ in range(renders)]
            time.sleep(0.2)  # let the renders start
            latencies = []
            while not all(f.done() for f in futures):
                started = time.monotonic()
                reply = server.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                latencies.append(time.monotonic() - started)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                time.sleep(0.05)
            results = [f.result() for f in futures]
        assert len(latencies) >= 5, "the renders ended before health was measured"
        print(f"health checks: {len(latencies)}, max {max(latencies) * 1000:.1f} ms")
        assert max(latencies) < 0.5, f"health took {max(latencies):.3f} s"
        for result in results:  # each rendered, or stopped by the render deadline
            if isinstance(result, grpc.RpcError):
                assert_names(result, "settings.templates.slow.text")
    finally:
        server.stop()
