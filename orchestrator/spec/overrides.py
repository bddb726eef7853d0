"""Dotted `key=value` overrides and the one-line-per-problem error messages."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.spec.common import FLOAT_RE, SpecError, _suggest
from orchestrator.spec.job import JobSpec
from orchestrator.spec.yamlparse import MAX_DEPTH, parse_yaml

# One part of a dotted key: a field, an option or a list index (`optim.betas.0`), never `a[0]` or `a b`.
_KEY_PART_RE = re.compile(r"[A-Za-z0-9_-]+")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its path and its YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError([f"{text}: an override must look like dotted.key=value"])
    if key.count(".") >= MAX_DEPTH:
        raise SpecError([f"{key[:40]}...: an override key nested more than {MAX_DEPTH} levels deep"])
    bad = next((part for part in key.split(".") if not _KEY_PART_RE.fullmatch(part)), None)
    if bad is not None:
        raise SpecError(
            [
                f"{key}: {bad!r} is not a key; an override key is dotted names (letters, digits, '_', '-'), e.g. optim.lr=3e-4"
            ]
        )
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and FLOAT_RE.match(value):
        value = float(value)  # YAML 1.1 reads 3e-4 as a string; every user means the number
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw job dict with each `dotted.key=value` set (sections are created as needed)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise SpecError([f"{'.'.join(path[: i + 1])}: is a value, not a section; cannot set {'.'.join(path)}"])
            node = child
        node[path[-1]] = value
    return out


def _section_fields(loc: tuple) -> list[str]:
    """Field names (and aliases) of the section at `loc` in JobSpec, for 'did you mean'."""
    model: Any = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann] + list(getattr(ann, "__args__", ()) or ())
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def format_errors(err: ValidationError) -> list[str]:
    """One line per problem, each starting with the dotted field path."""
    lines = []
    for e in err.errors():
        # pydantic names a union's member in the location (`function-after[...]`, `tuple[int, int]`): not a field.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        if e["type"] == "extra_forbidden" and e["loc"] and loc[-1:] != e["loc"][-1:]:
            loc = (*loc, e["loc"][-1])  # an unknown key that looks like such a member is still the key
        path = ".".join(str(p) for p in loc) or "(job)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown field{_suggest(str(loc[-1]), _section_fields(loc[:-1]))}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
            # A model validator names the field itself: "field: problem".
            head, sep, rest = msg.partition(": ")
            if sep and re.fullmatch(r"[a-z_][\w.]*( and [a-z_]\w*)?", head):
                prefix = ".".join(str(p) for p in loc)
                path = f"{prefix}.{head}" if prefix and not head.startswith(prefix) and "." not in head else head
                msg = rest
        lines.append(f"{path}: {msg}")
    return lines
