"""render_async: small renders stay on the event loop; big or slow ones move to the worker."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import pytest
from mailsvc.v1.settings_pb2 import MailTemplate

from mailsvc.errors import InvalidArgument
from mailsvc.templates import LOOP_VALUE_CHARS, CompiledTemplate, TemplateEngine


class CountingExecutor(Executor):
    """A real thread pool that counts what it is given."""

    def __init__(self) -> None:
        self.submitted = 0
        self._pool = ThreadPoolExecutor(max_workers=1)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


def compiled(text: str, **model: str) -> tuple[CompiledTemplate, CountingExecutor]:
    template = MailTemplate(to=["a@example.com"], subject="s", text=text, model=model)
    result, violations = TemplateEngine().compile("t", template, "settings.templates.t")
    assert result is not None, violations
    executor = CountingExecutor()
    return dataclasses.replace(result, executor=executor), executor


def test_small_render_stays_on_the_loop() -> None:
    template, executor = compiled("Hi {{ name }}, {{ n * 2 }} new", name="string", n="integer")
    rendered = asyncio.run(template.render_async({"name": "Alice", "n": 3}))
    assert rendered.text == "Hi Alice, 6 new"
    assert executor.submitted == 0


def test_big_value_renders_on_the_worker_with_the_same_result() -> None:
    template, executor = compiled("{{ s|upper }}", s="string")
    big = "x" * (LOOP_VALUE_CHARS + 1)
    rendered = asyncio.run(template.render_async({"s": big}))
    assert rendered.text == big.upper() == template.render({"s": big}).text
    assert executor.submitted == 1


def test_slow_render_moves_to_the_worker_and_completes() -> None:
    # 100,000 loop steps: far over the loop's 2 ms, well within the full 1 s.
    template, executor = compiled("{% for i in range(100000) %}{% endfor %}done")
    assert asyncio.run(template.render_async({})).text == "done"
    assert executor.submitted == 1


@pytest.mark.parametrize(
    "text",
    [
        "{{ (s * 900000) ~ (s * 900000) }}",  # over the limit at once, on the loop
        "{{ (s * 3000) ~ (s * 900000) ~ (s * 900000) }}",  # too big for the loop first
    ],
)
def test_limits_apply_on_the_loop_and_after_the_move(text: str) -> None:
    template, _ = compiled(text, s="string")
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(template.render_async({"s": "x"}))
    with pytest.raises(InvalidArgument) as direct:
        template.render({"s": "x"})
    assert caught.value.violations == direct.value.violations
    assert caught.value.violations[0].field == "settings.templates.t.text"


def test_parameter_errors_need_no_worker() -> None:
    template, executor = compiled("{{ n }}", n="integer")
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(template.render_async({"n": "three"}))
    assert caught.value.violations[0].field == "parameters.n"
    assert executor.submitted == 0


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("", ""),
        ("plain text\n", "plain text"),  # Jinja drops one trailing newline
        ("two\n\n", "two\n"),
        ("{% raw %}{{ x }}{% endraw %}", "{{ x }}"),
        ("a {# note #}b", "a b"),
    ],
)
def test_fields_without_expressions_render_as_jinja_renders_them(
    source: str, expected: str
) -> None:
    template, _ = compiled(source)
    assert template.render({}).text == expected
    assert asyncio.run(template.render_async({})).text == expected
