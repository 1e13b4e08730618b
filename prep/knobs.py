"""Knobs: config dataclass fields that carry their CLI help, `--help` panel and allowed range, so that every
default is declared once and every command's options are generated from its config dataclass.

`knob()` declares a field; `check_knobs()` checks any config against the declared ranges, however it was built
(CLI, a pipeline, a test); `knob_parameters()` turns a config class into Typer options and `config_kwargs()`
turns the parsed options back into the dataclass's keyword arguments. A dataclass field declared without
`knob()` (a dict of overrides, a list of arms) is not an option. Typer is imported only when options are
generated, so configs stay cheap to import in workers.

Generated options: `--field-name` (or the knob's `flag`); booleans `--x/--no-x` unless `flag` says otherwise;
`X | None` optional; `tuple[X, ...]` a repeatable option (`--kinds a --kinds b`); `tuple[X, X]` an option taking
two values; `Path` fields take paths. The default is written into the help ("Default: 500."), except where it is
None (the help says what None means) or a plain on-flag's off. A field without a default, or declared with
`required=True`, is a required option.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, Callable

from prep.errors import ContralateralError


class ConfigError(ContralateralError, ValueError):
    """A config that cannot run. `reason`: bad_option (the message names the flag to fix), or a command's own
    (bad_batch, no_data, ...). A ValueError too: it is what a dataclass refuses a bad value with."""


def knob(
    default: Any = MISSING,
    help: str = "",
    panel: str | None = None,
    *,
    flag: str | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    runtime: bool = False,
    required: bool = False,
) -> Any:
    """A config field with its CLI help and panel. `default` left out: a required field (and option).
    `flag`: the option's declaration when it is not the plain `--field-name` (booleans default to
    `--x/--no-x`); `min`/`max`/`choices`: checked by `check_knobs` (on every value of a tuple); `runtime`:
    changes how a run is executed or observed, not what it computes (a trainer leaves it out of its config
    hash); `required`: the command needs it although a library caller may leave it at its default."""
    meta = {"help": help, "panel": panel, "flag": flag, "min": min, "max": max, "choices": choices,
            "runtime": runtime, "required": required}
    return field(default=default, metadata=meta)


def knob_from(config_class: type, name: str, default: Any = MISSING, **changes) -> Any:
    """The knob `name` of `config_class` again, for another config that shares it (same help, panel and range),
    with its own `default` (left out: the same default) and any metadata `changes`."""
    source = next(f for f in dataclasses.fields(config_class) if f.name == name)
    meta = {**source.metadata, **changes}
    return field(default=source.default if default is MISSING else default, metadata=meta)


class KnobConfig:
    """Base of a run's knob dataclass: `to_dict()`, what the run records, and `hashed()`, what a resume must
    match (every field but the `runtime` knobs)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hashed(self) -> dict:
        runtime = runtime_knobs(type(self))
        return {k: v for k, v in self.to_dict().items() if k not in runtime}


def runtime_knobs(config_class: type) -> frozenset[str]:
    """The knobs of `config_class` that change how a run is executed or observed, not what it computes."""
    return frozenset(f.name for f in dataclasses.fields(config_class) if f.metadata.get("runtime"))


def refuse_first(checks, error: Callable[[str, str], Exception] = ConfigError) -> None:
    """Raise `error(reason, detail)` for the first `(ok, reason, detail)` of `checks` whose `ok` is false: a
    config's own cross-field checks, after `check_knobs`."""
    for ok, reason, detail in checks:
        if not ok:
            raise error(reason, detail)


def is_knob(f: dataclasses.Field) -> bool:
    return "help" in f.metadata


def option_name(f: dataclasses.Field) -> str:
    """The flag a user types for this knob (`--label-fraction`, `--single-net`)."""
    flag = f.metadata.get("flag") if f.metadata else None
    return flag.split("/")[0] if flag else "--" + f.name.replace("_", "-")


def cli_fields(config_class: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every knob of `config_class`, in declaration order."""
    hints = typing.get_type_hints(config_class)
    return [(f, hints[f.name]) for f in dataclasses.fields(config_class) if is_knob(f)]


def check_knobs(config, error: Callable[[str, str], Exception] = ConfigError) -> None:
    """Raise `error("bad_option", ...)` naming the flag for the first knob of a config dataclass outside its
    declared choices / min / max (every value of a tuple; an empty tuple where the default holds values is
    refused too). None values pass: they mean "the default"."""
    for f in dataclasses.fields(config):
        if not is_knob(f):
            continue
        value, meta, flag = getattr(config, f.name), f.metadata, option_name(f)
        if isinstance(value, tuple) and not value and f.default:
            raise error("bad_option", f"{flag} needs at least one value")
        for v in value if isinstance(value, tuple) else (value,):
            if v is None:
                continue
            if meta["choices"] is not None and v not in meta["choices"]:
                raise error("bad_option", f"{flag} {v!r}: choose one of {'|'.join(meta['choices'])}")
            if meta["min"] is not None and v < meta["min"]:
                raise error("bad_option", f"{flag} must be >= {meta['min']}, got {v}")
            if meta["max"] is not None and v > meta["max"]:
                raise error("bad_option", f"{flag} must be <= {meta['max']}, got {v}")


def _optional_inner(tp) -> Any | None:
    """X for `X | None` / `Optional[X]`, else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner
    return None


def _is_repeatable(tp) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _cli_type(tp):
    """The spelling Typer expects: `X | None` -> Optional[X], `tuple[X, ...]` -> Optional[List[X]] (repeatable,
    None when not given), `tuple[X, Y]` -> Tuple[X, Y] (one option, two values)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return typing.Optional[_cli_type(inner)]
    if _is_repeatable(tp):
        return typing.Optional[typing.List[typing.get_args(tp)[0]]]
    if typing.get_origin(tp) is tuple:
        return typing.Tuple[typing.get_args(tp)]
    return tp


def _shown_default(f: dataclasses.Field, tp) -> str:
    """' Default: X.' for the help text ('' where the help says it, the default is None, or it is an off flag)."""
    default, help = f.default, f.metadata["help"]
    if default in (MISSING, None, ()) or f.metadata.get("required") or "default:" in help.lower():
        return ""
    if isinstance(default, bool):
        flag = f.metadata.get("flag")
        if flag and "/" not in flag:
            return ""  # a plain on-flag: absent means off
        on, off = (flag or f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}").split("/")
        return f" Default: {on if default else off}."
    if isinstance(default, tuple):
        return f" Default: {' '.join(map(str, default))}."
    return f" Default: {default}."


def knob_parameters(config_class: type, *, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """Keyword-only Typer parameters, one per knob of `config_class` (help, panel, flag and default from its
    metadata; the knobs named in `skip` left out). Parse them back with `config_kwargs`."""
    import typer

    params = []
    for f, tp in cli_fields(config_class):
        if f.name in skip:
            continue
        meta = f.metadata
        decls = [meta["flag"]] if meta["flag"] else []
        if not decls and bool in (tp, _optional_inner(tp)):
            name = f.name.replace("_", "-")
            decls = [f"--{name}/--no-{name}"]
        required = f.default is MISSING or meta.get("required")
        # `[` opens Rich markup in help text: escape it so "[default: ...]" notes stay visible
        help = (meta["help"] + _shown_default(f, tp)).replace("[", "\\[")
        option = typer.Option(*decls, help=help, rich_help_panel=meta["panel"], show_default=False)
        default = ... if required else None if _is_repeatable(tp) else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=typing.Annotated[_cli_type(tp), option]))
    return params


def config_kwargs(config_class: type, options: dict) -> dict:
    """The keyword arguments of `config_class` among parsed `options`: lists as tuples, paths as the field's
    type (str fields get str); an option left unset (None, or a repeatable one given no value) is left out, so
    the field's default, or a base config's value under `dataclasses.replace`, holds."""
    out = {}
    for f, tp in cli_fields(config_class):
        value = options.get(f.name)
        if value is None or value == []:
            continue
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, Path) and Path not in (tp, _optional_inner(tp)):
            value = str(value)
        out[f.name] = value
    return out


def config_or_exit(config_class: type, options: dict, name: str):
    """`config_class` from a generated command's parsed `options`, checked by `check_knobs`; a bad value is one
    line `name: bad_option: ...` on stderr and exit status 2."""
    import typer

    try:
        config = config_class(**config_kwargs(config_class, options))
        check_knobs(config)
    except ConfigError as exc:
        typer.echo(f"{name}: {exc}", err=True)
        raise typer.Exit(2) from None
    return config


def generated_command(command: Callable, *parameter_lists: list[inspect.Parameter],
                      panels: tuple[str, ...] = ()) -> Callable:
    """Give `command(**options)` the Typer signature made of `parameter_lists` (in `panels` order where given:
    `--help` shows the panels in the order their first option comes); returns it."""
    params = [p for group in parameter_lists for p in group]
    if panels:
        def rank(p: inspect.Parameter) -> int:
            panel = p.annotation.__metadata__[0].rich_help_panel
            return panels.index(panel) if panel in panels else len(panels)

        params.sort(key=rank)
    command.__signature__ = inspect.Signature(params, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
