"""`--config FILE`: option values from a TOML file, merged by click itself.

The file becomes the command's `ctx.default_map`, so click takes each value from the command
line, else the option's environment variable, else the file, else the option's default.

Keys are the command's option names, with dashes or underscores (`cache-tokens = 4096`,
`initial_peers = ["/ip4/..."]`); a flag takes true or false, a repeatable option a list.
Keys at the top level are for every command reading the file that has such an option (a
`serve`-only key there is skipped by `join`); a table named after a command (`[serve]`,
`[join]`) is for that command only, wins over the top level, and is skipped by the others, so
one file can serve all the daemons of a machine. A key that no such command has, or a value of
the wrong type, is a usage error naming the key and the file.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_PARAM = "config"


def config_option(sections: Iterable[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The `--config FILE` option; `sections` names every command that reads such files."""
    known = tuple(sections)

    def load(ctx: click.Context, param: click.Parameter, path: Path | None) -> None:
        if path is not None:
            values = read_config(path, ctx, known)
            ctx.default_map = {**(ctx.default_map or {}), **values}

    return click.option(
        "--config",
        CONFIG_PARAM,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        metavar="FILE",
        is_eager=True,  # the file must be read before the options it sets are
        expose_value=False,
        callback=load,
        help="TOML file of option values (keys: option names; tables [serve], [join] for one "
        "command). The command line and environment variables win over it.",
    )


def read_config(path: Path, ctx: click.Context, sections: tuple[str, ...]) -> dict[str, Any]:
    """The values of `path` for `ctx`'s command, by parameter name, each checked."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise click.UsageError(f"{path}: cannot read it as TOML: {exc}") from None
    command = ctx.command.name or ""
    options = _options_by_key(ctx.command)
    siblings = _sibling_keys(ctx, sections, command)
    top = {k: v for k, v in data.items() if not (isinstance(v, dict) and k in sections)}
    values: dict[str, Any] = {}
    for where, table in (("", top), (f"[{command}] ", data.get(command, {}))):
        if not isinstance(table, dict):
            raise click.UsageError(f"{path}: {command} must be a table, like [{command}]")
        given: set[str] = set()
        for key, value in table.items():
            param = options.get(key.replace("-", "_"))
            if param is None and not where and key.replace("-", "_") in siblings:
                continue  # a top-level key for another command that reads this file
            if param is None:
                raise click.UsageError(
                    f"{path}: {where}{_unknown(key, command, options, data, sections)}"
                )
            if param.name in given:
                raise click.UsageError(f"{path}: {where}{key}: that option is given twice")
            given.add(param.name)
            _check(ctx, param, value, f"{path}: {where}{key}")
            values[param.name] = value
    return values


def _sibling_keys(ctx: click.Context, sections: tuple[str, ...], command: str) -> set[str]:
    """The option keys of the other commands that read such files (`serve` for `join`...)."""
    group = ctx.parent.command if ctx.parent is not None else None
    keys: set[str] = set()
    for name in sections:
        other = group.get_command(ctx.parent, name) if isinstance(group, click.Group) else None
        if other is not None and name != command:
            keys |= set(_options_by_key(other))
    return keys


def _options_by_key(command: click.Command) -> dict[str, click.Option]:
    """Each option of `command` under every spelling of its long names, with underscores."""
    by_key: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in (CONFIG_PARAM, "help"):
            for opt in param.opts:
                if opt.startswith("--"):
                    by_key[opt[2:].replace("-", "_")] = param
    return by_key


def _unknown(
    key: str, command: str, options: dict[str, click.Option], data: dict, sections: tuple[str, ...]
) -> str:
    if isinstance(data.get(key), dict):
        tables = " or ".join(f"[{s}]" for s in sections)
        return f"unknown table [{key}] (a table holds the options of one command: {tables})"
    message = f"{key!r} is not an option of peerd {command}"
    close = difflib.get_close_matches(key.replace("-", "_"), list(options), n=1)
    if close:
        message += f" (did you mean {close[0].replace('_', '-')!r}?)"
    return message


def _check(ctx: click.Context, param: click.Option, value: Any, where: str) -> None:
    """A usage error unless `value` is of the option's type and passes its own checks."""
    kind, ok = _expected(param)
    if param.multiple:
        kind = f"a list of {kind}s"
        good = isinstance(value, list) and all(ok(v) for v in value)
    else:
        kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        good = ok(value)
    if not good:
        raise click.UsageError(f"{where}: expected {kind}, got {value!r}")
    try:
        checked = param.type_cast_value(ctx, value)
        if param.callback is not None:
            param.callback(ctx, param, checked)
    except click.BadParameter as exc:
        raise click.UsageError(f"{where}: {exc.message}") from None


def _expected(param: click.Option) -> tuple[str, Callable[[Any], bool]]:
    """What one TOML value of `param` must be: a name for it and its test."""
    if param.is_flag:
        return "boolean (true or false)", lambda v: isinstance(v, bool)
    if isinstance(param.type, click.types.IntParamType):
        return "integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(param.type, click.types.FloatParamType):
        return "number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return "string", lambda v: isinstance(v, str)
