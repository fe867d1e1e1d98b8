"""`irtrain.config`: settings are checked where they are declared, before anything is loaded or
written; a bad one is a one-line error naming the flag, from a flag or from a TOML file."""
from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import CHECKS, DPOConfig, PrepareConfig, QuickstartConfig, RankConfig, ScoreConfig, SFTConfig, load_config
from irtrain.errors import ConfigError

runner = CliRunner()

BAD = [  # (command, flag, value, what the error says)
    ("sft", "--lr", "nan", "--lr must be > 0 and finite, got nan"),
    ("sft", "--lr", "-1e-5", "--lr must be > 0 and finite, got -1e-05"),
    ("sft", "--lr", "0", "--lr must be > 0 and finite, got 0.0"),
    ("sft", "--micro-batch", "0", "--micro-batch must be >= 1, got 0"),
    ("sft", "--global-batch", "0", "--global-batch must be >= 1, got 0"),
    ("sft", "--value-temperature", "0", "--value-temperature must be > 0 and finite, got 0.0"),
    ("sft", "--warmup-ratio", "1.5", "--warmup-ratio must be in [0, 1], got 1.5"),
    ("sft", "--kl-coef", "inf", "--kl-coef must be >= 0 and finite, got inf"),
    ("sft", "--adam-beta2", "1", "--adam-beta2 must be in [0, 1), got 1.0"),
    ("sft", "--epochs", "0", "--epochs must be > 0 and finite, got 0.0"),
    ("dpo", "--beta", "inf", "--beta must be > 0 and finite, got inf"),
    ("dpo", "--beta", "-0.1", "--beta must be > 0 and finite, got -0.1"),
    ("dpo", "--lr", "nan", "--lr must be > 0 and finite, got nan"),
    ("dpo", "--sft-coef", "-1", "--sft-coef must be >= 0 and finite, got -1.0"),
    ("score", "--value-temperature", "0", "--value-temperature must be > 0 and finite, got 0.0"),
    ("score", "--batch-tokens", "0", "--batch-tokens must be >= 1, got 0"),
    ("prepare", "--max-len", "1", "--max-len must be >= 2, got 1"),
    ("rank", "--bootstrap", "-1", "--bootstrap must be >= 0 and finite, got -1"),
]


@pytest.mark.parametrize("command, flag, value, says", BAD, ids=[f"{c}{f}={v}" for c, f, v, _ in BAD])
def test_bad_setting_is_one_line_before_anything_is_written(command, flag, value, says, tmp_path):
    out = tmp_path / "out"
    # the model and data do not even exist: the setting is refused before they are looked at
    args = {"sft": ["--model", str(tmp_path / "m"), str(tmp_path / "d")], "dpo": ["--model", str(tmp_path / "m"), str(tmp_path / "d")],
            "score": ["--model", str(tmp_path / "m"), str(tmp_path / "d")], "prepare": [str(tmp_path / "d"), "--tokenizer", "t"],
            "rank": [str(tmp_path / "a"), str(tmp_path / "b")]}[command]
    r = runner.invoke(app, [command, *args, "--out", str(out), flag, value])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines == [f"error: {says}"], r.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_same_check_reads_a_toml_file(tmp_path):
    (tmp_path / "c.toml").write_text("lr = -1.0\nmicro-batch = 2\n")
    with pytest.raises(ConfigError, match=r"^--lr must be > 0 and finite, got -1.0$"):
        load_config(SFTConfig, tmp_path / "c.toml", {})
    assert load_config(SFTConfig, tmp_path / "c.toml", {"lr": 1e-4}).lr == 1e-4  # a flag wins, and is checked


def test_optional_fields_pass_when_unset_and_defaults_are_valid():
    for cls in (PrepareConfig, SFTConfig, DPOConfig, ScoreConfig, RankConfig, QuickstartConfig):
        cls()  # every default passes its own check (a failing one raises here)
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            assert check is None or check in CHECKS, (cls.__name__, f.name)
    assert DPOConfig(beta=None).beta is None and DPOConfig(sft_lr=None).sft_lr is None


def test_every_numeric_training_setting_has_a_check():
    """So that a new numeric flag cannot be added without saying its range (seeds, counts with
    their own meaning and the joint-lambda settings, checked with their schedule, are exempt)."""
    exempt = {"seed", "label_smoothing", "target_accuracy", "lambda_interval", "lambda_init", "lambda_delta", "lambda_min",
              "lambda_max"}
    for cls in (SFTConfig, DPOConfig):
        hints = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in hints.items():
            if f.type in ("int", "float", "float | None") and name not in exempt:
                assert f.metadata.get("check"), f"{cls.__name__}.{name} declares no range check"
