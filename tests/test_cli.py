from typer.testing import CliRunner

from irtrain.cli.main import app

runner = CliRunner()


def test_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("prepare", "sft", "dpo", "score", "rank"):
        assert cmd in result.output


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
    result = runner.invoke(app, ["sft", "--loss", "nope"])
    assert result.exit_code == 1
    assert "loss = 'nope' is not one of" in result.output


def test_no_top_level_cli_package_installed():
    import importlib.util
    import irtrain

    spec = importlib.util.find_spec("cli")
    # A bare `cli` may only be importable from a source checkout on sys.path, never from site-packages.
    assert spec is None or "site-packages" not in (spec.origin or "")
    assert importlib.util.find_spec("irtrain.cli.main") is not None
    assert irtrain.__version__
