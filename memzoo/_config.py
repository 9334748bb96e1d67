"""YAML loading and field-type checks shared by the model and run configs."""

from __future__ import annotations

import dataclasses
import re

import yaml

__all__ = ["check_field_types", "load_yaml"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 3e-3 and 1e5 as floats (plain YAML 1.1 wants 3.0e-3)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str):
    """Parse YAML safely (no object construction), with scientific-notation floats."""
    return yaml.load(text, Loader=_Loader)


_SIMPLE = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "list": (list, tuple),
    "dict": (dict,),
}


def check_field_types(instance, where: str) -> None:
    """TypeError naming the field when a dataclass field holds a value of the wrong kind
    (annotations such as "int", "float", "str | None"; bools are not ints here)."""
    for field in dataclasses.fields(instance):
        kinds = [k.strip() for k in str(field.type).split("|")]
        value = getattr(instance, field.name)
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in _SIMPLE.get(k, ()))
        if not allowed:
            continue
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            raise TypeError(
                f"{where}.{field.name} must be {str(field.type)}, got {value!r} "
                f"({type(value).__name__})"
            )
