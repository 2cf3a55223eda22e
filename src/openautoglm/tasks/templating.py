"""Prompt templates rendered in a locked-down Jinja2 sandbox.

Templates come from operators through the admin API, variables from any client, so rendering must never reach
Python internals or run away: jinja2's immutable sandbox (no underscore attributes, no mutation of values, no
unsafe callables), no imports, includes or macros from outside, every ``for`` loop counted against one
per-render budget (nested loops multiply), ``range``, string repetition and padding bounded, powers bounded,
and the output cut off at a size limit. A variable the template uses but the request does not give is a 400
naming it.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from openautoglm.protocol.errors import InvalidRequestError

MAX_TEMPLATE_CHARS = 100_000
MAX_OUTPUT_CHARS = 200_000
MAX_LOOP_ITERATIONS = 100_000
_PADDING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_loop_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("loop_budget")


class TemplateLimitError(SecurityError):
    """A render went over a bound (loops, output size, string size)."""


def _loop_guard(iterable: Iterable[Any]) -> Iterator[Any]:
    budget = _loop_budget.get()
    for item in iterable:
        budget[0] -= 1
        if budget[0] < 0:
            raise TemplateLimitError(f"the template runs more than {MAX_LOOP_ITERATIONS} loop iterations")
        yield item


def _bounded_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_LOOP_ITERATIONS:
        raise TemplateLimitError(f"range() is limited to {MAX_LOOP_ITERATIONS} items in templates")
    return r


class PromptEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
        self.globals = {"range": _bounded_range}  # no lipsum, cycler, joiner, namespace, dict
        self.filters["loopguard"] = _loop_guard

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        ast = super()._parse(source, name, filename)
        for bad in (nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends):
            node = ast.find(bad)
            if node is not None:
                raise jinja2.TemplateSyntaxError(
                    f"{bad.__name__.lower()} is not allowed in prompt templates", node.lineno
                )
        for loop in ast.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "loopguard", [], [], None, None, lineno=loop.lineno)
        return ast

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and abs(left) > 1 and left.bit_length() * abs(right) > 4096:
            raise TemplateLimitError("powers in templates are limited to results of at most 4096 bits")
        if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
            _check_size(len(left) * right)
        if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
            _check_size(len(right) * left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", "")
        if isinstance(getattr(__obj, "__self__", None), str) and name in _PADDING:
            widths = [a for a in (*args, *kwargs.values()) if isinstance(a, int)]
            _check_size(max(widths, default=0) * (8 if name == "expandtabs" else 1))
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, str):
            _check_size(len(result))
        return result


def _check_size(n: int) -> None:
    if n > MAX_OUTPUT_CHARS:
        raise TemplateLimitError(f"a template value may hold at most {MAX_OUTPUT_CHARS} characters")


_ENV = PromptEnvironment()
_UNDEFINED = re.compile(r"'([^']+)' is undefined")


def compile_template(text: str, param: str = "template") -> jinja2.Template:
    """The compiled template; 400 naming ``param`` for a syntax error or a forbidden construct."""
    if not isinstance(text, str) or not text:
        raise InvalidRequestError("a prompt template must be a non-empty string", param=param)
    if len(text) > MAX_TEMPLATE_CHARS:
        raise InvalidRequestError(f"a prompt template holds at most {MAX_TEMPLATE_CHARS} characters", param=param)
    try:
        return _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidRequestError(f"template syntax error at line {exc.lineno}: {exc.message}", param=param) from exc


def render_template(text: str, variables: Mapping[str, Any], param: str = "prompt_template") -> str:
    """Render ``text`` with ``variables`` (plain JSON values). Errors are 400s naming the variable or the limit."""
    template = compile_template(text, param=f"{param}.name")
    if not isinstance(variables, Mapping) or not all(isinstance(k, str) for k in variables):
        raise InvalidRequestError("variables must be an object of named values", param=f"{param}.variables")
    token = _loop_budget.set([MAX_LOOP_ITERATIONS])
    try:
        out: list[str] = []
        size = 0
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateLimitError(f"the rendered prompt is longer than {MAX_OUTPUT_CHARS} characters")
            out.append(piece)
        return "".join(out)
    except jinja2.UndefinedError as exc:
        match = _UNDEFINED.search(str(exc))
        missing = match.group(1) if match else None
        if missing is not None and missing not in variables:
            raise InvalidRequestError(
                f"the template needs variable {missing!r}, which variables does not give",
                param=f"{param}.variables.{missing}",
            ) from exc
        raise InvalidRequestError(f"the template failed: {exc}", param=f"{param}.variables") from exc
    except SecurityError as exc:
        raise InvalidRequestError(f"the template was stopped: {exc}", param=param) from exc
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise InvalidRequestError(f"the template failed: {type(exc).__name__}: {exc}", param=param) from exc
    finally:
        _loop_budget.reset(token)


def template_variables(text: str) -> list[str]:
    """The variables a template refers to (sorted), for listings and ``show``."""
    from jinja2 import meta

    return sorted(meta.find_undeclared_variables(_ENV.parse(text)) - set(_ENV.globals))
