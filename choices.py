"""Choice fields of config dataclasses are `Literal` types: the config loader checks them with the
key's full name (configs/schema.py); `check_choices` is the same check for a dataclass built
directly in Python, called from its __post_init__."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Literal


def choices_of(hint) -> tuple:
    """A Literal field's allowed values (an optional one's too), else ()."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(c for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)) + \
        ((None,) if type(None) in args and any(typing.get_origin(a) is Literal for a in args) else ())


def check_choices(config) -> None:
    """ValueError naming the field when a Literal field holds a value outside its choices."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        allowed = choices_of(hints[f.name])
        value = getattr(config, f.name)
        if allowed and value not in allowed:
            shown = ", ".join(str(c) for c in allowed if c is not None)
            raise ValueError(f"{type(config).__name__}.{f.name}: {value!r} is not one of {shown}")
