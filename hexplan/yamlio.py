"""Read YAML (or JSON) documents and remember the line of every key and list item.

``load_document`` returns ``(data, lines)`` where ``lines[path]`` is the 1-based line of the
value at ``path`` (a tuple of mapping keys and list indices). Duplicate mapping keys, which
PyYAML would silently overwrite, are an error. Only ``yaml.SafeLoader`` is used: no Python
objects are ever constructed from input.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import SpecError

Path_ = tuple


def _walk(node, path: tuple, lines: dict, file: str | None) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in seen:
                raise SpecError(f"duplicate key {key!r}", file=file,
                                line=key_node.start_mark.line + 1, field=_dotted(path + (key,)))
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, path + (key,), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, file)


def _dotted(path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def loads_document(text: str, file: str | None = None):
    """Parse YAML text; return ``(data, lines)``. Raises SpecError on syntax errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = e.problem or e.context or "invalid YAML"
        raise SpecError(f"YAML syntax error: {problem}", file=file, line=line) from None
    except yaml.YAMLError as e:  # pragma: no cover - other YAML errors carry no mark
        raise SpecError(f"YAML error: {e}", file=file) from None
    lines: dict = {}
    if node is not None:
        _walk(node, (), lines, file)
    return data, lines


def load_document(path) -> tuple:
    """Read a YAML/JSON file; return ``(data, lines)``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("file not found", file=str(path)) from None
    except IsADirectoryError:
        raise SpecError("is a directory, expected a file", file=str(path)) from None
    except UnicodeDecodeError:
        raise SpecError("not a UTF-8 text file", file=str(path)) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}", file=str(path)) from None
    return loads_document(text, file=str(path))


class Locator:
    """Builds SpecErrors that carry file, line and dotted field name for a path."""

    def __init__(self, file: str | None, lines: dict):
        self.file = file
        self.lines = lines

    def line(self, path) -> int | None:
        path = tuple(path)
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)

    def error(self, path, message: str) -> SpecError:
        return SpecError(message, file=self.file, line=self.line(path), field=_dotted(path) or None)
