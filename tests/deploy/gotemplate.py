"""A small renderer of the Go-template subset the Open-AutoGLM Helm chart uses (no `helm` binary needed).

Supported: ``{{ .Values.a.b }}``, ``$`` and ``$var``, ``{{- … -}}`` trimming, ``if / else if / else / end``,
``range $k, $v := …`` and ``range …`` (``.`` rebinds), ``with``, pipelines, and the functions toYaml, nindent,
indent, quote, default, b64enc, eq, ne, not, and, or, int, printf, trunc, trimSuffix. Unknown syntax raises,
so the chart cannot drift into what this renderer would silently get wrong.
"""

from __future__ import annotations

import base64
import re
import shlex
from typing import Any

import yaml

_TAG = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


class TemplateError(Exception):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _TAG.finditer(text):
        before = text[pos : m.start()]
        if m.group(1):
            before = before.rstrip()
        if out and out[-1][0] == "trim_next":
            out.pop()
            before = before.lstrip()
        out.append(("text", before))
        out.append(("action", m.group(2)))
        if m.group(3):
            out.append(("trim_next", ""))
        pos = m.end()
    tail = text[pos:]
    if out and out[-1][0] == "trim_next":
        out.pop()
        tail = tail.lstrip()
    out.append(("text", tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[Any], int, str]:
    nodes: list[Any] = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        if value.startswith("/*"):
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in stop or value.startswith("else"):
            return nodes, i, value
        if word in ("if", "with", "range"):
            branches = []
            cond = value[len(word) :].strip()
            while True:
                body, i, ended = _parse(tokens, i, ("end",))
                branches.append((cond, body))
                if ended == "end":
                    break
                cond = ended[4:].strip().removeprefix("if").strip() or "true"
            nodes.append((word, branches))
        elif word == "end":
            raise TemplateError("unbalanced {{ end }}")
        else:
            nodes.append(("action", value))
    if stop:
        raise TemplateError(f"missing {{{{ end }}}} (looking for {stop})")
    return nodes, i, ""


def _lookup(path: str, scope: dict[str, Any]) -> Any:
    if path == ".":
        return scope["."]
    base, rest = (scope["$"], path[1:]) if path.startswith("$.") or path == "$" else (None, path)
    if base is None and path.startswith("$"):
        name, _, rest = path.partition(".")
        base = scope[name]
        rest = "." + rest if rest else ""
    elif base is None:
        base = scope["."]
    for part in [p for p in rest.split(".") if p]:
        base = base.get(part) if isinstance(base, dict) else None
    return base


def _to_yaml(value: Any) -> str:
    return "" if value in (None, {}, []) else yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip()


FUNCS: dict[str, Any] = {
    "toYaml": _to_yaml,
    "nindent": lambda n, s: "\n" + "\n".join(" " * int(n) + line if line else line for line in str(s).split("\n")),
    "indent": lambda n, s: "\n".join(" " * int(n) + line for line in str(s).split("\n")),
    "quote": lambda s: '"' + str("" if s is None else s).replace('"', '\\"') + '"',
    "default": lambda d, v=None: v if v not in (None, "", [], {}, False) else d,
    "b64enc": lambda s: base64.b64encode(str(s).encode()).decode(),
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "and": lambda *a: all(a),
    "or": lambda *a: next((x for x in a if x), a[-1]),
    "int": lambda a: int(a),
    "printf": lambda fmt, *a: fmt.replace("%s", "{}").replace("%d", "{}").format(*a),
    "trunc": lambda n, s: str(s)[: int(n)],
    "trimSuffix": lambda suffix, s: str(s).removesuffix(suffix),
}


def _atom(token: str, scope: dict[str, Any]) -> Any:
    if token.startswith(('"', "'")):
        return token[1:-1]
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token in ("true", "false"):
        return token == "true"
    if token.startswith((".", "$")):
        return _lookup(token, scope)
    raise TemplateError(f"unsupported token {token!r}")


def _command(words: list[str], scope: dict[str, Any], piped: tuple[Any] | tuple[()] = ()) -> Any:
    head = words[0]
    if head.startswith("(") or head not in FUNCS:
        if len(words) > 1 or piped:
            raise TemplateError(f"unsupported command {' '.join(words)!r}")
        return _atom(head, scope)
    return FUNCS[head](*[_atom(w, scope) for w in words[1:]], *piped)


def evaluate(expr: str, scope: dict[str, Any]) -> Any:
    value: Any = None
    for n, part in enumerate(p.strip() for p in expr.split("|")):
        words = shlex.split(part, posix=False)
        value = _command(words, scope) if n == 0 else _command(words, scope, (value,))
    return value


def _render(nodes: list[Any], scope: dict[str, Any]) -> str:
    out: list[str] = []
    for kind, value in nodes:
        if kind == "text":
            out.append(value)
        elif kind == "action":
            m = re.fullmatch(r"(\$\w+)\s*:?=\s*(.+)", value)
            if m:
                scope[m.group(1)] = evaluate(m.group(2), scope)
            else:
                result = evaluate(value, scope)
                out.append("" if result is None else str(result).lower() if isinstance(result, bool) else str(result))
        elif kind == "if":
            for cond, body in value:
                if cond == "true" or evaluate(cond, scope):
                    out.append(_render(body, scope))
                    break
        elif kind == "with":
            (cond, body), *rest = value
            target = evaluate(cond, scope)
            if target:
                out.append(_render(body, {**scope, ".": target}))
            elif rest:
                out.append(_render(rest[0][1], scope))
        elif kind == "range":
            out.append(_range(value[0], scope))
    return "".join(out)


def _range(branch: tuple[str, list[Any]], scope: dict[str, Any]) -> str:
    cond, body = branch
    m = re.fullmatch(r"(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", cond)
    names, expr = ((m.group(1), m.group(2)), m.group(3)) if m else ((), cond)
    items = evaluate(expr, scope) or []
    pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items))
    out = []
    for key, item in pairs:
        inner = {**scope, ".": item}
        if names:
            inner[names[0]], inner[names[1]] = key, item
        out.append(_render(body, inner))
    return "".join(out)


def render(template: str, values: dict[str, Any], release: dict[str, Any], chart: dict[str, Any]) -> str:
    root = {"Values": values, "Release": release, "Chart": chart}
    nodes, _, _ = _parse(_tokens(template), 0, ())
    return _render(nodes, {".": root, "$": root})
