"""Safe YAML for configuration files: no anchors or aliases, bounded nesting and size.

PyYAML's ``SafeLoader`` never runs code, but it accepts anchors and aliases, with which a few
hundred bytes describe billions of nodes (a "billion laughs" alias bomb) or a structure that
contains itself; whatever walks the result then hangs or overflows the stack. Configuration
never needs them, so :func:`load_yaml` refuses them as the parser meets them, before any node
that uses them is built. It also refuses nesting deeper than ``max_depth``, input larger than
``max_bytes`` and duplicate mapping keys (YAML would silently keep the last). Everything it
does is linear in the size of the input::

    doc = load_yaml(text, source="project.yml")
    doc.data                    # dicts, lists, str, int, float, bool, None (and YAML dates)
    doc.lines["server.port"]    # line of a key path ("a.b[0].c"; "" is the top level)

:func:`dump_yaml` writes data the way :func:`load_yaml` reads it back (``yaml.safe_dump``
would write an anchor and an alias for a list or mapping that appears twice).

Every problem raises :class:`YAMLInputError`, a ``ValueError`` whose ``str`` is one line such
as ``project.yml:3: YAML anchors and aliases are not allowed (found anchor '&a')``; callers turn
it into their own error type. Imports nothing from fedctl, and PyYAML only when called.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

#: default limit on the input, in bytes (UTF-8)
MAX_BYTES = 1 << 20
#: default limit on nesting (mappings and lists inside each other)
MAX_DEPTH = 64


class YAMLInputError(ValueError):
    """YAML that is malformed or refused; ``str`` is ``source:line: [key: ]problem``."""

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.problem, self.source, self.line, self.key = problem, source, line, key
        where = ""
        if source:
            where = f"{source}:{line}: " if line else f"{source}: "
        super().__init__(f"{where}{key}: {problem}" if key else f"{where}{problem}")


class YAMLDocument(NamedTuple):
    """What :func:`load_yaml` returns: the data, and the line (1-based) of every key path."""

    data: Any
    lines: dict[str, int]


def load_yaml(
    text: str | bytes,
    *,
    source: str = "<yaml>",
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
) -> YAMLDocument:
    """Parse one YAML document with PyYAML's safe loader, refusing anchors, aliases, nesting
    deeper than ``max_depth``, more than ``max_bytes`` and duplicate keys.

    ``text`` may be bytes (decoded as UTF-8). An empty document gives ``data`` None. ``source``
    names the input in error messages. Keep ``max_depth`` in the low hundreds: the parser
    recurses once per level.
    """
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise YAMLInputError(f"too large ({size} bytes, limit {_size(max_bytes)})", source=source)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise YAMLInputError(f"not UTF-8 text (byte {exc.start})", source=source) from None

    import yaml

    loader = None
    try:
        loader = _loader_class()(text, source, max_depth)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except YAMLInputError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = f" (column {mark.column + 1})" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise YAMLInputError(
            f"YAML syntax error: {problem}{col}", source=source, line=line
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise YAMLInputError(
            f"YAML syntax error: unacceptable character #x{exc.character:04x}: {exc.reason}",
            source=source,
            line=line,
        ) from None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise YAMLInputError(f"YAML syntax error: {problem}", source=source) from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _walk(node, "", lines, source)
    return YAMLDocument(data, lines)


def dump_yaml(data: Any) -> str:
    """``data`` as block-style YAML, keys in their order, that :func:`load_yaml` reads back:
    ``yaml.safe_dump`` without anchors or aliases (a shared list is written out each time).
    ``data`` must not contain itself."""
    import yaml

    return yaml.dump(data, Dumper=_dumper_class(), sort_keys=False, allow_unicode=True)


@functools.cache
def _dumper_class() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return Dumper


def _size(n: int) -> str:
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def _walk(node: Any, path: str, out: dict[str, int], source: str) -> None:
    """Record the line of every key path; refuse duplicate keys. The node graph is a tree of
    bounded depth (aliases were refused), so this visits each node once."""
    import yaml

    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            child = f"{path}.{key}" if path else str(key)
            line = key_node.start_mark.line + 1
            if key is not None and key in seen:
                raise YAMLInputError(
                    f"duplicate key (first on line {seen[key]})",
                    source=source,
                    line=line,
                    key=child,
                )
            seen[key] = line
            out.setdefault(child, line)
            _walk(value_node, child, out, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, f"{path}[{i}]", out, source)


@functools.cache
def _loader_class() -> type:
    """A SafeLoader that checks every parser event as the composer takes it."""
    import yaml

    class Loader(yaml.SafeLoader):
        def __init__(self, stream: str, source: str, max_depth: int) -> None:
            super().__init__(stream)
            self.fedctl_source = source
            self.fedctl_max_depth = max_depth
            self.fedctl_depth = 0

        def fail(self, problem: str, event: Any) -> YAMLInputError:
            return YAMLInputError(
                problem, source=self.fedctl_source, line=event.start_mark.line + 1
            )

        def get_event(self) -> Any:
            # The composer takes every event through here, an alias before resolving it and
            # an anchored node before building it: nothing is expanded or built twice.
            event = super().get_event()
            if isinstance(event, yaml.AliasEvent):
                raise self.fail(
                    f"YAML anchors and aliases are not allowed (found alias '*{event.anchor}')",
                    event,
                )
            if getattr(event, "anchor", None) is not None:
                raise self.fail(
                    f"YAML anchors and aliases are not allowed (found anchor '&{event.anchor}')",
                    event,
                )
            if isinstance(event, yaml.CollectionStartEvent):
                self.fedctl_depth += 1
                if self.fedctl_depth > self.fedctl_max_depth:
                    raise self.fail(f"nested more than {self.fedctl_max_depth} levels deep", event)
            elif isinstance(event, yaml.CollectionEndEvent):
                self.fedctl_depth -= 1
            return event

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            # A value the safe constructor cannot convert (a date like 2024-13-45, an integer
            # of more digits than Python converts) raises ValueError; an explicitly tagged one
            # it does not parse at all (``!!timestamp x``, ``!!bool x``, ``!!int ""``) raises
            # AttributeError, KeyError or IndexError from inside PyYAML. Name its line.
            try:
                return super().construct_object(node, deep)
            except YAMLInputError:
                raise
            except (
                ValueError,
                TypeError,
                OverflowError,
                AttributeError,
                KeyError,
                IndexError,
            ) as exc:
                raise YAMLInputError(
                    f"invalid value: {exc}",
                    source=self.fedctl_source,
                    line=node.start_mark.line + 1,
                ) from None

    return Loader


__all__ = ["MAX_BYTES", "MAX_DEPTH", "YAMLDocument", "YAMLInputError", "dump_yaml", "load_yaml"]
