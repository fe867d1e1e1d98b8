"""`irtrain.train.loop.train`, the loop shared by sft and dpo: reduction invariance through
the loop, exact resume, SIGTERM, the non-finite step guard, the objective's step hooks and
state, and the checks that fail a run before anything is written.

Driven through `irtrain sft` (the SFT objective is the simplest one) on a 2-layer Llama
built from a config (conftest `tiny_model_dir`) and the generated task (`test_train_common`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from irtrain.config import SFTConfig, load_config
from irtrain.errors import TrainingError
from irtrain.sft import SFTObjective
from irtrain.train.checkpoint import read_state
from irtrain.train.loop import train
from irtrain.train.metrics import read_metrics

import test_train_common as common
from test_train_common import base_args, make_preference_shards, make_sft_shards, sft

# fixtures shared with test_sft.py (assigned, not imported: pytest finds them by name)
one_torch_thread, task_shards, data_dir = common.one_torch_thread, common.task_shards, common.data_dir


def _cfg(model, data, out, **kw) -> SFTConfig:
    return load_config(SFTConfig, None, {"model": str(model), "data": [str(data)], "out": str(out), "lr": 1e-3,
                                         "global_batch": 4, "micro_batch": 2, "kl_metrics": False, "tensorboard": False, **kw})


# --------------------------------------------------------------------------- reduction invariance
def test_reduction_invariance_through_the_loop(tiny_model_dir, data_dir, tmp_path):
    """(micro-batch 8, accumulation 1) and (micro-batch 2, accumulation 4) through `irtrain sft`:
    loss trace and weights after 3 steps agree (the second run also recomputes activations:
    gradient checkpointing changes no number)."""
    r1 = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "a", "--micro-batch", "8", "--max-steps", "3"))
    r2 = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "b", "--micro-batch", "2", "--max-steps", "3",
                        "--gradient-checkpointing"))
    assert r1.exit_code == 0, r1.output
    assert r2.exit_code == 0, r2.output
    l1 = [m["loss"] for m in read_metrics(tmp_path / "a")]
    l2 = [m["loss"] for m in read_metrics(tmp_path / "b")]
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    w1 = load_file(str(tmp_path / "a" / "checkpoint-0000003" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "b" / "checkpoint-0000003" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- exact resume, SIGTERM
def test_exact_resume_bit_identical(tiny_model_dir, data_dir, tmp_path):
    """Stopped at step 3 (its checkpoint and nothing after) and resumed: the same per-step
    loss trace and bit-identical final weights (CPU), optimizer and RNG restored."""
    args = ["--max-steps", "6", "--save-at", "3", "--lr-schedule", "cosine", "--warmup-ratio", "0.2"]
    full = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "full", *args))
    assert full.exit_code == 0, full.output
    part = tmp_path / "part"
    first = sft(*base_args(tiny_model_dir, data_dir, part, *args))
    assert first.exit_code == 0, first.output
    # Turn the second run into one that stopped at step 3: drop everything after it.
    shutil.rmtree(part / "checkpoint-0000006")
    lines = [ln for ln in (part / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= 3]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    resumed = sft(*base_args(tiny_model_dir, data_dir, part, *args, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    trace_full = [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in read_metrics(tmp_path / "full")]
    trace_res = [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in read_metrics(part)]
    assert trace_res == trace_full  # exact equality: bit-identical floats
    w_full = load_file(str(tmp_path / "full" / "checkpoint-0000006" / "model.safetensors"))
    w_res = load_file(str(part / "checkpoint-0000006" / "model.safetensors"))
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_sigterm_writes_resumable_checkpoint(tiny_model_dir, data_dir, tmp_path):
    """A real `irtrain sft` process gets SIGTERM mid-run: it writes a checkpoint and stops;
    `--resume` continues with the same trace and weights as an uninterrupted run."""
    out = tmp_path / "run"
    common = ("--lr-schedule", "constant", "--global-batch", "4")
    args = base_args(tiny_model_dir, data_dir, out, "--max-steps", "5000", *common)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "irtrain.cli.main", "sft", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert b"interrupted by signal" in err
    assert b"sft done: stopped at step " in err and b"(interrupted)" in err  # the summary, with the checkpoint
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1
    k = int(ckpts[0].name.split("-")[1])
    assert 2 <= k < 5000
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["state"]["step"] == k
    assert not list(out.glob(".checkpoint-*"))  # no half-written checkpoint left
    # resume (to a shorter end: the constant schedule does not depend on the run length)
    resumed = sft(*base_args(tiny_model_dir, data_dir, out, "--max-steps", k + 3, *common, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    trace = read_metrics(out)
    assert [m["step"] for m in trace] == list(range(1, k + 4))
    ref = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "ref", "--max-steps", k + 3, *common))
    assert ref.exit_code == 0, ref.output
    ref_trace = read_metrics(tmp_path / "ref")
    # another process computed steps 1..k, so compare to float tolerance rather than bitwise
    np.testing.assert_allclose([m["loss"] for m in trace], [m["loss"] for m in ref_trace], rtol=1e-6)
    w = load_file(str(out / f"checkpoint-{k + 3:07d}" / "model.safetensors"))
    w_ref = load_file(str(tmp_path / "ref" / f"checkpoint-{k + 3:07d}" / "model.safetensors"))
    for name in w:
        torch.testing.assert_close(w[name], w_ref[name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the non-finite guard
class NonFiniteAt(SFTObjective):
    """The SFT objective with a NaN loss injected at chosen optimizer steps (1-based, as the
    metrics count them); the step is known from the loop's `begin_step` hook."""

    def __init__(self, cfg, bad_steps):
        super().__init__(cfg)
        self.bad, self.step, self.begun = set(bad_steps), None, []

    def begin_step(self, step, batches):
        super().begin_step(step, batches)
        self.step = step + 1  # begin_step gets the 0-based index of the step about to run
        self.begun.append(step)

    def micro_step(self, model, batch, denominator):
        loss, stats = super().micro_step(model, batch, denominator)
        return (loss * float("nan") if self.step in self.bad else loss), stats


def test_non_finite_step_is_skipped_and_counted(tiny_model_dir, data_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, data_dir, tmp_path / "o", max_steps=4, save_at="1")
    objective = NonFiniteAt(cfg, bad_steps={2})
    train(cfg, objective)
    assert objective.begun == [0, 1, 2, 3]
    m = read_metrics(tmp_path / "o")
    assert [r["bad_steps"] for r in m] == [0, 1, 1, 1]
    assert m[1].get("skipped") is True and m[1]["loss"] == "nan"
    assert all(np.isfinite(r["loss"]) for r in (m[0], m[2], m[3]))
    assert m[2]["trained_tokens"] - m[0]["trained_tokens"] < m[2]["tokens"]  # step 2's tokens not counted as trained

    # after --max-bad-steps in a row the run stops, keeping the last good checkpoint
    cfg2 = _cfg(tiny_model_dir, data_dir, tmp_path / "p", max_steps=8, save_steps=1, max_bad_steps=2)
    objective2 = NonFiniteAt(cfg2, bad_steps={3, 4, 5, 6})
    with pytest.raises(TrainingError, match="2 non-finite steps in a row.*checkpoint-0000002"):
        train(cfg2, objective2)
    assert objective2.begun == [0, 1, 2, 3]  # stopped after the second bad step in a row
    assert (tmp_path / "p" / "checkpoint-0000002").is_dir()


# --------------------------------------------------------------------------- the objective's hooks and state
class Recording(SFTObjective):
    """The SFT objective, recording the loop's hook calls; its state is the count of ended steps."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls: list[tuple] = []
        self.ended = 0
        self.loaded: dict | None = None

    def begin_step(self, step, batches):
        self.calls.append(("begin", step, len(batches), sum(b.num_tokens for b in batches)))

    def micro_step(self, model, batch, denominator):
        self.calls.append(("micro", denominator))
        return super().micro_step(model, batch, denominator)

    def end_step(self, step, stats):
        self.calls.append(("end", step, dict(stats)))
        self.ended += 1

    def state_dict(self):
        return {"ended": self.ended}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.ended = state["ended"]


def test_step_hooks_order_stats_and_state(tiny_model_dir, data_dir, tmp_path):
    """Per step: begin_step(step, this rank's micro-batches), the micro-steps, end_step(step,
    stats summed over the micro-batches) whose sum / count is what the loop logs. The
    objective's state_dict goes into every checkpoint and comes back on --resume."""
    out = tmp_path / "o"
    cfg = _cfg(tiny_model_dir, data_dir, out, max_steps=3, save_at="2")
    obj = Recording(cfg)
    train(cfg, obj)
    kinds = [c[0] for c in obj.calls]
    assert kinds == ["begin", "micro", "micro", "end"] * 3  # 4 rows a step, 2 per micro-batch
    begins = [c for c in obj.calls if c[0] == "begin"]
    ends = [c for c in obj.calls if c[0] == "end"]
    assert [c[1] for c in begins] == [0, 1, 2] and [c[1] for c in ends] == [0, 1, 2]
    assert all(c[2] == 2 for c in begins)
    logged = read_metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3]
    step_tokens = np.diff([0] + [m["tokens"] for m in logged]).tolist()  # `tokens` is logged as a running total
    assert [c[3] for c in begins] == step_tokens  # begin_step was given the batches the step trained on
    for (_, _, stats), m in zip(ends, logged):
        assert set(stats) >= {"loss/ce", "token_accuracy", "entropy", "value/s0"}
        for name, (s, c) in stats.items():
            assert m[name] == s / c, name  # exactly what was logged
    # every micro-step of a step saw the same (step-wide) denominator: the step's response tokens
    denoms = [c[1] for c in obj.calls if c[0] == "micro"]
    assert denoms[0::2] == denoms[1::2]
    assert denoms[0::2] == [ends[i][2]["loss/ce"][1] for i in range(3)]
    assert read_state(out / "checkpoint-0000002")[0].extra["objective"] == {"ended": 2}
    assert read_state(out / "checkpoint-0000003")[0].extra["objective"] == {"ended": 3}

    # resume from step 2 (drop the last checkpoint): load_state_dict gets the saved state
    shutil.rmtree(out / "checkpoint-0000003")
    cfg_r = _cfg(tiny_model_dir, data_dir, out, max_steps=3, save_at="2", resume=True)
    obj_r = Recording(cfg_r)
    train(cfg_r, obj_r)
    assert obj_r.loaded == {"ended": 2}
    assert [c[1] for c in obj_r.calls if c[0] == "begin"] == [2]
    assert read_state(out / "checkpoint-0000003")[0].extra["objective"] == {"ended": 3}


# --------------------------------------------------------------------------- bad input
def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    text = (result.stderr if hasattr(result, "stderr") else result.output).strip()
    assert text.startswith("error:") and "\n" not in text, text
    assert "Traceback" not in result.output
    return text


def test_bad_input_fails_before_training_and_writes_nothing(tiny_model_dir, tokenizer_dirs, data_dir, tmp_path):
    from transformers import AutoTokenizer

    from irtrain.shards import write_shard_set

    other_tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama3"]))
    other = make_sft_shards(other_tok, tmp_path / "other-tok", n=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_rows = tmp_path / "no-rows"
    write_shard_set(no_rows, "chat", [], max_len=128)
    pairs_only = make_preference_shards(AutoTokenizer.from_pretrained(str(tiny_model_dir)), tmp_path / "pairs", n=4)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('lr = 1e-4\nlearning_rate_typo = 3\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    before = sorted(p.name for p in Path(data_dir).iterdir())
    out = tmp_path / "out"
    cases = {
        "no such directory": ["--model", tmp_path / "no-model", "--out", out, data_dir],
        "another tokenizer": ["--model", tiny_model_dir, "--out", out, other],
        "not a shard directory": ["--model", tiny_model_dir, "--out", out, empty],
        "holds no rows": ["--model", tiny_model_dir, "--out", out, no_rows],
        "sft trains on chat": ["--model", tiny_model_dir, "--out", out, pairs_only],
        "unknown config key 'learning_rate_typo'": ["--config", bad_toml, "--model", tiny_model_dir, "--out", out, data_dir],
        "beyond the run": ["--model", tiny_model_dir, "--out", out, "--max-steps", "10", "--save-at", "5,11", data_dir],
        "is not writable": ["--model", tiny_model_dir, "--out", "/sys/irtrain-sft-out", "--global-batch", "8", data_dir],
        "is not a directory": ["--model", tiny_model_dir, "--out", a_file / "sub", "--global-batch", "8", data_dir],
        "is not one of": ["--model", tiny_model_dir, "--out", out, "--loss", "mse", data_dir],
    }
    for expected, args in cases.items():
        msg = _one_line_error(sft(*args))
        assert expected in msg, (expected, msg)
        assert not out.exists(), expected
        assert not (a_file.parent / "sub").exists()
    assert sorted(p.name for p in Path(data_dir).iterdir()) == before  # no reference cache written either


# --------------------------------------------------------------------------- mixtures and document budgets
def test_weighted_mixture_trains_resumes_exactly_and_reports_proportions(tiny_model_dir, tmp_path):
    """Three sources at --weights 0.5,0.3,0.2: the metrics give each source's realised share
    and epochs (the plan's, to one row), and a run stopped at step 3 resumes on the same trace."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    dirs = [make_sft_shards(tok, tmp_path / name, n=n, seed=i) for i, (name, n) in enumerate((("a", 60), ("b", 30), ("c", 20)))]
    args = ["--max-steps", "6", "--save-at", "3", "--weights", "0.5,0.3,0.2", "--global-batch", "10"]

    def run(out: Path, *extra: str):
        r = sft("--model", tiny_model_dir, "--out", out, "--lr", "1e-3", "--micro-batch", "5", "--warmup-ratio", "0",
                "--no-kl-metrics", "--no-tensorboard", *args, *extra, *dirs)
        assert r.exit_code == 0, r.output

    run(tmp_path / "full")
    rows = read_metrics(tmp_path / "full")
    for m in rows:
        shares = [m[f"data/{n}/fraction"] for n in "abc"]
        assert abs(sum(shares) - 1) < 1e-9
        # after k steps of 10 rows each share is within one row of its weight
        assert all(abs(f * 10 * m["step"] - w * 10 * m["step"]) <= 1 + 1e-9 for f, w in zip(shares, (0.5, 0.3, 0.2))), m
    last = rows[-1]
    from irtrain.shards import ShardSet

    sizes = {d.name: len(ShardSet(d)) for d in dirs}
    assert last["data/a/epochs"] == pytest.approx(0.5 * 60 / sizes["a"])
    assert last["data/c/epochs"] == pytest.approx(0.2 * 60 / sizes["c"])

    part = tmp_path / "part"
    run(part)
    shutil.rmtree(part / "checkpoint-0000006")
    lines = [ln for ln in (part / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= 3]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run(part, "--resume")
    keys = ("step", "loss", "grad_norm", "data/a/fraction", "data/b/epochs")
    assert [tuple(m[k] for k in keys) for m in read_metrics(part)] == [tuple(m[k] for k in keys) for m in rows]
    # the weights are part of the data order: resuming with others is refused
    args[args.index("0.5,0.3,0.2")] = "0.4,0.4,0.2"
    r = sft("--model", tiny_model_dir, "--out", part, "--lr", "1e-3", "--micro-batch", "5", "--no-tensorboard", *args,
            "--resume", *dirs)
    assert r.exit_code != 0 and "weights" in r.output


def test_global_batch_docs_steps_hold_that_many_documents(tiny_model_dir, data_dir, tmp_path):
    """--global-batch-docs 12: every step trains 12 conversations (rows hold ~5 each), logged as `docs`."""
    r = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "d", "--global-batch-docs", "12", "--max-steps", "4"))
    assert r.exit_code == 0, r.output
    assert [m["docs"] for m in read_metrics(tmp_path / "d")] == [12.0] * 4
    bad = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "e", "--global-batch-docs", "12", "--global-batch-tokens", "100"))
    assert bad.exit_code != 0 and "--global-batch-docs" in bad.output
    assert not (tmp_path / "e").exists()  # refused before anything is written
    bad = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "f", "--weights", "0.5,0.5", "--max-steps", "2"))
    assert bad.exit_code != 0 and "--weights gives 2 weight(s) for 1 data source(s)" in bad.output
