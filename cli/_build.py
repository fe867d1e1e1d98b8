"""Build a Typer command from a config dataclass, so help is written once.

Every dataclass field becomes a flag (``--max-len``) or, with
``positional=True``, an argument; flags default to None so that only the flags
a user typed override the TOML file given with ``--config``.
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


def _param(f: dataclasses.Field, tp: Any) -> inspect.Parameter:
    base, _ = _unwrap_optional(tp)
    help_text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices:
        help_text += f" \\[{'|'.join(choices)}]"  # escaped: Rich would read [a|b] as markup
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
    if default not in (None, "", []):
        help_text += f" (default: {default!r})"
    flag = "--" + f.name.replace("_", "-")
    if f.metadata.get("positional"):
        annotation = Optional[list[str]] if typing.get_origin(base) is list else Optional[str]
        info = typer.Argument(None, help=help_text, show_default=False)
    elif base is bool:
        annotation = Optional[bool]
        info = typer.Option(None, f.metadata.get("flag") or f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
    elif typing.get_origin(base) is list:
        annotation = Optional[list[str]]
        info = typer.Option(None, flag, help=help_text, show_default=False)
    else:
        annotation = Optional[base if base in (int, float) else str]
        info = typer.Option(None, flag, help=help_text, show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


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
    params += [_param(f, hints[f.name]) for f in dataclasses.fields(cls)]

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

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(1)


def lazy_run(module: str) -> Callable[[Any], Any]:
    """`irtrain.<module>.run`, imported only when the command runs (keeps --help fast)."""

    def run(cfg: Any) -> Any:
        import importlib

        return importlib.import_module(f"irtrain.{module}").run(cfg)

    return run
