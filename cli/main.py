"""`irtrain`: the console script. Thin: parse, build the config, call `run`."""
from __future__ import annotations

import typer

from irtrain import __version__
from irtrain.cli._build import command_from_config, lazy_run
from irtrain.config import DPOConfig, PrepareConfig, QuickstartConfig, RankConfig, ScoreConfig, SFTConfig

app = typer.Typer(
    name="irtrain",
    help="Post-training through the lens of implicit reward: prepare data, SFT, DPO, score values, rank checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain layout: at 80 columns Rich's five-column table cut option names and choice lists
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_COMMANDS = [
    ("prepare", PrepareConfig, "prepare"),
    ("sft", SFTConfig, "sft"),
    ("dpo", DPOConfig, "dpo"),
    ("score", ScoreConfig, "score"),
    ("rank", RankConfig, "rank"),
    ("quickstart", QuickstartConfig, "quickstart"),
]
for _name, _cls, _module in _COMMANDS:
    app.command(_name, help=_cls.__doc__, short_help=_cls.__doc__)(command_from_config(_cls, lazy_run(_module)))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"irtrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """irtrain"""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
