"""Read YAML (or JSON) documents and remember the line of every key and list item.

``load_document`` returns ``(data, lines)`` where ``lines[path]`` is the 1-based line of the
value at ``path`` (a tuple of mapping keys and list indices). Duplicate mapping keys, which
PyYAML would silently overwrite, are an error. Only ``yaml.SafeLoader`` is used: no Python
objects are ever constructed from input.
"""
from __future__ import annotations

import reprlib
from pathlib import Path

import re

import yaml

from .errors import SpecError

Path_ = tuple


MAX_DEPTH = 64  # no spec nests anywhere near this deep; deeper input is rejected, not recursed into


def _key_id(key_node):
    """What makes two mapping keys the same key: resolved tag and text (``1`` and ``"1"`` differ)."""
    if isinstance(key_node, yaml.ScalarNode):
        return (key_node.tag, key_node.value)
    return None


def _walk(node, path: tuple, lines: dict, file: str | None, active: set, done: set) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in active:
        raise SpecError("recursive YAML alias (a value that contains itself)", file=file,
                        line=node.start_mark.line + 1, field=_dotted(path) or None)
    if id(node) in done:  # an alias of a node already walked: do not expand it again
        return
    if len(path) > MAX_DEPTH:
        raise SpecError(f"nested more than {MAX_DEPTH} levels deep", file=file,
                        line=node.start_mark.line + 1, field=None)
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            kid = _key_id(key_node)
            if kid is not None and kid in seen and key != "<<":
                raise SpecError(f"duplicate key {key!r}", file=file,
                                line=key_node.start_mark.line + 1, field=_dotted(path + (key,)))
            seen.add(kid)
            lines.setdefault(path + (key,), key_node.start_mark.line + 1)
            _walk(value_node, path + (key,), lines, file, active, done)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, file, active, done)
    active.discard(id(node))
    done.add(id(node))


def plain(name) -> str:
    """A name as written when it prints safely on one line, else its bounded repr."""
    if isinstance(name, str) and 0 < len(name) <= 80 and name.isprintable():
        return name
    return show(name)


def _dotted(path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int) and not isinstance(p, bool):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + plain(p)
    return out


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxlevel = 3
_REPR.maxlong = 40


def show(value) -> str:
    """``repr`` for error messages, bounded in size (input can hold huge or aliased structures)."""
    try:
        return _REPR.repr(value)
    except Exception:  # pragma: no cover - a repr that fails must not hide the real error
        return f"<{type(value).__name__}>"


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-05``), as JSON and YAML 1.2
    do; PyYAML's YAML 1.1 rules would make them strings, so JSON plans would not load back."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def loads_document(text: str, file: str | None = None):
    """Parse YAML text; return ``(data, lines)``. Raises SpecError on syntax errors."""
    lines: dict = {}
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = None
        if node is not None:
            # Check the node graph (duplicate keys, recursive aliases) before constructing data.
            _walk(node, (), lines, file, set(), set())
            data = _construct(node, file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = e.problem or e.context or "invalid YAML"
        raise SpecError(f"YAML syntax error: {_one_line(problem)}", file=file, line=line) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, lone surrogates, ...)
        line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else None
        ch = e.character
        what = f"U+{ch:04X}" if isinstance(ch, int) else repr(ch)
        raise SpecError(f"YAML syntax error: character {what} is not allowed in YAML", file=file,
                        line=line) from None
    except yaml.YAMLError as e:  # pragma: no cover - other YAML errors carry no mark
        raise SpecError(f"YAML error: {_one_line(e)}", file=file) from None
    except RecursionError:
        raise SpecError("YAML nested too deeply", file=file) from None
    return data, lines


def _construct(node, file):
    """Build Python data from a composed node (what ``yaml.safe_load`` does, in one step)."""
    try:
        return _Loader("").construct_document(node)
    except (yaml.YAMLError, RecursionError):
        raise
    except Exception:
        # PyYAML's constructors raise bare ValueError/IndexError/KeyError/TypeError on some
        # explicitly tagged or out-of-range scalars (``!!int ''``, ``!!bool x``, ``2020-02-30``).
        bad = _bad_scalar(node)
        if bad is None:  # pragma: no cover - every failure found so far is a scalar
            raise SpecError("YAML value that cannot be read", file=file) from None
        tag = bad.tag.rpartition(":")[2] if bad.tag.startswith("tag:yaml.org,2002:") else bad.tag
        raise SpecError(f"YAML syntax error: {show(bad.value)} is not a valid {tag}", file=file,
                        line=bad.start_mark.line + 1) from None


def _bad_scalar(root):
    """The first scalar node under ``root`` that PyYAML's safe constructor cannot build."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                _Loader("").construct_object(node)
            except Exception:
                return node
        elif isinstance(node, yaml.MappingNode):
            for k, v in reversed(node.value):
                stack += [v, k]
        elif isinstance(node, yaml.SequenceNode):
            stack += list(reversed(node.value))
    return None


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
        """The line of the deepest part of ``path`` the document has (a number in the path may be
        a mapping key, which the lines hold as written: ``by_tp: {2: ...}`` is under "2")."""
        prefix, found = (), self.lines.get(())
        for part in path:
            keys = (part, str(part)) if isinstance(part, (int, float)) and not isinstance(part, bool) else (part,)
            key = next((prefix + (k,) for k in keys if prefix + (k,) in self.lines), None)
            if key is None:
                break
            prefix, found = key, self.lines[key]
        return found

    def error(self, path, message: str) -> SpecError:
        return SpecError(message, file=self.file, line=self.line(path), field=_dotted(path) or None)

    def within(self, prefix: tuple) -> "Locator":
        """A Locator for the sub-document at ``prefix`` (a plan's ``cluster`` section is a cluster
        spec): its paths are relative to it, its errors name the whole path."""
        return _Within(self, tuple(prefix))


class _Within(Locator):
    def __init__(self, outer: Locator, prefix: tuple):
        super().__init__(outer.file, outer.lines)
        self.outer, self.prefix = outer, prefix

    def line(self, path) -> int | None:
        return self.outer.line(self.prefix + tuple(path))

    def error(self, path, message: str) -> SpecError:
        return self.outer.error(self.prefix + tuple(path), message)


# ---- editing a document in place -------------------------------------------------------

def dumps(data, flow: bool | None = None) -> str:
    """YAML text of plain data: mappings of scalars on one line (``flow`` None), all in flow
    style (True, one line) or all in block style (False). Key order is kept."""
    return yaml.safe_dump(data, default_flow_style=flow, sort_keys=False, allow_unicode=True,
                          width=float("inf") if flow else 100)


def set_entry(text: str, path: tuple, value, file: str | None = None) -> tuple[str, bool]:
    """``text``, one YAML document with a mapping at the top, with the mapping entry at ``path``
    (a tuple of string keys) set to ``value`` (plain data), and whether everything else was kept
    byte for byte: comments, key order, quoting and layout outside the entry. Mappings missing on
    the way are created, a null on the way is replaced by one.

    The edit is made on the text, at the places PyYAML's marks give, then checked: the result
    must read back as the original data with only that entry changed. When it does not (aliases
    into the path, exotic layouts), the whole document is written anew from the data instead, and
    comments are lost (second value False). SpecError when the text is not YAML or something on
    the path is neither a mapping nor null."""
    data, _ = loads_document(text, file)
    expected = _with_entry(data, path, value, file)
    try:
        edited = _splice(text, yaml.compose(text, Loader=_Loader), tuple(path), value)
        if edited is not None and loads_document(edited, file)[0] == expected:
            return edited, True
    except (SpecError, yaml.YAMLError):
        pass
    return dumps(expected), False


def _copy(data):
    """A deep copy that does not keep aliases shared (an edit through one must not show in the other)."""
    if isinstance(data, dict):
        return {k: _copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy(v) for v in data]
    return data


def _with_entry(data, path, value, file):
    root = {} if data is None else _copy(data)
    node = root
    for depth, key in enumerate(path):
        if not isinstance(node, dict):
            raise SpecError(f"expected a mapping, got {show(node)}", file=file,
                            field=_dotted(path[:depth]) or None)
        if depth == len(path) - 1:
            node[key] = value
        else:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
    return root


def _nested(path, value):
    for key in reversed(path):
        value = {key: value}
    return value


def _is_null(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _block(node) -> bool:
    return isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value


def _end(node, text: str) -> int:
    """Where the node's own text ends: after its last character, not after trailing blank lines."""
    if _block(node):
        last = node.value[-1]
        return _end(last[1] if isinstance(node, yaml.MappingNode) else last, text)
    start, end = node.start_mark.index, node.end_mark.index
    while end > start and text[end - 1] in " \t\r\n":
        end -= 1
    return end


def _indent(s: str, col: int) -> str:
    return ("\n" + " " * col).join(s.splitlines())


def _splice(text: str, root, path: tuple, value) -> str | None:
    """The text with the entry set, or None when the layout is not one this handles."""
    if root is None or _is_null(root):
        return text.rstrip("\n") + ("\n" if text.strip() else "") + dumps(_nested(path, value))
    node = root
    for depth, key in enumerate(path):
        if not isinstance(node, yaml.MappingNode):
            return None
        found = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        rest = path[depth + 1:]
        if found is None:                                          # add key: value here
            return _insert(text, node, key, _nested(rest, value))
        if not rest or _is_null(found):                            # replace found by the value
            return _replace(text, found, _nested(rest, value))
        node = found
    return None


def _replace(text: str, node, value) -> str:
    start, end = node.start_mark.index, _end(node, text)
    if _block(node) and isinstance(value, (dict, list)) and value:
        new = _indent(dumps(value).rstrip("\n"), node.start_mark.column)
    else:
        new = dumps(value, flow=True).rstrip("\n").removesuffix("\n...")
        if start == end and start > 0 and text[start - 1] not in " \t\n":   # an empty null: "key:"
            new = " " + new
    return text[:start] + new + text[end:]


def _insert(text: str, mapping, key, value) -> str:
    entry = {key: value}
    if mapping.flow_style or not mapping.value:                    # {a: 1} or {}
        close = mapping.end_mark.index - 1
        if text[close] != "}":
            return None
        new = dumps(entry, flow=True).strip()[1:-1]
        if mapping.value:
            at = _end(mapping.value[-1][1], text)
            return text[:at] + ", " + new + text[at:]
        return text[:close] + new + text[close:]
    col = mapping.value[0][0].start_mark.column
    at = text.find("\n", _end(mapping, text))                      # end of the last entry's line
    if at < 0:
        return text + "\n" + " " * col + _indent(dumps(entry).rstrip("\n"), col) + "\n"
    return text[:at] + "\n" + " " * col + _indent(dumps(entry).rstrip("\n"), col) + text[at:]
