"""One recipe value checked against its key's schema: coerced to the annotated type (YAML's `1e-3` string to a
float), then its choices, range and registry (`core/recipe.py` declares the keys with `key()`; this module
knows nothing of which keys exist). Every refusal is a `RecipeError` naming the dotted key.

This module must not import torch: `vae --help` and recipe checks stay fast.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import math
import types
import typing
from typing import Any

from vae_cli.core.errors import RecipeError

# integers beyond this are refused: seeds feed numpy (< 2**32) and torch, counts feed tensors
INT_LIMIT = 2**31 - 1


def registry_of(spec: str):
    """The Registry a key's values come from. Resolved by name when a value is checked, like a plugin
    entry point: the names live with the code that registers them (models, datasets, networks), and this
    bottom-layer module holds no list of them and no import of the layers above."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def check_value(dotted: str, value: Any, hint: Any, meta: dict) -> Any:
    """Coerce `value` to the annotated type or raise a RecipeError naming `dotted`."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise RecipeError(f"recipe key '{dotted}' must be {_a(base.__name__)}, not null")
    if typing.get_origin(base) is tuple:  # a list of names, each one of `choices` (train.loggers)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"recipe key '{dotted}' must be a list of names, e.g. [{', '.join(meta['choices'])}], "
                              f"got {value!r}")
        bad = [v for v in value if v not in meta["choices"]]
        if bad:
            close = difflib.get_close_matches(bad[0], meta["choices"], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"recipe key '{dotted}' takes {', '.join(meta['choices'])}, got '{bad[0]}'{hint}")
        return tuple(dict.fromkeys(value))  # in order, once each
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and abs(value) > INT_LIMIT:  # beyond what torch, numpy and the file formats hold
            raise RecipeError(f"recipe key '{dotted}' is out of range ({str(value)[:30]}...); "
                              f"use a value below {INT_LIMIT}")
    elif base is float:
        if isinstance(value, str):  # YAML reads 1e-3 as a string (YAML 1.1); accept what float() reads
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an integer too large for a float
            ok = False
        if ok and not math.isfinite(value):  # NaN passes every comparison, inf every lower bound
            raise RecipeError(f"recipe key '{dotted}' must be a finite number, got {value!r}")
    elif base is str:
        ok = isinstance(value, str)
        if ok and ("\x00" in value or len(value) > 4096):  # no path or name holds these
            raise RecipeError(f"recipe key '{dotted}' must be text without NUL characters, under 4096 characters")
    if not ok:
        raise RecipeError(f"recipe key '{dotted}' must be {_a(base.__name__)}"
                          f"{' or null' if optional else ''}, got {value!r} ({type(value).__name__})")
    if meta.get("registry"):
        reg = registry_of(meta["registry"])
        if value not in reg:
            raise RecipeError(reg.unknown(value))
    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    if choices is not None and value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise RecipeError(f"recipe key '{dotted}' must be one of {shown}, got {value!r}")
    if lo is not None and (value < lo or (meta.get("exclusive_min") and value == lo)):
        rel = ">" if meta.get("exclusive_min") else ">="
        raise RecipeError(f"recipe key '{dotted}' must be {rel} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise RecipeError(f"recipe key '{dotted}' must be <= {hi}, got {value!r}")
    return value
