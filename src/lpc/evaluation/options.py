"""``RUN key=value ...``: the one command-line convention of the post-training commands (``lpc-generate``,
``lpc-evaluate``, ``lpc-export``, ``lpc-steer``), parsed here into each command's typed options dataclass.

A command's options are a dataclass whose fields are declared with :func:`option`: a default, a help line and
what is allowed (a check, or a set of choices). :func:`parse_command` splits the run from the options, converts
each ``key=value`` to its field's type and refuses an unknown key or a bad value with the key, the value and
what is allowed; :func:`options_from` does the same for values that are already typed (the training config's
``eval`` node); :func:`usage` writes every command's ``--help`` in one format from the same declarations.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lpc.errors import UsageError

NULLS = ("null", "none")
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a text"}


def option(
    default: Any = None,
    help: str = "",
    allowed: str | None = None,
    check: Callable[[Any], bool] | None = None,
    choices: tuple | Callable[[], tuple] | None = None,
    repeat: bool = False,
    sep: str | None = None,
):
    """A field of a command's options. ``allowed`` says in words what ``check`` accepts; ``choices`` (or a
    function giving them) are the only values; a list field takes ``repeat`` (each ``key=value`` adds one item)
    or ``sep`` (a value is split on it, e.g. ``tasks=a,b``)."""
    meta = {"help": help, "allowed": allowed, "check": check, "choices": choices, "repeat": repeat, "sep": sep}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_option(arg: str) -> bool:
    """An argument is an option when it has ``=`` and is not an existing path, so run directories named by a
    sweep (``codebook=64,seed=0``) are read as the run."""
    return "=" in arg and not Path(arg).exists()


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any, bool]]:
    """``name -> (field, base type, optional)`` with ``Optional[X]`` unwrapped."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint, optional = hints[f.name], False
        args = typing.get_args(hint)
        if type(None) in args:
            optional, hint = True, next(a for a in args if a is not type(None))
        out[f.name] = (f, hint, optional)
    return out


def _choices(meta) -> tuple | None:
    choices = meta["choices"]
    return tuple(choices()) if callable(choices) else choices


def allowed_text(f: dataclasses.Field, kind, optional: bool) -> str:
    """What a field accepts, in words (the error messages and ``--help`` say the same)."""
    meta = f.metadata
    if _choices(meta) is not None:
        text = f"one of {_choices(meta)}"
    elif meta["allowed"]:
        text = meta["allowed"]
    elif typing.get_origin(kind) is list:
        text = "a list of texts" + (f" (separated by {meta['sep']!r})" if meta["sep"] else "")
    else:
        text = _KIND.get(kind, str(kind))
    return text + (" or null" if optional else "")


def _scalar(value, kind):
    """``value`` (a string from the command line, or already typed) as ``kind``; ValueError if it is not one."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE + FALSE:
            return value.lower() in TRUE
        raise ValueError(value)
    if isinstance(value, bool) or (kind is not str and not isinstance(value, (str, int, float))):
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(value)


def convert(key: str, value, f: dataclasses.Field, kind, optional: bool, error=UsageError):
    """One field's value, converted and checked; ``error`` names ``key``, ``value`` and what is allowed."""
    meta = f.metadata

    def refuse():
        return error(f"{key}={value!r} is not allowed: {allowed_text(f, kind, optional)}")

    if value is None or (optional and isinstance(value, str) and value.lower() in NULLS):
        if optional:
            return None
        raise refuse()
    if typing.get_origin(kind) is list:
        items = value.split(meta["sep"]) if isinstance(value, str) and meta["sep"] else value
        items = [items] if isinstance(items, str) else list(items)
        return [str(v).strip() for v in items if str(v).strip()]
    try:
        converted = _scalar(value, kind)
    except (TypeError, ValueError):
        raise refuse() from None
    choices = _choices(meta)
    if (choices is not None and converted not in choices) or (meta["check"] and not meta["check"](converted)):
        raise refuse()
    return converted


def options_from(cls, values: dict, error=UsageError, prefix: str = ""):
    """``cls`` from ``values`` (strings or typed values), every key and value checked."""
    fields = _fields(cls)
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise error(f"unknown argument {prefix + unknown[0]!r}; allowed: {', '.join(fields)}")
    kwargs = {k: convert(f"{prefix}{k}", v, *fields[k], error=error) for k, v in values.items()}
    return cls(**kwargs)


def parse_command(argv: list[str], cls, error=UsageError, run: str = "RUN", prefix: str = "") -> tuple[Path, Any]:
    """``RUN key=value ...`` -> ``(Path(RUN), cls(...))``; a repeated key adds to a ``repeat`` list field,
    another repeated key keeps its last value. ``prefix``: how errors name a key (``eval.`` for lpc-evaluate,
    whose options are also the training config's ``eval`` node)."""
    positional = [a for a in argv if not is_option(a)]
    if len(positional) != 1:
        raise error(f"expected exactly one {run} (a run directory, its final/ or a checkpoint), got {positional}")
    fields, values = _fields(cls), {}
    for arg in argv:
        if not is_option(arg):
            continue
        key, value = arg.lstrip("+").split("=", 1)
        if key in fields and fields[key][0].metadata["repeat"]:
            values.setdefault(key, []).append(value)
        else:
            values[key] = value
    return Path(positional[0]), options_from(cls, values, error, prefix)


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def usage(cls, doc: str, command: str, run: str = "RUN", prefix: str = "") -> str:
    """``--help``: the command's description (its module docstring), then two lines per option: what it does,
    then what is allowed and its default, from the options dataclass."""
    lines = [doc.strip(), "", f"usage: {command} {run} key=value ...", "", "options (key=value):"]
    if prefix:
        lines[-1:-1] = [f"(each option is also the training config's {prefix}<key>)", ""]
    for name, (f, kind, optional) in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        lines.append(f"  {name:<20} {f.metadata['help']}")
        lines.append(f"  {'':<20}   {allowed_text(f, kind, optional)}; default: {shown}")
    return "\n".join(lines)
