"""YAML as antisd's config files are read: YAML 1.2 booleans (only true/false; `on`, `off`, `yes`, `no` stay
strings, so `thinking: on` or `--set update.gate=off` mean what they say), no repeated keys (a repeated key would
silently keep the last value), never a Python object (a SafeLoader), and one-line problem descriptions for errors.

This module reads text only; which keys a file may hold is its reader's business.
"""

from __future__ import annotations

import re

import yaml

YAMLError = yaml.YAMLError  # what safe_load raises

class _Yaml12BoolLoader(yaml.SafeLoader):
    """SafeLoader whose booleans are only true/false (YAML 1.2)."""


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A YAML mapping whose keys are all different."""
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Yaml12BoolLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def safe_load(text: str):
    """yaml.safe_load with YAML 1.2 booleans and no repeated keys; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Yaml12BoolLoader)  # a SafeLoader subclass: never constructs Python objects


def problem(exc: yaml.YAMLError) -> str:
    """One line: the problem and where (`found duplicate key 'lr' (first at line 3), line 5`)."""
    found = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if found is None:
        return str(exc).splitlines()[0]
    return f"{found}, line {mark.line + 1}" if mark is not None else found
