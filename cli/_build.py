"""Build a Typer command from a config dataclass, so help is written once.

Every dataclass field becomes a flag (``--max-len``) or, with
``positional=True``, an argument, and each of its aliases a hidden flag; flags
default to None so that only the flags a user typed override the TOML file
given with ``--config``.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from irtrain.config import _unwrap_optional, config_to_toml, load_config
from irtrain.errors import IrtrainError


def _option(name: str, base: Any, help_text: str, *, hidden: bool = False, flags: str | None = None) -> tuple[Any, Any]:
    """(annotation, typer.Option) of the flag `--NAME` (or the field's own `flags`, e.g.
    `--apply-chat-template/--no-chat-template`) for a field of type `base`."""
    flag = "--" + name.replace("_", "-")
    if base is bool:
        return Optional[bool], typer.Option(None, flags or f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False,
                                            hidden=hidden)
    if typing.get_origin(base) is list:
        return Optional[list[str]], typer.Option(None, flag, help=help_text, show_default=False, hidden=hidden)
    return Optional[base if base in (int, float) else str], typer.Option(None, flag, help=help_text, show_default=False, hidden=hidden)


def _params(f: dataclasses.Field, tp: Any) -> list[inspect.Parameter]:
    """The field's flag (or argument), then one hidden flag per alias (`--learning-rate` for
    `--lr`: named in the help of `--lr`, kept out of the option list so it stays readable at 80
    columns); `load_config` maps an alias onto its field."""
    base, _ = _unwrap_optional(tp)
    help_text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices:
        help_text += f" [{' | '.join(choices)}]"  # spaced, so help wraps between choices
    names = f.metadata.get("aliases", ())
    if names:
        help_text += " (alias: " + ", ".join("--" + a.replace("_", "-") for a in names) + ")"
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
    if default not in (None, "", []):
        help_text += f" (default: {default!r})"
    kind = inspect.Parameter.KEYWORD_ONLY
    if f.metadata.get("positional"):
        annotation = Optional[list[str]] if typing.get_origin(base) is list else Optional[str]
        return [inspect.Parameter(f.name, kind, annotation=annotation,
                                  default=typer.Argument(None, help=help_text, show_default=False))]
    annotation, info = _option(f.name, base, help_text, flags=f.metadata.get("flag"))
    params = [inspect.Parameter(f.name, kind, default=info, annotation=annotation)]
    for alias in names:
        annotation, info = _option(alias, base, f"Alias of --{f.name.replace('_', '-')}.", hidden=True)
        params.append(inspect.Parameter(alias, kind, default=info, annotation=annotation))
    return params


def command_from_config(cls: type, run: Callable[[Any], Any]) -> Callable[..., None]:
    """Return a function whose signature Typer turns into the command's flags."""
    hints = typing.get_type_hints(cls)
    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--config", "-c", help="TOML file with the command's settings; flags win."),
        ),
        inspect.Parameter(
            "print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--print-config", help="Print the resolved config as TOML and exit."),
        ),
    ]
    params += [p for f in dataclasses.fields(cls) for p in _params(f, hints[f.name])]

    def command(**kwargs: Any) -> None:
        toml_path = kwargs.pop("config")
        print_config = kwargs.pop("print_config")
        try:
            cfg = load_config(cls, toml_path, kwargs)
            if print_config:
                typer.echo(config_to_toml(cfg), nl=False)
                return
            run(cfg)
        except IrtrainError as e:
            fail(str(e))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = cls.__doc__
    return command


def fail(message: str) -> None:
    """Print a one-line error (no traceback) and exit non-zero."""
    from rich.console import Console
    from rich.markup import escape

    # escaped: a message may hold brackets (pip install 'irtrain[deepspeed]') that Rich would read as markup
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", markup=True)
    raise typer.Exit(1)


def lazy_run(module: str) -> Callable[[Any], Any]:
    """`irtrain.<module>.run`, imported only when the command runs (keeps --help fast)."""

    def run(cfg: Any) -> Any:
        import importlib

        return importlib.import_module(f"irtrain.{module}").run(cfg)

    return run
