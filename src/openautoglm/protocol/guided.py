"""Guided (constrained) decoding: what shape a generation must take.

``GuidedDecoding`` is transport-neutral: the OpenAI routes build it from ``response_format`` and the
``guided_*`` extensions, the task endpoints and tool calls build it directly, the local engine compiles it into a
grammar (see ``engine/guided.py``) and remote backends get the original fields passed through.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from openautoglm.protocol.errors import InvalidRequestError

KINDS = ("json_object", "json_schema", "choice", "regex", "grammar", "tool_call")
MAX_CHOICES = 1024
MAX_SPEC_CHARS = 200_000


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """Exactly one of the constraints is set.

    - ``json_object``: any JSON object;
    - ``json_schema``: a JSON value valid against the schema (``strict``: no properties beyond those listed);
    - ``choice``: exactly one of the strings;
    - ``regex``: text matching the regular expression (whole match);
    - ``grammar``: text of the EBNF grammar (xgrammar's / GBNF dialect; the rule ``root`` starts);
    - ``tool_call``: GLM's tool-call text, ``name`` then a newline then JSON arguments valid against that
      function's ``parameters``, for one of the given ``{"name", "parameters"}`` functions.

    ``param`` names the request field the constraint came from, for error messages.
    """

    json_object: bool = False
    json_schema: dict[str, Any] | None = None
    strict: bool = True
    choice: tuple[str, ...] | None = None
    regex: str | None = None
    grammar: str | None = None
    tool_call: tuple[dict[str, Any], ...] | None = None
    param: str = "response_format"

    @property
    def kind(self) -> str:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise InvalidRequestError(
                f"exactly one guided decoding constraint must be set ({', '.join(KINDS)}), got "
                f"{', '.join(set_kinds) or 'none'}",
                param=self.param,
            )
        return set_kinds[0]

    def validate(self) -> GuidedDecoding:
        """Checks that need no grammar compiler; the engine reports what only compiling finds."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json_schema" and not isinstance(value, dict):
            raise InvalidRequestError("json_schema must be a JSON object (a JSON Schema)", param=self.param)
        if kind == "choice" and (
            not value or len(value) > MAX_CHOICES or not all(isinstance(c, str) and c for c in value)
        ):
            raise InvalidRequestError(
                f"guided_choice must be a list of 1 to {MAX_CHOICES} non-empty strings", param=self.param
            )
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise InvalidRequestError(f"guided_{kind} must be a non-empty string", param=self.param)
        if kind == "tool_call":
            for i, fn in enumerate(value):
                if not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise InvalidRequestError(f"tools.{i}.function.name must be a non-empty string", param="tools")
                if not isinstance(fn.get("parameters", {}), dict):
                    raise InvalidRequestError(
                        f"tools.{i}.function.parameters must be a JSON Schema object", param="tools"
                    )
        if len(self.canonical()) > MAX_SPEC_CHARS:
            raise InvalidRequestError(
                f"the {kind} constraint is too large: at most {MAX_SPEC_CHARS} characters of JSON", param=self.param
            )
        return self

    def canonical(self) -> str:
        """A canonical JSON text of the constraint (what decides the compiled grammar)."""
        kind = self.kind
        value: Any = getattr(self, kind)
        if isinstance(value, tuple):
            value = list(value)
        body: dict[str, Any] = {"kind": kind, "value": value}
        if kind == "json_schema":
            body["strict"] = self.strict
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def key(self) -> str:
        """The cache key of the compiled grammar: a hash of the canonical text."""
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()
