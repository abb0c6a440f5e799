"""Sandboxed Jinja2 templates: checked and compiled once per settings version, typed parameters."""

from __future__ import annotations

import contextvars
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2 import Template as JinjaTemplate
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

from mailsvc.errors import FailedPrecondition, FieldViolation, InvalidArgument, ResourceExhausted
from mailsvc.v1.settings_pb2 import MailTemplate

MODEL_TYPES = frozenset(
    {"string", "integer", "long", "float", "double", "boolean", "object", "array"}
)
SCALAR_FIELDS = ("from_address", "subject", "text", "html")
LIST_FIELDS = ("to", "cc", "bcc")
MAX_OUTPUT_CHARS = 1_000_000  # per rendered mail, all fields together
MAX_POWER_EXPONENT = 64
MAX_RESULT_BITS = 4096  # of an integer power: chained powers must not grow without bound
MAX_ITERATIONS = 200_000  # loop steps per rendered mail, all loops together

# Iterations of range() left in the current render: nested loops share one budget.
_range_budget: contextvars.ContextVar[int] = contextvars.ContextVar("range_budget", default=0)


# Loop steps left in the current render.
_iterations: contextvars.ContextVar[int] = contextvars.ContextVar("iterations", default=0)


def _counted(iterable: Any) -> Iterator[Any]:
    """Every {% for %} iterates through this (see _guard_loops), so nested loops are bounded."""
    for item in iterable:
        left = _iterations.get() - 1
        if left < 0:
            raise SecurityError("too many loop iterations")
        _iterations.set(left)
        yield item


def _guard_loops(ast: nodes.Template) -> nodes.Template:
    for loop in ast.find_all(nodes.For):
        loop.iter = nodes.Call(
            nodes.Name(_LOOP_GUARD, "load", lineno=loop.lineno),
            [loop.iter],
            [],
            None,
            None,
            lineno=loop.lineno,
        )
    return ast


_LOOP_GUARD = "mailsvc_loop_guard"


def _budgeted_range(*args: int) -> range:
    rng = range(*args)
    left = _range_budget.get() - len(rng)
    if len(rng) > MAX_RANGE or left < 0:
        raise SecurityError("range() is limited")
    _range_budget.set(left)
    return rng


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*` and `**` bounded so one expression cannot eat memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**":
            if isinstance(right, int | float) and abs(right) > MAX_POWER_EXPONENT:
                raise SecurityError("exponent too large")
            if isinstance(left, int) and left.bit_length() * abs(right) > MAX_RESULT_BITS:
                raise SecurityError("result too large")
            return operator.pow(left, right)
        for seq, times in ((left, right), (right, left)):
            sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
            if sized and len(seq) * times > MAX_OUTPUT_CHARS:
                raise SecurityError("repetition too large")
        return operator.mul(left, right)


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
class CompiledTemplate:
    """A stored template, compiled; render() never compiles."""

    name: str
    model: Mapping[str, str]
    roles: frozenset[str]
    fields: Mapping[str, JinjaTemplate]
    list_lengths: Mapping[str, int]
    variables: frozenset[str]

    def render(self, parameters: Mapping[str, Any]) -> Rendered:
        values = self._check_parameters(parameters)
        total = 0
        out: dict[str, str] = {}
        token = _range_budget.set(MAX_RANGE)
        steps = _iterations.set(MAX_ITERATIONS)
        try:
            for path, template in self.fields.items():
                chunks = []
                for chunk in template.generate(values):
                    total += len(chunk)
                    if total > MAX_OUTPUT_CHARS:
                        raise ResourceExhausted(
                            f"template {self.name!r} renders to more than "
                            f"{MAX_OUTPUT_CHARS} characters",
                            reason="TEMPLATE_OUTPUT_TOO_LARGE",
                        )
                    chunks.append(chunk)
                out[path] = "".join(chunks)
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
            RecursionError,
        ):
            raise FailedPrecondition(
                f"template {self.name!r} failed to render with these parameters",
                reason="TEMPLATE_RENDER_FAILED",
            ) from None
        finally:
            _range_budget.reset(token)
            _iterations.reset(steps)
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


class TemplateEngine:
    """Owns the two sandboxes (html autoescaped, the rest not) and compiles stored templates."""

    def __init__(self) -> None:
        self.compilations = 0  # template fields compiled so far; rendering never adds to it
        self._text = _Sandbox(undefined=StrictUndefined, autoescape=False)
        self._html = _Sandbox(undefined=StrictUndefined, autoescape=True)
        for env in (self._text, self._html):
            env.globals.clear()
            env.globals["range"] = _budgeted_range
            env.globals[_LOOP_GUARD] = _counted

    def compile(
        self, name: str, template: MailTemplate, path: str
    ) -> tuple[CompiledTemplate | None, list[FieldViolation]]:
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
        compiled: dict[str, JinjaTemplate] = {}
        used: set[str] = set()
        for field, source, html in _field_sources(template):
            env = self._html if html else self._text
            try:
                ast = env.parse(source)
            except TemplateSyntaxError as exc:
                violations.append(
                    FieldViolation(f"{path}.{field}", f"line {exc.lineno}: {exc.message}")
                )
                continue
            private = _private_attribute(ast)
            if private is not None:
                violations.append(
                    FieldViolation(
                        f"{path}.{field}",
                        f"line {private}: attributes starting with '_' are not allowed",
                    )
                )
                continue
            variables = meta.find_undeclared_variables(ast) - env.globals.keys()
            undeclared = variables - template.model.keys()
            if undeclared:
                lines = sorted({n.lineno for n in ast.find_all(nodes.Name) if n.name in undeclared})
                violations.append(
                    FieldViolation(
                        f"{path}.{field}",
                        f"line {lines[0] if lines else 1}: uses {', '.join(sorted(undeclared))},"
                        " not declared in the model",
                    )
                )
            used |= variables
            compiled[field] = env.from_string(_guard_loops(ast))
            self.compilations += 1
        if violations:
            return None, violations
        result = CompiledTemplate(
            name=name,
            model=dict(template.model),
            roles=frozenset(template.roles),
            fields=compiled,
            list_lengths={n: len(getattr(template, n)) for n in LIST_FIELDS},
            variables=frozenset(used),
        )
        return result, []
