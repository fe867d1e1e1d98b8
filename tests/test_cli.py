"""The `irtrain` console script: its help comes from the config dataclasses, config files and
flags combine as documented, errors are one line, and it is installed as `irtrain.cli`."""
from __future__ import annotations

import importlib.metadata
import json

import pytest
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import DPOConfig, PrepareConfig, QuickstartConfig, RankConfig, ScoreConfig, SFTConfig
from irtrain.losses import KL_ESTIMATORS, PREFERENCE_LOSSES, SFT_LOSSES

runner = CliRunner()

COMMANDS = {"prepare": PrepareConfig, "sft": SFTConfig, "dpo": DPOConfig, "score": ScoreConfig, "rank": RankConfig,
            "quickstart": QuickstartConfig}


def _help_rows(*command: str) -> list[str]:
    """The rows of `irtrain [COMMAND] --help`, rendered wide enough that no row wraps, with the
    table borders stripped."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "4000"})
    assert result.exit_code == 0, result.output
    return [ln.strip().strip("│╭╰─╮╯").strip() for ln in result.output.splitlines()]


def _row(rows: list[str], first: str) -> str:
    """The text after `first` in the one row whose first word is `first`."""
    found = [r.split(None, 1)[1] if " " in r else "" for r in rows if r.split(None, 1)[:1] == [first]]
    assert len(found) == 1, (first, found)
    return found[0]


def test_help_lists_every_subcommand_with_its_config_docstring():
    """`irtrain --help` lists exactly the six commands, each with its config dataclass's
    one-line docstring as its help."""
    rows = _help_rows()
    start = rows.index("Commands")
    listed = [r.split(None, 1)[0] for r in rows[start + 1:] if r]
    assert listed == list(COMMANDS)
    for name, cls in COMMANDS.items():
        doc = cls.__doc__.strip()
        assert "\n" not in doc, f"{cls.__name__}'s docstring is the one-line help of `irtrain {name}`"
        assert _row(rows, name) == doc, name


def test_command_help_names_every_loss_and_estimator():
    """`irtrain sft --help` names each SFT loss and each KL estimator with its summary (from
    the tables, so a new entry shows up by itself); `irtrain dpo --help` each preference loss."""
    sft_rows = _help_rows("sft")
    loss_help, kl_help = _row(sft_rows, "--loss"), _row(sft_rows, "--kl-estimator")
    for name, entry in SFT_LOSSES.items():
        assert f"{name} = {entry.summary}" in loss_help, name
    for name, entry in KL_ESTIMATORS.items():
        assert f"{name} = {entry.summary}" in kl_help, name
    assert "(default: 'ce')" in loss_help and "(default: 'full')" in kl_help
    # the choice lists are shown (escaped: Rich would swallow "[a|b]" as markup)
    assert f"[{'|'.join(SFT_LOSSES)}]" in loss_help and f"[{'|'.join(KL_ESTIMATORS)}]" in kl_help
    dpo_loss_help = _row(_help_rows("dpo"), "--loss")
    for name, entry in PREFERENCE_LOSSES.items():
        assert (f"{name} = {entry.summary}" if entry.summary else name) in dpo_loss_help, name


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("lr = 1e-4\nbogus = 1\n")
    result = runner.invoke(app, ["sft", "--config", str(cfg)])
    assert result.exit_code == 1
    assert "unknown config key 'bogus'" in result.output
    assert "Traceback" not in result.output


def test_flags_win_over_toml(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('lr = 1e-4\nloss = "dft"\n')
    result = runner.invoke(app, ["sft", "--config", str(cfg), "--lr", "3e-5", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "lr = 3e-05" in result.output
    assert 'loss = "dft"' in result.output


def test_bad_choice_is_rejected():
    """A value outside a choice is a one-line error listing the choices (the loss table's keys)."""
    result = runner.invoke(app, ["sft", "--loss", "nope"])
    assert result.exit_code == 1
    text = result.output.strip()
    assert text == f"error: loss = 'nope' is not one of: {', '.join(SFT_LOSSES)}", text


def test_installed_distribution_has_no_top_level_cli_package():
    """The installed wheel (scripts/test installs it) ships the app as `irtrain/cli/`, no bare
    top-level `cli/` (a source checkout has `cli/` at its root, linked as irtrain/cli), and
    its console script points at it."""
    try:
        dist = importlib.metadata.distribution("irtrain")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("irtrain is not installed (scripts/test installs it first)")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        pytest.skip("an editable install lists no package files")
    names = [f.as_posix() for f in dist.files or []]
    assert "irtrain/cli/main.py" in names and "irtrain/cli/_build.py" in names
    assert [n for n in names if n.split("/")[0] == "cli"] == []
    assert {n.split("/")[0] for n in names if not n.startswith("../")} <= {"irtrain", f"irtrain-{dist.version}.dist-info"}
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"irtrain": "irtrain.cli.main:main"}
