"""Load YAML and remember where every key and list item sits, so errors can name the line.

``load_with_positions(text)`` returns the data (as ``yaml.safe_load`` would) and a map from each path
(``("router", "deployments", 0, "backends", 1, "weight")``) to its 1-based ``(line, column)``. Keys written
twice in one mapping are reported too: PyYAML silently keeps the last one, which hides typos in long files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class YamlSyntaxError(Exception):
    message: str
    line: int | None
    column: int | None


@dataclass(slots=True)
class PositionedYaml:
    data: Any
    positions: dict[Path, tuple[int, int]] = field(default_factory=dict)
    duplicates: list[tuple[Path, int, int]] = field(default_factory=list)

    def locate(self, path: Path) -> tuple[Path, tuple[int, int] | None]:
        """The longest prefix of ``path`` written in the file, and where it is (None: nowhere, e.g. a default)."""
        for end in range(len(path), 0, -1):
            pos = self.positions.get(path[:end])
            if pos is not None:
                return path[:end], pos
        return (), None


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _walk(node: yaml.Node, path: Path, out: PositionedYaml) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = (*path, key)
            if key in seen:
                out.duplicates.append((child, *_mark(key_node)))
            seen.add(key)
            out.positions[child] = _mark(key_node)
            _walk(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            out.positions[child] = _mark(item)
            _walk(item, child, out)


def load_with_positions(text: str) -> PositionedYaml:
    """Parse ``text``; raise YamlSyntaxError with the 1-based line and column of a syntax error."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        raise YamlSyntaxError(f"YAML syntax error: {problem}", line, col) from exc
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"YAML error: {exc}", None, None) from exc
    out = PositionedYaml(data)
    if root is not None:
        _walk(root, (), out)
    return out
