"""Click options made from dataclass fields, so each option's default, help and spelling are
stated once: in the field, as `dataclasses.field(default=..., metadata={...})`.

A field is an option when its metadata has `help`. The metadata keys:

  help      the option's help text (required)
  flag      its spelling, e.g. "--cache-mib" (default: --field-name)
  envvar    an environment variable read when the option is not on the command line
  metavar   the placeholder shown in --help
  choices   the allowed strings of a str field
  min, max  the inclusive range of an int or float field
  path      "dir" or "file": what a Path field must name (when it exists)
  scale     the option counts units of this many field units (--cache-mib: 2**20 bytes)
  negate    a bool field whose default is True and whose flag turns it off (--no-relay)
  parse     a function str -> value (ValueError: bad input), for any other field type
  hidden    leave the option out of --help

Field types: int, float, str, bool (a flag), Path, `X | None`, and `list[X]` (a repeatable
option). The option's name, as click, the environment and a `--config` file see it, is the flag's
(--cache-mib: `cache_mib`), so a unit-scaled value is never mistaken for the field's own unit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click

METADATA_KEYS = frozenset(
    {"help", "flag", "envvar", "metavar", "choices", "min", "max", "path", "scale", "negate"}
    | {"parse", "hidden"}
)

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def option_fields(cls: type, only: Iterable[str] | None = None) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that are command-line options (those with `help`)."""
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    if only is None:
        return fields
    wanted = set(only)
    missing = wanted - {f.name for f in fields}
    if missing:
        raise TypeError(f"{cls.__name__} has no option fields {sorted(missing)}")
    return [f for f in fields if f.name in wanted]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def param_name(f: dataclasses.Field) -> str:
    """The click parameter's name: the flag's, with underscores."""
    return flag_of(f).lstrip("-").replace("-", "_")


def field_default(f: dataclasses.Field) -> Any:
    """The value a dataclass built without `f` gets (an option needs one)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"option field {f.name!r} needs a default")


def to_option(f: dataclasses.Field, value: Any) -> Any:
    """A field value as the option would spell it (the option's default is the field's)."""
    if value is None:
        return None
    if f.metadata.get("negate"):
        return not value
    scale = f.metadata.get("scale")
    if scale is not None:
        if value % scale:
            raise TypeError(f"{f.name}={value} is not a whole number of {scale}s")
        return value // scale
    if isinstance(value, list):
        return tuple(value)
    return value


def from_option(cls: type, f: dataclasses.Field, value: Any) -> Any:
    """An option's value as field `f` of `cls` holds it."""
    if value is None:
        return None
    if f.metadata.get("negate"):
        return not value
    scale = f.metadata.get("scale")
    if scale is not None:
        return value * scale
    if isinstance(value, tuple) and _unwrap(cls, f)[1]:
        return list(value)
    return value


def dataclass_options(cls: type, only: Iterable[str] | None = None) -> Decorator:
    """Decorate a command with one click option per option field of `cls`, in field order."""
    options = [make_option(cls, f) for f in option_fields(cls, only)]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def field_values(
    cls: type, params: Mapping[str, Any], only: Iterable[str] | None = None
) -> dict[str, Any]:
    """The option fields of `cls` (by field name) from a command's parameter values."""
    return {f.name: from_option(cls, f, params[param_name(f)]) for f in option_fields(cls, only)}


def make_option(cls: type, f: dataclasses.Field) -> Decorator:
    """The click option of field `f` of `cls`; a TypeError names metadata that cannot work."""
    meta = f.metadata
    unknown = set(meta) - METADATA_KEYS
    if unknown:
        raise TypeError(f"{cls.__name__}.{f.name}: unknown option metadata {sorted(unknown)}")
    base, multiple = _unwrap(cls, f)
    default = to_option(f, field_default(f))
    kwargs: dict[str, Any] = {
        "help": meta["help"],
        "default": default,
        "show_default": default is not None and default is not False and default != (),
        "envvar": meta.get("envvar"),
        "metavar": meta.get("metavar"),
        "hidden": meta.get("hidden", False),
        "multiple": multiple,
    }
    if base is bool:
        if default is not False:
            raise TypeError(f"{cls.__name__}.{f.name}: a flag defaults to off (use negate)")
        kwargs.update(is_flag=True, show_default=False)
    elif "parse" in meta:
        kwargs["callback"] = _parse_callback(meta["parse"])
    else:
        kwargs["type"] = _click_type(cls, f, base)
    return click.option(flag_of(f), param_name(f), **kwargs)


def _unwrap(cls: type, f: dataclasses.Field) -> tuple[Any, bool]:
    """(the type of one value, whether the option repeats) of field `f` of `cls`."""
    hint = typing.get_type_hints(cls)[f.name]  # resolves `from __future__` string annotations
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _click_type(cls: type, f: dataclasses.Field, base: Any) -> click.ParamType:
    meta, where = f.metadata, f"{cls.__name__}.{f.name}"
    bounds = {k: meta[k] for k in ("min", "max") if k in meta}
    if bounds and base not in (int, float):
        raise TypeError(f"{where}: min/max need an int or float field")
    if "choices" in meta and base is not str:
        raise TypeError(f"{where}: choices need a str field")
    if base is int:
        return click.IntRange(**bounds) if bounds else click.INT
    if base is float:
        return click.FloatRange(**bounds) if bounds else click.FLOAT
    if base is str:
        return click.Choice(meta["choices"]) if "choices" in meta else click.STRING
    if base is Path:
        kind = meta.get("path")
        return click.Path(file_okay=kind != "dir", dir_okay=kind != "file", path_type=Path)
    raise TypeError(f"{where}: no option type for {base!r}; give metadata 'parse'")


def _parse_callback(parse: Callable[[str], Any]) -> Callable[..., Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback
