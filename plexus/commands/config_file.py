"""``--config plexus.yaml``: a command's options read from a YAML file.

The file is a mapping of option names to values, e.g. ``max-tokens: 64`` (dashes or
underscores), plus optional per-command sections (``generate:``, ``serve:``, ``bench:``) whose
keys apply to that command only, and the ``pool:`` section that ``plexus plan`` reads (skipped
here). Precedence is command line > file > built-in default: the file only fills click's
``default_map``, so a flag given on the command line always wins.

Keys are checked against the running command's own options, so a typo is an error naming the
key and the file rather than a silently ignored setting. Values are checked with the option's
own click type, so a bad value also names the file and key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import click

CONFIG_ENVVAR = "PLEXUS_CONFIG"
# top-level sections that describe the machines rather than a command's options (``plexus plan``
# reads the memory of each host's slots from ``pool:``); the other commands skip them
SHARED_SECTIONS = ("pool", "hosts")


class ConfigError(click.UsageError):
    """A problem with the config file: one line naming the file (and key), exit status 2."""


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def option_keys(command: click.Command) -> dict[str, click.Parameter]:
    """Every key a config file may use for ``command``: each option's long names and its
    parameter name (``json`` and ``as_json`` both mean ``--json``), with dashes as underscores."""
    keys: dict[str, click.Parameter] = {}
    for param in command.params:
        if param.name in (None, "config", "help") or getattr(param, "hidden", False):
            continue
        names = [param.name] + [o for o in param.opts if o.startswith("--")]
        for name in names:
            keys[_key(name)] = param
    return keys


def _section_names(ctx: click.Context) -> set[str]:
    """Names of the sibling commands: sections for them are skipped, not errors."""
    names = {ctx.command.name or ""}
    parent = ctx.parent
    if parent is not None and isinstance(parent.command, click.Group):
        names |= set(parent.command.list_commands(parent))
    return ({_key(n) for n in names} | set(SHARED_SECTIONS)) - {""}


def read_config(path: str) -> dict:
    """The YAML mapping in ``path``; any problem is a click error naming the file."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, "
                          f"got a YAML {type(data).__name__}")
    return data


def config_values(ctx: click.Context, path: str, data: dict) -> dict[str, Any]:
    """Validate ``data`` for the running command; returns {parameter name: raw value}."""
    command = ctx.command
    name = command.name or ""
    keys = option_keys(command)
    sections = _section_names(ctx)

    # top-level keys first, then this command's section (which wins over the top level)
    top: list[tuple[str, str, Any]] = []  # (key as written, where it is in the file, value)
    section: list[tuple[str, str, Any]] = []
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} is not an option name")
        if _key(key) in sections and _key(key) not in keys:
            if _key(key) == _key(name):
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: section '{key}' must be a mapping of option "
                                      "names to values")
                section.extend((str(k), f"{key}.{k}", v) for k, v in value.items())
            continue  # another command's section, or the pool
        top.append((key, key, value))

    out: dict[str, Any] = {}
    seen: dict[str, str] = {}  # parameter name -> where it was set, per level
    for n, (key, where, value) in enumerate(top + section):
        if n == len(top):
            seen.clear()  # the section may override the top level
        param = keys.get(_key(key))
        if param is None:
            hint = difflib.get_close_matches(_key(key), list(keys), n=1)
            suggestion = (f"; did you mean '{hint[0].replace('_', '-')}'?" if hint else
                          "; options of another command go in its own section, e.g. 'serve:'")
            raise ConfigError(f"{path}: unknown key '{where}' for 'plexus {name}'{suggestion}")
        if param.name in seen:
            raise ConfigError(f"{path}: '{where}' sets the same option as '{seen[param.name]}'")
        seen[param.name] = where
        if value is None:  # "key:" with no value means the built-in default
            out.pop(param.name, None)
            continue
        if getattr(param, "multiple", False) and not isinstance(value, (list, tuple)):
            value = [value]
        try:
            param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise ConfigError(f"{path}: key '{where}': {e.format_message()}") from None
        out[param.name] = value
    return out


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value or ctx.resilient_parsing:
        return value
    values = config_values(ctx, value, read_config(value))
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def config_option(f):
    """Add ``--config FILE`` to a click command (eager: read before its other options)."""
    return click.option(
        "--config", type=str, default=None, is_eager=True, expose_value=False, callback=_load,
        envvar=CONFIG_ENVVAR, show_envvar=True, metavar="FILE",
        help="YAML file of option values (keys as the long flag names); flags on the command "
             "line override it. See docs/configuration.md.")(f)
