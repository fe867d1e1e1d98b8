"""`irtrain.display`: the training display in a terminal (a real pty at 80 and 120 columns)
and in a log file (stderr redirected), the end-of-run summary, the other phases' progress,
and transformers' own bars kept out of it all."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from irtrain.display import Phase, Progress, duration, outputs, quiet_transformers, rate
from irtrain.dpo import PreferenceObjective
from irtrain.sft import SFTObjective

import test_train_common as common

one_torch_thread, task_shards = common.one_torch_thread, common.task_shards
data_dir, pref_dir = common.data_dir, common.pref_dir

SFT, DPO = SFTObjective.headline, PreferenceObjective.headline  # what the commands show
HF_BARS = ("Loading weights", "Writing model shards", "it/s]")
#: the first line of the terminal display: name, [bar,] step/total, elapsed, eta, rate
HEAD = re.compile(r"^sft (━+ )?(\d+)/(\d+) (\d+:\d\d:\d\d) eta (\d+:\d\d:\d\d|-:--:--) "
                  r"(-- it/s|[\d.]+ it/s|[\d.]+ s/it)( [\d.]+[kMG]? tok/s)?$")


def _step_metrics(step: int, **extra: float) -> dict:
    return {"loss": 1.2345678, "lr": 2e-5, "grad_norm": 0.53219, "token_accuracy": 0.41234, "tokens": 1000 * step,
            "tokens_per_s": 2000.0, "step_time_s": 0.5, "elapsed_s": 0.5 * step, "not_headline": 7.0, **extra}


# --------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("width", [80, 100, 120, 200])
def test_the_first_line_keeps_count_time_eta_and_rate_at_any_width(width):
    p = Progress(100, 0, enabled=True, description="sft", headline=SFT)
    for step in (1, 2, 12):
        p.update(step, _step_metrics(step, **({"eval/pref_accuracy": 0.625, "eval/pref_loss": 0.6812} if step == 2 else {})), line=False)
    head, metrics = (t.plain for t in p.frame(width))
    assert len(head) == width and len(metrics) <= width  # the bar takes what the counts leave
    m = HEAD.match(head)
    assert m and m.group(1) and (m.group(2), m.group(3)) == ("12", "100"), head
    assert m.group(7), head  # tokens/s
    # metrics in order, whole, the eval values kept since step 2, and nothing that is not headline
    parts = metrics.split("  ")
    names = [x.split(" ")[0] for x in parts]
    full = ["loss", "lr", "grad_norm", "token_acc", "eval/pref_acc", "eval/pref_loss"]
    assert names == full[:len(names)] and len(names) >= 4, metrics
    assert parts[0] == "loss 1.235" and parts[1] == "lr 2.0e-05"
    assert "not_headline" not in metrics
    if width >= 120:
        assert names == full
    if width == 80:  # what does not fit is dropped, not cut
        assert "eval/pref_loss" not in metrics and not metrics.endswith("eval/pref")


def test_dpo_headline_at_80_columns():
    """The DPO display shows rewards/accuracies and rewards/margins after the loss."""
    p = Progress(200, 0, enabled=True, description="dpo", headline=DPO)
    p.update(5, {"loss": 0.6812, "rewards/accuracies": 0.75, "rewards/margins": 0.0123, "lr": 5e-7, "grad_norm": 1.5,
                 "rewards/chosen": -0.1, "tokens": 500, "step_time_s": 0.2, "elapsed_s": 1.0}, line=False)
    head, metrics = (t.plain for t in p.frame(80))
    assert " 5/200 " in head and " eta " in head
    assert metrics.startswith("loss 0.6812  rewards/acc 0.75  rewards/margin 0.0123  lr 5.0e-07")
    assert "rewards/chosen" not in metrics


def test_very_narrow_leaves_the_bar_out_first():
    p = Progress(100, 0, enabled=True, description="sft", headline=SFT)
    p.update(3, _step_metrics(3), line=False)
    head = p.frame(60)[0].plain
    assert "━" not in head and head.startswith("sft 3/100 ") and "eta" in head


def test_formats():
    assert duration(0) == "0:00:00" and duration(3725.4) == "1:02:05" and duration(None) == "-:--:--"
    assert rate(0.4) == "2.50 it/s" and rate(2.6) == "2.6 s/it" and rate(None) == "-- it/s"


# --------------------------------------------------------------------------- not a terminal
def test_plain_lines_one_per_logged_step_and_the_summary(tmp_path, capfd):
    """stderr is not a terminal under pytest: one plain line per logged step (none for the
    others), a line for a checkpoint being written, and the summary with the best eval, the
    last checkpoint and what the run left in OUT. Nothing on stdout."""
    (tmp_path / "checkpoint-0000004").mkdir()
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / ".lock").write_text("")
    p = Progress(4, 0, enabled=True, description="sft", headline=SFT)
    p.note(0, {"eval/pref_accuracy": 0.5, "eval/pref_loss": 0.6931})
    for step in (1, 2, 3, 4):
        ev = {"eval/pref_accuracy": 0.75, "eval/pref_loss": 0.61} if step == 2 else {}
        if step == 4:
            ev = {"eval/pref_accuracy": 0.625, "eval/pref_loss": 0.65}
        p.update(step, _step_metrics(step, **ev), line=step % 2 == 0)
    with p.saving("checkpoint-0000004"):
        pass
    p.summary(tmp_path, tmp_path / "checkpoint-0000004")
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.splitlines()
    steps = [ln for ln in lines if re.match(r"sft step \d+/4 \| \d:\d\d:\d\d elapsed \| eta \d:\d\d:\d\d \| ", ln)]
    assert [s.split(" ")[2] for s in steps] == ["2/4", "4/4"], err
    assert "loss 1.235 lr 2.0e-05 grad_norm 0.5322 token_accuracy 0.4123 eval/pref_accuracy 0.75 eval/pref_loss 0.61" in steps[0]
    assert "sft step 4/4 | saving checkpoint-0000004…" in lines
    summary = err[err.index("sft done:"):]
    assert re.match(r"sft done: 4/4 steps in \d:\d\d:\d\d; ", summary)
    assert re.search(r"; steps at [\d.]+ (it/s|s/it) [\d.]+k tok/s \(4.0k tokens\)$", summary.splitlines()[0]), summary
    assert "  final:  loss 1.235  lr 2.0e-05" in summary and "eval/pref_accuracy 0.625" in summary
    assert "  best:   eval/pref_accuracy 0.75 (step 2)  eval/pref_loss 0.61 (step 2)" in summary
    assert f"  last checkpoint: {tmp_path / 'checkpoint-0000004'}" in summary
    assert f"  outputs in {tmp_path}: metrics.jsonl, tensorboard/, 1 checkpoint" in summary


def test_disabled_writes_nothing(tmp_path, capfd):
    p = Progress(10, 0, enabled=False, description="sft")
    p.update(1, {"loss": 0.5, "lr": 1e-3})
    with p.saving("checkpoint-0000001"):
        pass
    p.summary(tmp_path, None)
    with Phase("reference", 3, enabled=False) as ph:
        ph.advance(3)
    assert capfd.readouterr() == ("", "")


def test_summary_without_eval_gives_the_best_training_loss(tmp_path, capfd):
    p = Progress(3, 0, enabled=True, description="dpo", headline=DPO)
    for step, loss in ((1, 0.69), (2, 0.41), (3, 0.52)):
        p.update(step, {"loss": loss, "tokens": 10 * step, "step_time_s": 0.1, "elapsed_s": 0.1 * step}, line=False)
    p.summary(tmp_path / "missing", None, stopped="interrupted")
    err = capfd.readouterr().err
    assert "dpo done: stopped at step 3/3 (interrupted)" in err
    assert "best:   loss 0.41 (step 2)" in err and "last checkpoint: none" in err and "nothing" in err
    assert "dpo step" not in err  # line=False: no log step


def test_phase_lines_without_a_terminal(capfd):
    """every=0: a line at each advance (but the last) with count, elapsed and eta; then the
    closing line. `quiet_below`: a short phase says nothing."""
    with Phase("reference log-probs of sft", 3, unit="rows", every=0) as ph:
        for _ in range(3):
            ph.advance()
    with Phase("rank: bootstrap", 5, unit="resamples", quiet_below=60) as ph:
        ph.advance(5)
    lines = capfd.readouterr().err.splitlines()
    assert [ln.split(" |")[0] for ln in lines[:2]] == ["reference log-probs of sft: 1/3 rows", "reference log-probs of sft: 2/3 rows"]
    assert all(" elapsed | eta " in ln for ln in lines[:2])
    assert re.fullmatch(r"reference log-probs of sft: 3 rows in 0:00:00 \(.* rows/s\)", lines[2])
    assert len(lines) == 3


def test_outputs_lists_what_a_run_left(tmp_path):
    assert outputs(tmp_path / "none") == "nothing"
    for d in ("checkpoint-0000001", "checkpoint-0000002", "merged", "wandb"):
        (tmp_path / d).mkdir()
    (tmp_path / "config.toml").write_text("")
    assert outputs(tmp_path) == "config.toml, merged/, wandb/, 2 checkpoints"


def test_quiet_transformers_restores_as_a_context_manager():
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    try:
        with quiet_transformers():
            assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.ERROR
        assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.WARNING
    finally:
        hf_logging.set_verbosity(before[0])
        (hf_logging.enable_progress_bar if before[1] else hf_logging.disable_progress_bar)()


# --------------------------------------------------------------------------- real runs
def _sft_cmd(model, data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "irtrain.cli.main", "sft", *map(str, common.base_args(model, data, out, *extra))]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TERM="xterm-256color")
    for k in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(k, None)
    return env


def _in_pty(cmd: list[str], cols: int, timeout: float = 240) -> tuple[int, str]:
    """Run `cmd` with stdin, stdout and stderr on a pseudo-terminal of `cols` columns; return
    its exit status and everything it wrote, escape sequences removed, split at \\r and \\n."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=_env(), close_fds=True)
    os.close(slave)
    buf, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                buf += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.decode("utf-8", errors="replace"))
    return proc.wait(timeout=30), text.replace("\r\n", "\n").replace("\r", "\n")


@pytest.mark.parametrize("cols", [80, 120])
def test_live_display_in_a_terminal(tiny_model_dir, data_dir, pref_dir, tmp_path, cols):
    """A real `irtrain sft` in a pseudo-terminal: frames drawn mid-run show `step/total`,
    elapsed, eta and the rate on the first line, the headline metrics (whole, within the
    width) on the second; a checkpoint's status line; at the end the summary; no
    transformers bar anywhere."""
    out = tmp_path / "run"
    code, text = _in_pty(_sft_cmd(tiny_model_dir, data_dir, out, "--max-steps", "16", "--save-steps", "8",
                                  "--eval-pairs", pref_dir), cols)
    assert code == 0, text[-3000:]
    lines = text.split("\n")
    heads = [(i, HEAD.match(ln)) for i, ln in enumerate(lines)]
    heads = [(i, m) for i, m in heads if m]
    mid = [(i, m) for i, m in heads if 0 < int(m.group(2)) < 16]
    assert mid, text[-3000:]
    for i, m in mid:
        assert m.group(3) == "16" and m.group(1), lines[i]  # the bar too
        assert len(lines[i]) == cols, lines[i]
    assert any(m.group(5) != "-:--:--" for _, m in mid)  # an eta once a step is timed
    metric_lines = [lines[i + 1] for i, _ in mid if i + 1 < len(lines) and lines[i + 1].startswith("loss ")]
    assert metric_lines and all(len(ln) <= cols for ln in metric_lines)
    assert all("token_acc " in ln and " lr " in ln and "grad_norm " in ln for ln in metric_lines)
    with_eval = [ln for ln in metric_lines if "eval/pref_acc " in ln]
    assert with_eval  # evaluated at step 0, kept on
    assert any("eval/pref_loss " in ln for ln in with_eval) == (cols >= 120)  # at 80 it is dropped, whole
    assert "saving checkpoint-0000008…" in text
    assert "sft done: 16/16 steps in " in text and f"last checkpoint: {out / 'checkpoint-0000016'}" in text
    assert not [b for b in HF_BARS if b in text]


def test_log_file_lines_and_summary(tiny_model_dir, data_dir, pref_dir, tmp_path):
    """stderr to a file (SLURM, nohup): one plain line per --log-steps with step/total, elapsed,
    eta and the headline metrics; the reference pass's closing lines; the checkpoint lines; the
    summary; no transformers bars. stdout gets none of it."""
    out = tmp_path / "run"
    with open(tmp_path / "err.log", "w") as err, open(tmp_path / "out.log", "w") as so:
        subprocess.run(_sft_cmd(tiny_model_dir, data_dir, out, "--max-steps", "6", "--log-steps", "2", "--save-steps", "3",
                                "--eval-pairs", pref_dir, "--eval-steps", "3", "--kl-metrics"),
                       stdout=so, stderr=err, env=_env(), check=True, timeout=240)
    log = (tmp_path / "err.log").read_text()
    lines = log.splitlines()
    step_lines = [ln for ln in lines if re.match(r"sft step \d+/6 \| \d:\d\d:\d\d elapsed \| eta \d:\d\d:\d\d \| "
                                                 r"[\d.]+ (it/s|s/it) [\d.]+[kM]? tok/s \| loss ", ln)]
    assert [ln.split(" ")[2] for ln in step_lines] == ["2/6", "4/6", "6/6"], log
    assert all("token_accuracy " in ln and "eval/pref_accuracy " in ln for ln in step_lines)
    assert [ln for ln in lines if "saving checkpoint" in ln] == ["sft step 3/6 | saving checkpoint-0000003…",
                                                                 "sft step 6/6 | saving checkpoint-0000006…"]
    assert any(re.match(r"reference log-probs of sft: \d+ rows in \d:\d\d:\d\d", ln) for ln in lines), log
    summary = log[log.index("sft done:"):].splitlines()
    assert summary[0].startswith("sft done: 6/6 steps in ") and " tok/s (" in summary[0]
    assert summary[1].startswith("  final:  loss ") and summary[2].startswith("  best:   eval/pref_accuracy ")
    assert summary[3] == f"  last checkpoint: {out / 'checkpoint-0000006'}"
    assert summary[4] == f"  outputs in {out}: config.toml, metrics.jsonl, 2 checkpoints"
    assert not [b for b in HF_BARS if b in log]
    assert (tmp_path / "out.log").read_text() == ""  # nothing on stdout (DeepSpeed's CPU warning neither)


def test_score_keeps_transformers_bars_out(tiny_model_dir, data_dir, tmp_path):
    """`irtrain score` (real CLI, stderr captured): its own closing line, no transformers bar."""
    from typer.testing import CliRunner

    from irtrain.cli.main import app

    r = CliRunner().invoke(app, ["score", str(data_dir), "--model", str(tiny_model_dir), "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert re.search(r"score \S+: [\d,]+ tokens in \d:\d\d:\d\d", r.stderr), r.stderr
    assert not [b for b in HF_BARS if b in r.output]


def test_the_readme_examples_have_the_display_s_format():
    """README's examples (copied from real runs) keep to the format: frame lines exactly 80
    columns with count, eta and rate; log lines as `plain_line` writes them; the summary."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    part = readme[readme.index("- **What you see**"):]
    blocks = [b.split("```", 1)[0] for b in part.split("```text\n")[1:3]]
    frames = [ln.strip() for ln in blocks[0].splitlines() if ln.strip()]
    heads = [ln for ln in frames if ln.startswith("sft ━")]
    assert len(heads) == 2 and all(HEAD.match(h) and len(h) == 80 for h in heads), heads
    assert all(len(ln) <= 80 for ln in frames) and "saving checkpoint-0000020…" in frames
    log = [ln.strip() for ln in blocks[1].splitlines() if ln.strip()]
    steps = [ln for ln in log if ln.startswith("sft step") and "saving" not in ln]
    assert len(steps) == 4 and all(re.match(r"sft step \d+/40 \| \d:\d\d:\d\d elapsed \| eta \d:\d\d:\d\d \| "
                                            r"[\d.]+ it/s [\d.]+k tok/s \| loss [\d.]+ lr [\d.]+e-0\d grad_norm ", ln) for ln in steps)
    assert [ln.split(":")[0] for ln in log[-5:]] == ["sft done", "final", "best", "last checkpoint", "outputs in runs/sft"]
