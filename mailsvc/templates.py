"""Sandboxed Jinja2 templates: checked and compiled once per content, typed parameters, bounded.

Every string, list and mapping a template builds is bounded (MAX_VALUE_CHARS), not only the
output: the sandbox's call/binop hooks, the str.format formatter, every filter, `~` and the
output writes check sizes before (or right after) building, and every such hook checks the
render's deadline. Jinja's constant folding runs filters at save time; the same guards apply
there, and a limit hit while folding refuses the template when it is saved.

A render first runs on the event loop with a small budget (LOOP_RENDER_SECONDS, values of at
most LOOP_VALUE_CHARS): most renders take well under a millisecond, and a hop to the worker
thread costs more than that. When that budget runs out, the same render starts again on the
worker thread with the full bounds; rendering has no side effects, so only time is lost.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import operator
import re
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from string import Formatter
from typing import Any, NoReturn

from jinja2 import (
    StrictUndefined,
    TemplateSyntaxError,
    meta,
    nodes,
    pass_context,
    pass_eval_context,
)
from jinja2 import Template as JinjaTemplate
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.nodes import EvalContext
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import (
    MAX_RANGE,
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import _PassArg
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from mailsvc.errors import FailedPrecondition, FieldViolation, InvalidArgument
from mailsvc.v1.settings_pb2 import MailTemplate

MODEL_TYPES = frozenset(
    {"string", "integer", "long", "float", "double", "boolean", "object", "array"}
)
SCALAR_FIELDS = ("from_address", "subject", "text", "html")
LIST_FIELDS = ("to", "cc", "bcc")
MAX_OUTPUT_CHARS = 1_000_000  # per rendered mail, all fields together
MAX_VALUE_CHARS = 1_000_000  # any one string, list or mapping a template builds
MAX_WRITTEN_CHARS = 16_000_000  # all writes of one render (outputs, macro and block buffers)
MAX_RENDER_SECONDS = 1.0  # one render, all fields together
RENDER_THREADS = 1  # one: renders hold the GIL, more threads only slow the event loop
LOOP_RENDER_SECONDS = 0.002  # a first try on the event loop; then the worker thread
# Any value a render on the loop may touch: the slowest filter on it (urlize, ~1.2 us per
# character) stays within a few milliseconds.
LOOP_VALUE_CHARS = 4096
MAX_COMPILE_SECONDS = 2.0  # one template field, constant folding included
MAX_NESTING = 100  # depth of a template's syntax tree
MAX_WRAP_CHARS = 100_000  # input of wordwrap, which is slow per character
MAX_SLICES = 10_000  # slices of the slice filter
MAX_POWER_EXPONENT = 64
MAX_RESULT_BITS = 4096  # of an integer power: chained powers must not grow without bound
MAX_ITERATIONS = 200_000  # loop steps per rendered mail, all loops together


class TemplateLimit(SecurityError):
    """A template went over one of the bounds above."""


@dataclass
class _Budget:
    """What one render (or one compilation) may still spend."""

    deadline: float
    iterations: int = MAX_ITERATIONS
    range_left: int = MAX_RANGE
    written: int = MAX_WRITTEN_CHARS
    exceeded: str | None = None  # the first limit hit while folding constants at save
    on_loop: bool = False  # the first try on the event loop: over its budget it gives up


class _OffLoop(Exception):  # not an error: the render moves to the worker thread
    """A render on the event loop went over its small budget."""


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)


def _current() -> _Budget:
    budget = _budget.get()
    if budget is None:  # only guarded code runs templates; never unbounded
        raise TemplateLimit("template code ran outside a render")
    return budget


def _limit(message: str) -> TemplateLimit:
    budget = _budget.get()
    if budget is not None and budget.exceeded is None:
        budget.exceeded = message
    return TemplateLimit(message)


def _late(budget: _Budget) -> Exception:
    if budget.on_loop:
        return _OffLoop()
    return _limit(f"takes longer than {MAX_RENDER_SECONDS:g} s")


def _tick(*inputs: Any) -> _Budget:
    """Checks the deadline; on the loop also the size of what the next step works on."""
    budget = _current()
    if time.monotonic() > budget.deadline:
        raise _late(budget)
    if budget.on_loop and sum(_size(x) for x in inputs) > LOOP_VALUE_CHARS:
        raise _OffLoop()
    return budget


def _loop_sized(size: int) -> None:
    budget = _budget.get()
    if budget is not None and budget.on_loop and size > LOOP_VALUE_CHARS:
        raise _OffLoop()


def _size(value: Any, depth: int = 0) -> int:
    """Characters or items `value` holds (an estimate of what str() of it makes)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple | set | frozenset | dict):
        if depth >= 4:
            return len(value)
        items = value.items() if isinstance(value, dict) else value
        return len(value) + sum(_size(v, depth + 1) for v in items)
    return 1


def _bounded(value: Any, what: str = "a value") -> Any:
    size = _size(value)
    if size > MAX_VALUE_CHARS:
        raise _limit(f"{what} larger than {MAX_VALUE_CHARS} characters")
    _loop_sized(size)
    return value


def _width(value: Any, what: str) -> None:
    if isinstance(value, int | float) and abs(value) > MAX_VALUE_CHARS:
        raise _limit(f"{what} larger than {MAX_VALUE_CHARS}")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(fmt: str, args: Any) -> None:
    """Bounds `fmt % args`: widths, precisions and the size of what may be repeated."""
    specs = 0
    for match in _PERCENT_SPEC.finditer(fmt):
        specs += 1
        for number in match.groups():
            if number and number != "*":
                _width(int(number), "a format width")
    values = args if isinstance(args, tuple) else (args,)
    for value in values:
        _width(value, "a format width")  # `*` widths come from the arguments
    if len(fmt) + specs * _size(args) > MAX_VALUE_CHARS:
        raise _limit(f"formatting makes more than {MAX_VALUE_CHARS} characters")


def _steps(context: Any, iterable: Any, static: int) -> Iterator[Any]:
    """Every {% for %} iterates through this (see _Guard), so nested loops are bounded; each
    step also charges the static text of the loop's body against what a render may write."""
    budget = _current()
    for item in iterable:
        budget.iterations -= 1
        budget.written -= static
        if budget.iterations < 0:
            raise _limit("too many loop iterations")
        if budget.written < 0:
            raise _limit(f"writes more than {MAX_WRITTEN_CHARS} characters")
        if time.monotonic() > budget.deadline:
            raise _late(budget)
        yield item


# pass_context keeps Jinja from running it while folding constants.
_counted = pass_context(_steps)


def _listed(iterable: Iterable[Any]) -> list[Any]:
    """A generator made a list so it can be sized; each item counts as a loop step."""
    return list(_steps(None, iterable, 0))


def _budgeted_range(*args: int) -> range:
    budget = _tick()
    rng = range(*args)
    budget.range_left -= len(rng)
    if len(rng) > MAX_RANGE or budget.range_left < 0:
        raise _limit("range() is limited")
    return rng


@pass_eval_context
def _concat(eval_ctx: EvalContext, parts: tuple[Any, ...]) -> str:
    """`a ~ b`: sized before it is joined."""
    _tick()
    size = sum(_size(p) for p in parts)
    if size > MAX_VALUE_CHARS:
        raise _limit(f"a value larger than {MAX_VALUE_CHARS} characters")
    _loop_sized(size)
    return markup_join(parts) if eval_ctx.autoescape else str_join(parts)


@pass_context
def _charge(context: Any, value: str, chars: int) -> str:
    """Static text of a macro or call block, charged at each call like a loop's."""
    budget = _tick()
    budget.written -= chars
    if budget.written < 0:
        raise _limit(f"writes more than {MAX_WRITTEN_CHARS} characters")
    return value


def _finalize(value: Any) -> Any:
    """Every {{ }} passes here before it is written, also into macro and block buffers."""
    budget = _tick()
    size = _size(value)
    if size > MAX_VALUE_CHARS:
        raise _limit(f"an output larger than {MAX_VALUE_CHARS} characters")
    _loop_sized(size)
    budget.written -= size
    if budget.written < 0:
        raise _limit(f"writes more than {MAX_WRITTEN_CHARS} characters")
    return value


_LOOP_GUARD = "mailsvc_loop_guard"
_CONCAT = "mailsvc_concat"
_CHARGE = "mailsvc_charge"
# Filters rather than globals: Jinja calls filters directly, globals through sandbox.call.
_GUARDS: dict[str, Callable[..., Any]] = {
    _LOOP_GUARD: _counted,
    _CONCAT: _concat,
    _CHARGE: _charge,
}


def _filter(name: str, node: nodes.Expr, args: list[nodes.Expr], lineno: int) -> nodes.Filter:
    return nodes.Filter(node, name, args, [], None, None, lineno=lineno)


def _static_chars(body: list[nodes.Node]) -> int:
    """Static text in `body`, not counting nested loops, macros and call blocks (they charge
    their own)."""
    total = 0
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, nodes.TemplateData):
            total += len(node.data)
        elif not isinstance(node, nodes.For | nodes.Macro | nodes.CallBlock):
            stack.extend(node.iter_child_nodes())
    return total


class _Guard(NodeTransformer):
    """Rewrites the tree so loops, `~` and repeated static text are counted, `~` sized."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        static = nodes.Const(_static_chars(node.body), lineno=node.lineno)
        iterable = typing.cast(nodes.Expr, node.iter)
        node.iter = _filter(_LOOP_GUARD, iterable, [static], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        parts = nodes.Tuple(node.nodes, "load", lineno=node.lineno)
        return _filter(_CONCAT, parts, [], node.lineno)

    def visit_Macro(self, node: nodes.Macro) -> nodes.Node:
        return self._charged(node)

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.Node:
        return self._charged(node)

    def _charged(self, node: nodes.Macro | nodes.CallBlock) -> nodes.Node:
        self.generic_visit(node)
        static = _static_chars(node.body)
        if static:
            empty = nodes.Const("", lineno=node.lineno)
            charge = _filter(_CHARGE, empty, [nodes.Const(static)], node.lineno)
            node.body.insert(0, nodes.Output([charge], lineno=node.lineno))
        return node


def _static_limits(ast: nodes.Template) -> None:
    """Widths written into the template itself ('{:>99999999}'.format(x), '%99999999d' % x,
    'x'.center(99999999)): refused at save, though the call only runs at render."""
    for call in ast.find_all(nodes.Call):
        target = call.node
        if not (isinstance(target, nodes.Getattr) and isinstance(target.node, nodes.Const)):
            continue
        s = target.node.value
        if not isinstance(s, str):
            continue
        if target.attr in ("format", "format_map"):
            for _, _, spec, _ in Formatter().parse(s):
                for number in re.findall(r"\d+", spec or ""):
                    _width(int(number), "a format width")
        elif target.attr in _STR_WIDTH_METHODS | {"expandtabs"}:
            args = tuple(a.value for a in call.args if isinstance(a, nodes.Const))
            _check_str_method(getattr(s, target.attr), args, {})
    for mod in ast.find_all(nodes.Mod):
        if isinstance(mod.left, nodes.Const) and isinstance(mod.left.value, str):
            _check_percent(mod.left.value, ())


def _depth(ast: nodes.Node) -> int:
    deepest = 0
    stack = [(ast, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            break
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return deepest


# --- filters and methods that can make much more than they are given --------------------------


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _lines(s: Any) -> int:
    return str(s).count("\n") + 1


def _pre_center(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    _width(_arg(args, kwargs, 1, "width", 80), "a width")


def _pre_indent(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    s, width = args[0], _arg(args, kwargs, 1, "width", 4)
    per_line = len(width) if isinstance(width, str) else width
    _width(per_line, "an indent")
    if isinstance(per_line, int | float) and _size(s) + per_line * _lines(s) > MAX_VALUE_CHARS:
        raise _limit(f"indent makes more than {MAX_VALUE_CHARS} characters")


def _pre_format(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    _check_percent(str(args[0]), tuple(args[1:]) + tuple(kwargs.values()))


def _pre_wordwrap(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    s = str(args[0])
    width = _arg(args, kwargs, 1, "width", 79)
    wrapstring = _arg(args, kwargs, 3, "wrapstring", None) or "\n"
    _width(width, "a width")
    if len(s) > MAX_WRAP_CHARS:
        raise _limit(f"wordwrap of more than {MAX_WRAP_CHARS} characters")
    lines = len(s) // max(int(width), 1) + _lines(s)
    if len(s) + lines * len(str(wrapstring)) > MAX_VALUE_CHARS:
        raise _limit(f"wordwrap makes more than {MAX_VALUE_CHARS} characters")


def _replaced_size(s: str, old: str, new: str, count: Any) -> int:
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def _pre_replace(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    s, old, new = (str(a) for a in args[:3])
    if _replaced_size(s, old, new, _arg(args, kwargs, 3, "count", None)) > MAX_VALUE_CHARS:
        raise _limit(f"replace makes more than {MAX_VALUE_CHARS} characters")


def _joined_size(items: Any, sep: Any) -> int:
    return _size(items) + len(str(sep)) * len(items)


def _pre_join(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    if _joined_size(args[0], _arg(args, kwargs, 1, "d", "")) > MAX_VALUE_CHARS:
        raise _limit(f"join makes more than {MAX_VALUE_CHARS} characters")


def _pre_batch(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    _width(_arg(args, kwargs, 1, "linecount", 1), "a batch size")


def _pre_slice(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    slices = _arg(args, kwargs, 1, "slices", 1)
    if isinstance(slices, int | float) and abs(slices) > MAX_SLICES:
        raise _limit(f"more than {MAX_SLICES} slices")


def _pre_value(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Filters that turn any value into its text: the value must not be huge."""
    _bounded(args[0])


_PRECHECKS: dict[str, Callable[[tuple[Any, ...], Mapping[str, Any]], None]] = {
    "center": _pre_center,
    "indent": _pre_indent,
    "format": _pre_format,
    "wordwrap": _pre_wordwrap,
    "replace": _pre_replace,
    "join": _pre_join,
    "batch": _pre_batch,
    "slice": _pre_slice,
    **{
        name: _pre_value
        for name in (
            "string",
            "pprint",
            "tojson",
            "xmlattr",
            "urlize",
            "urlencode",
            "escape",
            "e",
            "forceescape",
            "safe",
            "striptags",
            "list",
        )
    },
}
# Filters that consume an iterable: a generator is made a list first so it can be sized.
_MATERIALIZE = frozenset({"join"})


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    skip = 1 if _PassArg.from_obj(f) is not None else 0
    pre = _PRECHECKS.get(name)

    @functools.wraps(f)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick(*args[skip:], *kwargs.values())
        if name in _MATERIALIZE and len(args) > skip and not hasattr(args[skip], "__len__"):
            args = (*args[:skip], _listed(args[skip]), *args[skip + 1 :])
        if pre is not None and len(args) > skip:
            pre(args[skip:], kwargs)
        return _bounded(f(*args, **kwargs))

    return guarded


_STR_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})


def _check_str_method(
    method: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Any, ...]:
    """Bounds what a str method may build; returns the arguments to call it with."""
    s: str = method.__self__
    name = method.__name__
    if name in _STR_WIDTH_METHODS and args:
        _width(args[0], "a width")
    elif name == "expandtabs":
        tabsize = _arg(args, kwargs, 0, "tabsize", 8)
        _width(tabsize, "a tab size")
        if isinstance(tabsize, int) and len(s) + tabsize * s.count("\t") > MAX_VALUE_CHARS:
            raise _limit(f"expandtabs makes more than {MAX_VALUE_CHARS} characters")
    elif name == "join" and args:
        items = args[0] if hasattr(args[0], "__len__") else _listed(args[0])
        if _joined_size(items, s) > MAX_VALUE_CHARS:
            raise _limit(f"join makes more than {MAX_VALUE_CHARS} characters")
        return (items, *args[1:])
    elif name == "replace" and len(args) >= 2:
        count = _arg(args, kwargs, 2, "count", -1)
        if _replaced_size(s, str(args[0]), str(args[1]), count) > MAX_VALUE_CHARS:
            raise _limit(f"replace makes more than {MAX_VALUE_CHARS} characters")
    return args


class _BoundedFormatter(SandboxedFormatter):
    """str.format in the sandbox: widths, precisions and the total length are bounded."""

    def __init__(self, env: Any, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._made = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        _tick()
        for number in re.findall(r"\d+", format_spec):
            _width(int(number), "a format width")
        _bounded(value)
        out = super().format_field(value, format_spec)
        self._made += len(out)
        if self._made > MAX_VALUE_CHARS:
            raise _limit(f"formatting makes more than {MAX_VALUE_CHARS} characters")
        return out


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    pass


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, bounded in size and time (see the module's docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=autoescape, finalize=_finalize)
        self.globals.clear()
        self.globals["range"] = _budgeted_range
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters.update(_GUARDS)

    def handle_exception(self, source: str | None = None) -> NoReturn:
        if isinstance(sys.exc_info()[1], _OffLoop):
            raise  # as is: Jinja's rewritten traceback compiles code, and nobody would see it
        super().handle_exception(source)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        _tick(left, right)
        if op == "**":
            if isinstance(right, int | float) and abs(right) > MAX_POWER_EXPONENT:
                raise _limit("exponent too large")
            if isinstance(left, int) and left.bit_length() * abs(right) > MAX_RESULT_BITS:
                raise _limit("result too large")
            return operator.pow(left, right)
        if op == "%":
            if isinstance(left, str):
                _check_percent(left, right)
            return _bounded(operator.mod(left, right))
        if op == "+":
            sized = isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple)
            if sized and _size(left) + _size(right) > MAX_VALUE_CHARS:
                raise _limit(f"a value larger than {MAX_VALUE_CHARS} characters")
            return operator.add(left, right)
        for seq, times in ((left, right), (right, left)):
            sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
            if sized and _size(seq) * times > MAX_VALUE_CHARS:
                raise _limit("repetition too large")
        return operator.mul(left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or (
            value.__name__ not in ("format", "format_map")
        ):
            return None
        f_self = value.__self__
        if not isinstance(f_self, str):
            return None
        is_map = value.__name__ == "format_map"
        str_type = type(f_self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            formatter: _BoundedFormatter  # one per call: it counts what this call makes
            if isinstance(f_self, Markup):
                formatter = _BoundedEscapeFormatter(self, escape=f_self.escape)
            else:
                formatter = _BoundedFormatter(self)
            return str_type(formatter.vformat(f_self, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        bound = getattr(__obj, "__self__", None)
        _tick(
            bound if isinstance(bound, str | list | tuple | dict) else None, *args, *kwargs.values()
        )
        if isinstance(bound, str) and hasattr(__obj, "__name__"):
            args = _check_str_method(__obj, args, kwargs)
        return _bounded(super().call(__context, __obj, *args, **kwargs))


# --- compiled templates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    from_address: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    subject: str
    text: str
    html: str


def _field_sources(template: MailTemplate) -> Iterator[tuple[str, str, bool]]:
    """(field path, source, is html) of every templated string."""
    for name in SCALAR_FIELDS:
        yield name, getattr(template, name), name == "html"
    for name in LIST_FIELDS:
        for i, value in enumerate(getattr(template, name)):
            yield f"{name}[{i}]", value, False


def _private_attribute(ast: nodes.Template) -> int | None:
    """The line of the first attribute starting with '_', which the sandbox would refuse."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        attr = node.attr if isinstance(node, nodes.Getattr) else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            attr = node.arg.value if isinstance(node.arg.value, str) else None
        if attr and attr.startswith("_"):
            return int(node.lineno)
    return None


@dataclass(frozen=True)
class _Text:
    """A field without template syntax: its text, with no Jinja context built per render."""

    text: str

    def generate(self, values: Mapping[str, Any]) -> Iterator[str]:
        if self.text:
            yield self.text


def _is_text(ast: nodes.Template) -> bool:
    return all(
        isinstance(node, nodes.Output)
        and all(isinstance(c, nodes.TemplateData) for c in node.nodes)
        for node in ast.body
    )


@dataclass(frozen=True)
class CompiledTemplate:
    """A stored template, compiled; render() never compiles."""

    name: str
    model: Mapping[str, str]
    roles: frozenset[str]
    fields: Mapping[str, JinjaTemplate | _Text]
    list_lengths: Mapping[str, int]
    variables: frozenset[str]
    executor: Executor = field(repr=False, compare=False)

    async def render_async(self, parameters: Mapping[str, Any]) -> Rendered:
        """render(), first on the event loop within a small budget, else on the worker thread."""
        values = self._check_parameters(parameters)
        try:
            return self._render(values, on_loop=True)
        except _OffLoop:
            pass
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._render, values, False)

    def render(self, parameters: Mapping[str, Any]) -> Rendered:
        """Render every field; CPU-bound and bounded, so callers run it off the event loop."""
        return self._render(self._check_parameters(parameters), on_loop=False)

    def _render(self, values: Mapping[str, Any], on_loop: bool) -> Rendered:
        total = 0
        out: dict[str, str] = {}
        path = ""
        seconds = LOOP_RENDER_SECONDS if on_loop else MAX_RENDER_SECONDS
        budget = _Budget(deadline=time.monotonic() + seconds, on_loop=on_loop)
        token = _budget.set(budget)
        try:
            for path, template in self.fields.items():
                chunks = []
                for chunk in template.generate(values):
                    total += len(chunk)
                    if total > MAX_OUTPUT_CHARS:
                        raise TemplateLimit(f"renders to more than {MAX_OUTPUT_CHARS} characters")
                    chunks.append(chunk)
                out[path] = "".join(chunks)
        except (RecursionError, MemoryError):
            if on_loop:  # the loop's stack is deeper than the worker's: let it decide
                raise _OffLoop() from None
            raise FailedPrecondition(
                f"template {self.name!r} failed to render with these parameters",
                reason="TEMPLATE_RENDER_FAILED",
            ) from None
        except TemplateLimit as exc:
            raise InvalidArgument.one(
                f"settings.templates.{self.name}.{path}",
                f"template {self.name!r} goes over a limit with these parameters: {exc.message}",
            ) from None
        except SecurityError:
            raise FailedPrecondition(
                f"template {self.name!r} does something the sandbox forbids",
                reason="TEMPLATE_UNSAFE",
            ) from None
        except UndefinedError:
            raise InvalidArgument.one(
                "parameters", f"template {self.name!r} uses a value the parameters do not give"
            ) from None
        except (
            TemplateError,
            ArithmeticError,
            TypeError,
            ValueError,
            LookupError,
        ):
            raise FailedPrecondition(
                f"template {self.name!r} failed to render with these parameters",
                reason="TEMPLATE_RENDER_FAILED",
            ) from None
        finally:
            _budget.reset(token)
        lists = {
            name: [out[f"{name}[{i}]"] for i in range(self.list_lengths[name])]
            for name in LIST_FIELDS
        }
        return Rendered(
            from_address=out["from_address"],
            subject=out["subject"],
            text=out["text"],
            html=out["html"],
            **lists,
        )

    def _check_parameters(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        violations = []
        values: dict[str, Any] = {}
        for name, value in parameters.items():
            kind = self.model.get(name)
            if kind is None:
                violations.append(
                    FieldViolation(f"parameters.{name}", "not a parameter of this template")
                )
                continue
            converted = convert_parameter(kind, value)
            if converted is _WRONG:
                violations.append(FieldViolation(f"parameters.{name}", f"must be {kind}"))
            else:
                values[name] = converted
        for name in sorted(self.variables - values.keys()):
            if name in self.model and name not in parameters:
                violations.append(FieldViolation(f"parameters.{name}", "required"))
        if violations:
            raise InvalidArgument(violations)
        return values


_WRONG = object()


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def convert_parameter(kind: str, value: Any) -> Any:
    """A JSON value (from google.protobuf.Struct) as the model type says, or _WRONG."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return value if isinstance(value, str) else _WRONG
    if kind in ("integer", "long"):
        return int(value) if number and float(value).is_integer() else _WRONG
    if kind in ("float", "double"):
        return float(value) if number else _WRONG
    if kind == "boolean":
        return value if isinstance(value, bool) else _WRONG
    if kind == "object":
        return _whole_numbers(value) if isinstance(value, dict) else _WRONG
    if kind == "array":
        return _whole_numbers(value) if isinstance(value, list) else _WRONG
    return _WRONG


Checked = tuple[CompiledTemplate | None, list[FieldViolation]]


class TemplateEngine:
    """Owns the two sandboxes (html autoescaped, the rest not) and compiles stored templates.

    Compilations are cached by the template's content, so a settings write compiles only the
    templates it changes.
    """

    def __init__(self) -> None:
        self.compilations = 0  # template fields compiled so far; rendering never adds to it
        self._text = _Sandbox(autoescape=False)
        self._html = _Sandbox(autoescape=True)
        self._cache: dict[tuple[str, bytes], Checked] = {}
        self._used: dict[tuple[str, bytes], Checked] = {}
        self._cache_lock = threading.Lock()
        # Renders run here, off the event loop. Rendering holds the GIL, so more threads would
        # add no throughput, only make the loop wait longer for the GIL (measured: health
        # checks during hostile renders took up to 69 ms with 1 thread, 180 with 2, 400 with 4).
        self._pool = ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="render")

    def checked(self, name: str, template: MailTemplate, check: Callable[[], Checked]) -> Checked:
        """`check()` of this template, run only when its content is new (cached by content)."""
        key = (name, template.SerializeToString(deterministic=True))
        with self._cache_lock:
            result = self._cache.get(key)
        if result is None:
            result = check()
        with self._cache_lock:
            self._used[key] = result
        return result

    def keep_only_used(self) -> None:
        """Forget the results not asked for since the last call (a check of all settings)."""
        with self._cache_lock:
            self._cache, self._used = self._used, {}

    def compile(self, name: str, template: MailTemplate, path: str) -> Checked:
        """Compile every field; violations name `path.<field>` and the line at fault."""
        violations: list[FieldViolation] = []
        for param, kind in template.model.items():
            if kind not in MODEL_TYPES:
                violations.append(
                    FieldViolation(
                        f"{path}.model.{param}",
                        f"type {kind!r} is not one of {', '.join(sorted(MODEL_TYPES))}",
                    )
                )
            if not param.isidentifier():
                violations.append(
                    FieldViolation(f"{path}.model.{param}", "must be a valid identifier")
                )
        compiled: dict[str, JinjaTemplate | _Text] = {}
        used: set[str] = set()
        for field_name, source, html in _field_sources(template):
            env = self._html if html else self._text
            result = self._compile_field(env, source, template.model.keys())
            if isinstance(result, str):
                violations.append(FieldViolation(f"{path}.{field_name}", result))
                continue
            compiled[field_name], variables = result
            used |= variables
        if violations:
            return None, violations
        return (
            CompiledTemplate(
                name=name,
                model=dict(template.model),
                roles=frozenset(template.roles),
                fields=compiled,
                list_lengths={n: len(getattr(template, n)) for n in LIST_FIELDS},
                variables=frozenset(used),
                executor=self._pool,
            ),
            [],
        )

    def _compile_field(
        self, env: _Sandbox, source: str, declared: Iterable[str]
    ) -> tuple[JinjaTemplate | _Text, set[str]] | str:
        """The compiled field and the names it uses, or what is wrong with it."""
        budget = _Budget(deadline=time.monotonic() + MAX_COMPILE_SECONDS)
        token = _budget.set(budget)
        try:
            ast = env.parse(source)
            if _depth(ast) > MAX_NESTING:
                return f"nested more than {MAX_NESTING} levels deep"
            _static_limits(ast)
            private = _private_attribute(ast)
            if private is not None:
                return f"line {private}: attributes starting with '_' are not allowed"
            variables = meta.find_undeclared_variables(ast) - env.globals.keys()
            undeclared = variables - set(declared)
            if undeclared:
                lines = sorted({n.lineno for n in ast.find_all(nodes.Name) if n.name in undeclared})
                return (
                    f"line {lines[0] if lines else 1}: uses {', '.join(sorted(undeclared))},"
                    " not declared in the model"
                )
            compiled = env.from_string(_Guard().visit(ast))
            self.compilations += 1
            if _is_text(ast):  # the same text at every render: rendered once, now
                return _Text("".join(compiled.generate({}))), variables
        except TemplateSyntaxError as exc:
            return f"line {exc.lineno}: {exc.message}"
        except TemplateLimit as exc:
            return f"goes over a limit: {exc.message}"
        except (RecursionError, SyntaxError, MemoryError):
            return "nested too deeply"
        finally:
            _budget.reset(token)
        if budget.exceeded is not None:
            return f"goes over a limit: {budget.exceeded}"
        return compiled, variables
