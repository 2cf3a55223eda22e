"""``autoglm config validate``: every problem of a configuration file, each with its dotted path and line.

Three passes, each only when the one before succeeded: YAML syntax (line and column), the Settings schema
(unknown keys with a did-you-mean, wrong types and ranges with the expected type and the value found) and the
semantic rules across fields (``config_rules``). ``serve`` runs the same check before it starts.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, BeforeValidator, ValidationError

from openautoglm.config.duration import parse_duration
from openautoglm.config.settings import Settings
from openautoglm.ops.yaml_positions import PositionedYaml, YamlSyntaxError, load_with_positions

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Issue:
    severity: Severity
    path: str  # dotted, e.g. router.deployments.0.backends.1.weight; "" for the whole file
    message: str
    line: int | None = None
    column: int | None = None
    hint: str | None = None

    def format(self, file: str | None = None) -> str:
        where = ":".join(str(p) for p in (file, self.line, self.column) if p is not None)
        head = f"{where}: " if where else ""
        path = f"{self.path}: " if self.path else ""
        tail = f" ({self.hint})" if self.hint else ""
        return f"{head}{self.severity}: {path}{self.message}{tail}"


@dataclass(slots=True)
class ConfigReport:
    file: str | None
    issues: list[Issue]
    settings: Settings | None = None
    doc: PositionedYaml | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "ok": self.ok, "issues": [asdict(i) for i in self.issues]}


def dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)


# ---- resolving the schema at a path --------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / X | None -> X; Annotated[X, ...] -> X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def annotation_at(path: tuple[str | int, ...], root: type[BaseModel] = Settings) -> tuple[Any, Any]:
    """``(annotation, field_info)`` of the setting at ``path`` (both None where the path leaves the schema)."""
    annotation: Any = root
    info: Any = None
    for part in path:
        annotation = _unwrap(annotation)
        if _is_model(annotation) and isinstance(part, str) and part in annotation.model_fields:
            info = annotation.model_fields[part]
            annotation = info.annotation
        elif isinstance(part, int) and typing.get_origin(annotation) in (list, tuple):
            annotation = typing.get_args(annotation)[0]
            info = None
        elif typing.get_origin(annotation) is dict and isinstance(part, str):
            annotation = typing.get_args(annotation)[1]
            info = None
        else:
            return None, None
    return annotation, info


def _is_duration(info: Any) -> bool:
    return info is not None and any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in info.metadata)


def type_name(annotation: Any, info: Any = None) -> str:
    """A reader's name for a setting's type: 'integer', 'duration (5s, 250ms, 2m or seconds)', 'one of …'."""
    if _is_duration(info):
        return "duration (5s, 250ms, 2m or seconds)"
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if _is_model(annotation):
        return "mapping"
    names = {int: "integer", float: "number", bool: "boolean (true/false)", str: "string", type(None): "null"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


# ---- schema errors ---------------------------------------------------------------------------------------


def _clean_loc(loc: tuple[Any, ...], doc: PositionedYaml) -> tuple[str | int, ...]:
    """pydantic's location without its internal tags (``function-after[…]``), keeping what the file holds."""
    out: list[str | int] = []
    for part in loc:
        candidate = (*out, part)
        if isinstance(part, int) or candidate in doc.positions or annotation_at(candidate)[0] is not None:
            out.append(part)
    return tuple(out)


def _found(value: Any) -> str:
    kind = {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}
    return f"{value!r} ({kind.get(type(value), type(value).__name__)})"


def _schema_issue(err: dict[str, Any], doc: PositionedYaml) -> Issue:
    path = _clean_loc(tuple(err["loc"]), doc)
    written, pos = doc.locate(path)
    line, column = pos if pos else (None, None)
    if err["type"] == "extra_forbidden":
        parent, _ = annotation_at(path[:-1])
        known = list(_unwrap(parent).model_fields) if _is_model(_unwrap(parent)) else []
        close = difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys here: {', '.join(known)}"
        return Issue("error", dotted(path), f"unknown key {path[-1]!r}", line, column, hint)
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    annotation, info = annotation_at(path)
    if err["type"] == "missing":
        return Issue("error", dotted(path), f"required setting is missing ({type_name(annotation, info)})",
                     line, column)  # fmt: skip
    is_leaf = annotation is not None and not _is_model(_unwrap(annotation)) and written == path
    if is_leaf:
        msg = f"{msg}; expected {type_name(annotation, info)}, found {_found(err.get('input'))}"
    return Issue("error", dotted(path), msg, line, column)


def schema_issues(data: Any, doc: PositionedYaml) -> tuple[list[Issue], Settings | None]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return [Issue("error", "", f"the top level must be a mapping of sections, found {_found(data)}", 1, 1)], None
    try:
        return [], Settings(**data)
    except ValidationError as exc:
        return [_schema_issue(dict(e), doc) for e in exc.errors()], None


# ---- the whole check -------------------------------------------------------------------------------------


def check_text(
    text: str, file: str | None = None, *, base_dir: Path | None = None, semantic: bool = True
) -> ConfigReport:
    """Check a configuration file's text: syntax, schema, then (``semantic``) the rules across settings."""
    from openautoglm.ops.config_rules import semantic_issues

    try:
        doc = load_with_positions(text)
    except YamlSyntaxError as exc:
        return ConfigReport(file, [Issue("error", "", exc.message, exc.line, exc.column)])
    issues = [
        Issue("error", dotted(p), "key written twice in one mapping (the last one would silently win)", line, col)
        for p, line, col in doc.duplicates
    ]
    found, settings = schema_issues(doc.data, doc)
    issues += found
    if settings is not None and semantic:
        issues += semantic_issues(settings, doc, base_dir=base_dir)
    return ConfigReport(file, issues, settings, doc)


def check_file(path: str | Path, *, semantic: bool = True) -> ConfigReport:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        return ConfigReport(str(p), [Issue("error", "", f"cannot read the file: {exc.strerror}")])
    return check_text(text, str(p), semantic=semantic)


def check_effective(settings: Settings, file_report: ConfigReport | None = None) -> ConfigReport:
    """The semantic rules over the final settings (file, environment and flags merged), placed on the file's
    lines where the file wrote the setting: what ``serve`` checks before it starts."""
    from openautoglm.ops.config_rules import semantic_issues

    doc = file_report.doc if file_report is not None else None
    file = file_report.file if file_report is not None else None
    return ConfigReport(file, semantic_issues(settings, doc), settings, doc)
