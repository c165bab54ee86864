"""The hardened YAML loader every config goes through.

PyYAML implements YAML 1.1, where "1e-3" is a string. Users mean a number, so our
loader resolves it as a float; it also rejects duplicate keys (PyYAML silently
lets the last one win) and bounds a document's size and depth with every alias
expanded. Every error is a ConfigError naming the source and line.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict

import yaml

from ..errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader with our own resolvers and constructors (the global one is left alone)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# Limits that keep a small hostile or mistaken file from becoming a huge or endless
# load: aliases may repeat a subtree (YAML's "billion laughs"), so the size is
# counted with every alias expanded, as every later walk of the config sees it.
MAX_CONFIG_BYTES = 256 << 10  # a config file is read only up to this size (checked before parsing; ~3 s to parse)
MAX_YAML_DEPTH = 64  # nested lists/mappings, aliases expanded
MAX_YAML_NODES = 100_000  # values in the document, aliases expanded


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are plain scalars, without duplicates; merge keys (``<<: *base``) are
    merged first, and the mapping's own keys override the merged ones, as YAML specifies."""
    seen: Dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _compose_node(self: Any, parent: Any, index: Any) -> Any:
    """PyYAML's composer recurses once per nesting level: stop at MAX_YAML_DEPTH, before Python's stack does."""
    depth = getattr(self, "_hpcfl_depth", 0)
    if depth >= MAX_YAML_DEPTH and not self.check_event(yaml.AliasEvent, yaml.ScalarEvent):
        raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                          self.peek_event().start_mark)
    self._hpcfl_depth = depth + 1
    try:
        return yaml.composer.Composer.compose_node(self, parent, index)
    finally:
        self._hpcfl_depth = depth


def _compose_document(self: Any) -> Any:
    node = yaml.composer.Composer.compose_document(self)
    _check_expansion(node)
    return node


_Loader.compose_node = _compose_node  # type: ignore[method-assign]
_Loader.compose_document = _compose_document  # type: ignore[method-assign]


def _check_expansion(root: Any) -> None:
    """Size and depth of the document with every alias expanded, counted once per distinct node."""
    size: Dict[int, int] = {}
    depth: Dict[int, int] = {}
    stack = [(root, False)]
    on_path = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"holds more than {MAX_YAML_NODES} values (aliases expanded); a config is limited to that", node.start_mark)
            if depth[key] > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)", node.start_mark)
            continue
        if key in size:
            continue
        if key in on_path:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it",
                                              node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def _children(node: Any) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """One YAML document with our resolvers; every error is a ConfigError naming the source and line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}:{where}: invalid YAML: {problem}") from None
    except RecursionError:  # a structure built past the limits (it should not get here)
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None


def read_config_text(path: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    """A config file's text: read as bytes (at most ``limit``, checked before parsing), decoded as UTF-8."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise ConfigError(f"{path}: {os.fstat(f.fileno()).st_size} bytes; a config file may have at most "
                                  f"{limit} bytes (is it the right file?)")
            data = f.read(limit + 1)
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError(f"{path}: more than {limit} bytes; a config file may have at most {limit} bytes")
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file (it holds NUL bytes), not a YAML config")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                          "a config must be a UTF-8 YAML file") from None
