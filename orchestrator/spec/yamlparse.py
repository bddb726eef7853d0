"""Strict YAML: no duplicate keys, no recursive or exploding aliases, no runaway nesting or numbers."""

from __future__ import annotations

from typing import Any

import yaml

# Anchors and aliases are fine for reuse, but a few KB of nested aliases ("billion laughs") expand
# into gigabytes once the job is dumped (run.json, a ConfigMap): cap the expanded node count.
MAX_EXPANDED_NODES = 100_000
# PyYAML composes and constructs recursively: a few KB of `[[[[...` exhaust the interpreter's stack.
# A job is a handful of levels deep; config and options may nest a few more.
MAX_DEPTH = 50
# Python refuses to turn more than 4300 digits into an int (and json.dumps the other way); no field
# or option needs more than a few dozen.
MAX_INT_DIGITS = 100


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` entries may be overridden by the mapping's own keys
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # an unhashable key; the base class reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (the later one would silently win)", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark
            )
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_yaml_int(self, node):
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits; at most {MAX_INT_DIGITS} fit", node.start_mark
            )
        return super().construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes the document holds once every alias is expanded (aliases share node objects)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise yaml.YAMLError("a recursive alias (an anchor used inside itself)")
    active.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo, active) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active) for k, v in node.value)
    active.discard(key)
    memo[key] = min(size, MAX_EXPANDED_NODES + 1)  # saturate: the bound is all that matters
    return memo[key]


def parse_yaml(text: str) -> Any:
    """Parse one YAML document strictly: no duplicate keys, no recursive or exploding aliases (yaml.YAMLError)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_EXPANDED_NODES:
            raise yaml.YAMLError(
                f"aliases expand to more than {MAX_EXPANDED_NODES} values; write the values out or use fewer aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()
