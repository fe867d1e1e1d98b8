"""The `irtrain` console script: its help comes from the config dataclasses, config files and
flags combine as documented, errors are one line, and it is installed as `irtrain.cli`."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import typing

import pytest
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import DPOConfig, PrepareConfig, QuickstartConfig, RankConfig, ScoreConfig, SFTConfig
from irtrain.losses import KL_ESTIMATORS, PREFERENCE_LOSSES, SFT_LOSSES

runner = CliRunner()

COMMANDS = {"prepare": PrepareConfig, "sft": SFTConfig, "dpo": DPOConfig, "score": ScoreConfig, "rank": RankConfig,
            "quickstart": QuickstartConfig}


def _squash(text: str) -> str:
    """`text` without whitespace: a help line wraps at spaces and hyphens, so compare this."""
    return "".join(text.split())


def _help(*command: str, columns: int = 80) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def _help_entries(*command: str, columns: int = 80) -> dict[str, str]:
    """`irtrain [COMMAND] --help` at `columns` as {name: its help, wrapped lines joined}: each
    option under every name it has (`--pack` and `--no-pack`, `-c` and `--config`), each
    command and argument under its name. Click's layout: in a section ("Options:"), an entry
    starts two spaces in, its help after two or more spaces or on the next lines, further
    indented."""
    entries: dict[str, str] = {}
    current: list[str] | None = None
    in_section = False
    for line in _help(*command, columns=columns).splitlines():
        if line and not line.startswith(" "):
            in_section = line.endswith(":") and not line.startswith("Usage")
            current = None
            continue
        if not in_section or not line.strip():
            continue
        if line.startswith("  ") and not line.startswith("   "):
            term, _, text = line.strip().partition("  ")
            current = [text.strip()]
            for name in term.replace(",", " ").replace("/", " ").split():
                if not name.startswith("<"):
                    assert name not in entries, f"{name} listed twice"
                    entries[name] = current  # type: ignore[assignment]
        elif current is not None:
            current.append(line.strip())
    return {name: " ".join(t for t in parts if t) for name, parts in entries.items()}  # type: ignore[union-attr]


def test_help_lists_every_subcommand_with_its_config_docstring():
    """`irtrain --help` (at 80 columns) lists exactly the six commands, each with its config
    dataclass's one-line docstring as its help, whole (wrapped, not cut)."""
    entries = _help_entries()
    listed = [name for name in entries if not name.startswith("-")]
    assert listed == list(COMMANDS)
    for name, cls in COMMANDS.items():
        doc = cls.__doc__.strip()
        assert "\n" not in doc, f"{cls.__name__}'s docstring is the one-line help of `irtrain {name}`"
        assert entries[name] == doc, name


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["irtrain", *COMMANDS])
def test_h_is_help(command):
    """`-h` is `--help`, on the app and on every command."""
    short = runner.invoke(app, [*command, "-h"], env={"COLUMNS": "80"})
    assert short.exit_code == 0, short.output
    assert short.output == _help(*command)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_at_80_columns_shows_every_option_its_choices_default_and_aliases(command):
    """At 80 columns, `irtrain COMMAND --help` fits (no line wider), names every field's flag
    whole, and for each: its choice list `[a|b|c]` when it has fixed choices, its default, its
    aliases (which are not listed as options of their own)."""
    cls = COMMANDS[command]
    text = _help(command)
    assert max(len(line) for line in text.splitlines()) <= 80
    entries = _help_entries(command)
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional"):
            name = f.name + "..." if typing.get_origin(typing.get_type_hints(cls)[f.name]) is list else f.name
            assert name in entries, name
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, flag
        help_text = _squash(entries[flag])
        assert help_text.startswith(_squash(f.metadata["help"])), flag
        if f.metadata.get("choices"):
            assert _squash(f"[{'|'.join(f.metadata['choices'])}]") in help_text, flag
            # lines break between choices (or at a choice's own hyphen), never inside a word
            words = set(entries[flag].replace("- ", "-").replace("[", " ").replace("]", " ").split())
            assert set(f.metadata["choices"]) <= words, (flag, "a choice broken across lines")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if default not in (None, "", []):
            assert _squash(f"(default: {default!r})") in help_text, flag
        for alias in f.metadata.get("aliases", ()):
            alias_flag = "--" + alias.replace("_", "-")
            assert alias_flag not in entries, alias_flag
            assert _squash(alias_flag) in help_text, (flag, alias_flag)
    assert {"-c", "--config", "--print-config", "-h", "--help"} <= set(entries)


def test_choice_lists_cover_every_option_with_fixed_choices():
    """The options with a fixed set of values are exactly the ones declared with `choices=`,
    so the check above sees them all (the ten of issue 14 and the loss tables')."""
    with_choices = {(name, f.name) for name, cls in COMMANDS.items() for f in dataclasses.fields(cls) if f.metadata.get("choices")}
    for expected in [("prepare", "format"), ("prepare", "mask"), ("prepare", "truncation"), ("sft", "lr_schedule"), ("sft", "dtype"),
                     ("sft", "kl_estimator"), ("sft", "loss"), ("dpo", "loss"), ("score", "format"), ("score", "dtype")]:
        assert expected in with_choices, expected


def test_command_help_names_every_loss_and_estimator():
    """`irtrain sft --help` names each SFT loss and each KL estimator with its summary (from
    the tables, so a new entry shows up by itself); `irtrain dpo --help` each preference loss."""
    sft_entries = _help_entries("sft")
    loss_help, kl_help = _squash(sft_entries["--loss"]), _squash(sft_entries["--kl-estimator"])
    for name, entry in SFT_LOSSES.items():
        assert _squash(f"{name} = {entry.summary}") in loss_help, name
    for name, entry in KL_ESTIMATORS.items():
        assert _squash(f"{name} = {entry.summary}") in kl_help, name
    assert "(default:'ce')" in loss_help and "(default:'full')" in kl_help
    assert f"[{'|'.join(SFT_LOSSES)}]" in loss_help and f"[{'|'.join(KL_ESTIMATORS)}]" in kl_help
    dpo_loss_help = _squash(_help_entries("dpo")["--loss"])
    for name, entry in PREFERENCE_LOSSES.items():
        assert _squash(f"{name} = {entry.summary}" if entry.summary else name) in dpo_loss_help, name


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
    """An installed wheel ships the app as `irtrain/cli/`, no bare top-level `cli/` (a source
    checkout has `cli/` at its root, linked as irtrain/cli), and its console script points at
    it. Runs where irtrain is installed from a wheel (`pip install .`); skipped under the
    README's editable set-up, which `scripts/test` uses."""
    try:
        dist = importlib.metadata.distribution("irtrain")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("irtrain is not installed")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        pytest.skip("an editable install lists no package files")
    names = [f.as_posix() for f in dist.files or []]
    assert "irtrain/cli/main.py" in names and "irtrain/cli/_build.py" in names
    assert [n for n in names if n.split("/")[0] == "cli"] == []
    assert {n.split("/")[0] for n in names if not n.startswith("../")} <= {"irtrain", f"irtrain-{dist.version}.dist-info"}
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"irtrain": "irtrain.cli.main:main"}


# --------------------------------------------------------------------------- aliases, "did you mean"
def _printed(*args: str) -> str:
    result = runner.invoke(app, [*args, "--print-config"])
    assert result.exit_code == 0, result.output
    return result.output


def test_trl_style_aliases_set_the_same_field():
    """The TRL/axolotl spellings of a setting are flags and TOML keys of the same field."""
    printed = _printed("sft", "--learning-rate", "3e-5", "--num-train-epochs", "2", "--output-dir", "o",
                       "--per-device-train-batch-size", "4", "--logging-steps", "5", "--model-name-or-path", "m",
                       "--lora-target-modules", "q_proj,v_proj", "--adam-epsilon", "1e-6", "--torch-dtype", "bfloat16",
                       "--loss-type", "dft")
    for line in ["lr = 3e-05", "epochs = 2.0", 'out = "o"', "micro_batch = 4", "log_steps = 5", 'model = "m"',
                 'lora_target = ["q_proj,v_proj"]', "adam_eps = 1e-06", 'dtype = "bfloat16"', 'loss = "dft"']:
        assert line in printed.splitlines(), line
    printed = _printed("dpo", "--learning-rate", "1e-6", "--rpo-alpha", "0.5", "--simpo-gamma", "1.0", "--loss-type", "ipo")
    for line in ["lr = 1e-06", "sft_coef = 0.5", "gamma = 1.0", 'loss = "ipo"']:
        assert line in printed.splitlines(), line
    printed = _printed("prepare", "--max-seq-length", "512", "--no-packing")
    assert "max_len = 512" in printed.splitlines() and "pack = false" in printed.splitlines()
    assert "max_len = 1024" in _printed("prepare", "--max-length", "1024").splitlines()
    assert "pack = true" in _printed("prepare", "--packing").splitlines()


def test_alias_in_toml_and_flags_win(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('learning_rate = 1e-4\nnum-train-epochs = 3\noutput_dir = "x"\n')
    printed = _printed("sft", "--config", str(cfg)).splitlines()
    assert "lr = 0.0001" in printed and "epochs = 3.0" in printed and 'out = "x"' in printed
    assert "lr = 2e-05" in _printed("sft", "--config", str(cfg), "--lr", "2e-5").splitlines()


def test_two_names_of_one_setting_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["sft", "--lr", "1e-4", "--learning-rate", "2e-4"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --lr and --learning-rate are the same setting; give one", result.output
    cfg = tmp_path / "run.toml"
    cfg.write_text("lr = 1e-4\nlearning_rate = 2e-4\n")
    result = runner.invoke(app, ["sft", "--config", str(cfg)])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {cfg}: 'lr' and 'learning_rate' are the same setting (lr); keep one", result.output


def test_aliases_clash_with_no_other_flag():
    """Every alias names one field and no field, and the flags of a command (names, aliases,
    their `--no-` forms) are all distinct."""
    import typer.main

    from irtrain.config import aliases

    group = typer.main.get_command(app)
    for name, cls in COMMANDS.items():
        alias_of = aliases(cls)  # raises on a clash between declarations
        assert set(alias_of).isdisjoint(f.name for f in dataclasses.fields(cls))
        opts = [o for p in group.commands[name].params for o in [*p.opts, *p.secondary_opts]]  # type: ignore[attr-defined]
        assert len(opts) == len(set(opts)), name


def test_unknown_flag_says_did_you_mean():
    """Click's suggestions (difflib's close matches) for an unknown flag, aliases included, and
    for an unknown command."""
    result = runner.invoke(app, ["sft", "--learning-rat", "1e-4"])
    assert result.exit_code == 2
    assert "Error: No such option: --learning-rat (Possible options: --learning-rate)" in result.output, result.output
    result = runner.invoke(app, ["dpo", "--max-step", "3"])
    assert "(Possible options: --max-bad-steps, --max-steps, --save-steps)" in result.output, result.output
    result = runner.invoke(app, ["sftt"])
    assert result.exit_code == 2 and "Did you mean 'sft'?" in result.output, result.output


@pytest.mark.parametrize("key, says", [
    ("learning_rat", "; did you mean 'lr'?"),  # the closest name is an alias: its field is named
    ("max-step", "; did you mean 'max_steps'?"),
    ("warmup_ration", "; did you mean 'warmup_ratio'?"),
    ("bogus", ""),
])
def test_unknown_config_key_says_did_you_mean(tmp_path, key, says):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"{key} = 1\n")
    result = runner.invoke(app, ["sft", "--config", str(cfg)])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {cfg}: unknown config key '{key}' for SFTConfig{says}", result.output
