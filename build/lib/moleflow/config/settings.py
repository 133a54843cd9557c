"""One declaration per setting: default, type (the annotation) and allowed range, on the dataclass field.

The config schema (``moleflow.config.schema``) registers these dataclasses with Hydra, so their
defaults and types are the configuration's; :func:`range_problems` checks the ranges, both for a
dataclass built in Python (``MoLEFlowConfig.validate``) and for a composed config
(``config/checks.py`` reads the same metadata), so a range is written once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any


def setting(
    default: Any,
    allowed: str | None = None,
    ok: Callable[[Any], bool] | None = None,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A dataclass field with its range: ``ok(value)`` holds (``allowed`` in words), or one of ``choices``."""
    if choices is not None:
        allowed = allowed or f"one of {list(choices)}"
        ok = ok or (lambda v, options=choices: v in options)
    return dataclasses.field(default=default, metadata={"allowed": allowed, "ok": ok, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Range:
    """The range of one setting, from its field's metadata; ``kind`` is int, float, str or bool."""

    name: str
    kind: type | None
    ok: Callable[[Any], bool]
    allowed: str
    nullable: bool
    choices: tuple[Any, ...] | None


def _kind(annotation: Any) -> tuple[type | None, bool]:
    """(int | float | str | bool | None, nullable) from a field annotation such as ``int | None``."""
    text = str(annotation).replace("typing.", "").replace(" ", "")
    nullable = "None" in text or text.startswith("Optional[")
    for kind in (bool, int, float, str):
        if kind.__name__ in text.replace("Optional[", "").replace("]", "").split("|"):
            return kind, nullable
    return None, nullable


def ranges(schema: type) -> Iterator[Range]:
    """Every field of ``schema`` that declares a range."""
    for f in dataclasses.fields(schema):
        if f.metadata.get("ok") is not None:
            kind, nullable = _kind(f.type)
            yield Range(f.name, kind, f.metadata["ok"], f.metadata["allowed"], nullable, f.metadata["choices"])


def value_problem(rng: Range, value: Any) -> str | None:
    """Why ``value`` is not allowed (without the key's name), or None."""
    shown = repr(value) if isinstance(value, str) else str(value)
    if value is None:
        return None if rng.nullable else f"must be {rng.allowed}, got None"
    if isinstance(value, bool) and rng.kind is not bool:
        return f"must be {rng.allowed}, got {value}"
    if rng.kind is int and not isinstance(value, int):  # 4.0 too: sizes and counts reach range() and nn.Linear
        return f"must be an integer {rng.allowed}, got {shown} ({type(value).__name__})"
    if rng.kind is float:
        if not isinstance(value, int | float):
            hint = " (write numbers like 1.0e-4 with a dot: YAML reads 1e-4 as text)" if isinstance(value, str) else ""
            return f"must be a number {rng.allowed}, got {shown}{hint}"
        if not math.isfinite(value):
            return f"must be a finite number {rng.allowed}, got {value}"
    if not rng.ok(value):
        return f"must be {rng.allowed}, got {shown}"
    return None


def range_problems(obj: Any, prefix: str) -> list[str]:
    """Every field of the dataclass instance ``obj`` outside its range, as ``"<prefix>.<name> must be ..."``."""
    out = []
    for rng in ranges(type(obj)):
        problem = value_problem(rng, getattr(obj, rng.name))
        if problem is not None:
            out.append(f"{prefix}.{rng.name} {problem}")
    return out
