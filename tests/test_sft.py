"""`irtrain sft` and the shared loop: packed = separate, reduction invariance, exact resume,
SIGTERM, the non-finite guard, it learns, checkpoints, metrics, bad input.

All on a 2-layer Llama built from a config (conftest `tiny_model_dir`) and data generated
here (`test_train_common`). The loss values and gradients of each SFT loss are tested in
test_losses.py; here we test the loop's use of them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import SFTConfig, load_config
from irtrain.errors import TrainingError
from irtrain.losses import response_token_stats, segment_sums
from irtrain.shards import ShardSet
from irtrain.sft import SFTObjective
from irtrain.train.batching import PackedData, collate, split_step
from irtrain.train.metrics import read_metrics
from irtrain.train.packed import packed_forward
from irtrain.train.reference import sequence_logps

from test_train_common import make_preference_shards, make_sft_shards, one_torch_thread, prepare_task  # noqa: F401

runner = CliRunner()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def task_shards(tiny_model_dir, tmp_path_factory):
    """The generated arithmetic task through the real `irtrain prepare`."""
    return prepare_task(tmp_path_factory.mktemp("task"), tiny_model_dir, n_sft=200, n_heldout=48, seed=0, max_len=128)


@pytest.fixture(scope="module")
def data_dir(task_shards):
    return task_shards["sft"]


@pytest.fixture(scope="module")
def heldout_dir(task_shards):
    return task_shards["heldout"]


@pytest.fixture(scope="module")
def pref_dir(task_shards):
    return task_shards["heldout_pref"]


def load_model(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    m.config.use_cache = False
    return m


def sft(*args: str) -> "object":
    result = runner.invoke(app, ["sft", *map(str, args)])
    return result


def base_args(model, data, out, *extra):
    return ["--model", model, "--out", out, "--lr", "1e-3", "--global-batch", "8", "--micro-batch", "2",
            "--warmup-ratio", "0", "--no-kl-metrics", "--no-tensorboard", *extra, data]


# --------------------------------------------------------------------------- 2. packed = separate
def test_packed_equals_separate(tiny_model_dir, data_dir):
    """Per-document losses of a packed micro-batch equal each document run alone, for the
    exact CPU paths: per-document SDPA (irtrain_varlen, the CPU default) and transformers'
    block-diagonal mask from position_ids (sdpa, eager)."""
    ss = ShardSet(data_dir)
    rows = [ss.row(0), ss.row(1)]  # a micro-batch of two packed rows, concatenated
    packed = collate(rows)
    assert packed.num_segments >= 4, "the fixture packs several documents per row"
    ids_all, labels_all = packed.input_ids[0], packed.labels[0]
    for impl in ("irtrain_varlen", "sdpa", "eager"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=impl, dtype=torch.float32).eval()
        with torch.no_grad():
            stats = response_token_stats(packed_forward(model, packed), packed.labels)
            per_doc = segment_sums(-stats.logps, packed.seg_id[stats.index], packed.num_segments)
            for j in range(packed.num_segments):
                a, b = int(packed.cu_seqlens[j]), int(packed.cu_seqlens[j + 1])
                ids, labels = ids_all[a:b][None], labels_all[a:b][None]
                alone = response_token_stats(model(input_ids=ids, use_cache=False).logits, labels)
                torch.testing.assert_close(per_doc[j], -alone.logps.sum(), rtol=1e-5, atol=1e-5)
            # and the documents really do interact without the boundaries
            leaky = response_token_stats(model(input_ids=packed.input_ids, use_cache=False).logits, packed.labels)
            assert not torch.allclose(leaky.logps, stats.logps, atol=1e-3)


# --------------------------------------------------------------------------- 3. reduction invariance
def _step_grads(model_dir, data_dir, *, micro_batch, micro_batch_tokens=0, world=1, loss="ce"):
    """Loss and gradients of one optimizer step (8 rows), computed as the loop does."""
    cfg = SFTConfig(model=str(model_dir), data=[str(data_dir)], out="unused", loss=loss, kl_metrics=False)
    obj = SFTObjective(cfg)
    data = PackedData([ShardSet(data_dir)])
    model = load_model(model_dir)
    rows = np.arange(8)
    total = 0.0
    per_rank = [[data.batch(r, w) for r, w in split_step(rows, data.lengths, world_size=world, rank=k, micro_batch=micro_batch,
                                                        micro_batch_tokens=micro_batch_tokens)] for k in range(world)]
    denom = sum(obj.step_denominator(bs) for bs in per_rank)
    n_micro = {len(bs) for bs in per_rank}
    for bs in per_rank:  # ranks' gradients summed, as the strategy's all-reduce does
        for b in bs:
            loss, _ = obj.micro_step(model, b, denom)
            loss.backward()
            total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}, n_micro


def test_reduction_invariance(tiny_model_dir, data_dir):
    """(micro-batch 8, accumulation 1) == (micro-batch 2, accumulation 4) == token-budget
    micro-batches == 2 ranks x 2 micro-batches: same step loss and gradients."""
    loss8, g8, n8 = _step_grads(tiny_model_dir, data_dir, micro_batch=8)
    loss2, g2, n2 = _step_grads(tiny_model_dir, data_dir, micro_batch=2)
    lossT, gT, _ = _step_grads(tiny_model_dir, data_dir, micro_batch=1, micro_batch_tokens=300)
    lossW, gW, nW = _step_grads(tiny_model_dir, data_dir, micro_batch=2, world=2)
    assert n8 == {1} and n2 == {4} and nW == {2}
    for other_loss, other in ((loss2, g2), (lossT, gT), (lossW, gW)):
        assert abs(other_loss - loss8) < 1e-5
        for n in g8:
            torch.testing.assert_close(other[n], g8[n], rtol=1e-4, atol=1e-7)


def test_reduction_invariance_through_the_loop(tiny_model_dir, data_dir, tmp_path):
    """The same through `irtrain sft`: loss trace and weights after 3 steps agree (the second
    run also recomputes activations: gradient checkpointing changes no number)."""
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


# --------------------------------------------------------------------------- 4. exact resume, SIGTERM, non-finite
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
    import shutil

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


class NonFiniteAt(SFTObjective):
    """The SFT objective with a NaN loss injected at chosen steps (counted by micro-step)."""

    def __init__(self, cfg, bad_steps, micro_per_step):
        super().__init__(cfg)
        self.bad, self.micro_per_step, self.calls = set(bad_steps), micro_per_step, 0

    def micro_step(self, model, batch, denominator):
        step = self.calls // self.micro_per_step + 1
        self.calls += 1
        loss, stats = super().micro_step(model, batch, denominator)
        return (loss * float("nan") if step in self.bad else loss), stats


def test_non_finite_step_is_skipped_and_counted(tiny_model_dir, data_dir, tmp_path):
    from irtrain.train.loop import train

    cfg = load_config(SFTConfig, None, {"model": str(tiny_model_dir), "data": [str(data_dir)], "out": str(tmp_path / "o"),
                                         "lr": 1e-3, "global_batch": 4, "micro_batch": 2, "max_steps": 4, "save_at": "1",
                                         "kl_metrics": False, "tensorboard": False})
    train(cfg, NonFiniteAt(cfg, bad_steps={2}, micro_per_step=2))
    m = read_metrics(tmp_path / "o")
    assert [r["bad_steps"] for r in m] == [0, 1, 1, 1]
    assert m[1].get("skipped") is True and m[1]["loss"] == "nan"
    assert all(np.isfinite(r["loss"]) for r in (m[0], m[2], m[3]))
    assert m[2]["trained_tokens"] - m[0]["trained_tokens"] < m[2]["tokens"]  # step 2's tokens not counted as trained

    # after --max-bad-steps in a row the run stops, keeping the last good checkpoint
    cfg2 = load_config(SFTConfig, None, {"model": str(tiny_model_dir), "data": [str(data_dir)], "out": str(tmp_path / "p"),
                                          "lr": 1e-3, "global_batch": 4, "micro_batch": 2, "max_steps": 8, "save_steps": 1,
                                          "max_bad_steps": 2, "kl_metrics": False, "tensorboard": False})
    with pytest.raises(TrainingError, match="2 non-finite steps in a row.*checkpoint-0000002"):
        train(cfg2, NonFiniteAt(cfg2, bad_steps={3, 4, 5, 6}, micro_per_step=2))
    assert (tmp_path / "p" / "checkpoint-0000002").is_dir()


# --------------------------------------------------------------------------- 6. it learns (+ the run's outputs)
def heldout_loss(model_dir, heldout) -> float:
    model = load_model(model_dir).eval()
    nll, n = 0.0, 0
    for _, _, sums, counts in sequence_logps(model, ShardSet(heldout), device=torch.device("cpu"), token_budget=1024):
        nll -= float(sums.sum())
        n += int(counts.sum())
    return nll / n


def test_it_learns(tiny_model_dir, data_dir, heldout_dir, pref_dir, tmp_path):
    """`irtrain sft` (the real CLI) lowers held-out loss by more than 60% on the generated task; every
    step logs the metrics of the issue, value/s0 included; checkpoints load with from_pretrained."""
    out = tmp_path / "run"
    r = sft("--model", tiny_model_dir, "--out", out, "--lr", "3e-3", "--global-batch", "4", "--micro-batch", "4",
            "--max-steps", "60", "--warmup-ratio", "0.1", "--save-at", "30", "--eval-pairs", pref_dir, "--eval-steps", "30",
            "--no-tensorboard", data_dir)
    assert r.exit_code == 0, r.output
    before, after = heldout_loss(tiny_model_dir, heldout_dir), heldout_loss(out / "checkpoint-0000060", heldout_dir)
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.4 * before  # the stated margin: held-out loss falls by more than 60%
    m = read_metrics(out)
    steps = [x for x in m if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 61))
    for x in steps:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "token_accuracy", "entropy", "value/s0",
                    "kl/k1", "kl/k2", "kl/k3"):
            assert key in x and isinstance(x[key], float | int), key
    assert abs(steps[0]["kl/k1"]) < 1e-4  # against the starting model, before its first update
    assert steps[-1]["token_accuracy"] > steps[0]["token_accuracy"] + 0.3
    evals = [x for x in m if "eval/pref_loss" in x]
    assert [x["step"] for x in evals] == [0, 30, 60]
    assert abs(evals[0]["eval/pref_loss"] - np.log(2)) < 1e-4
    # outputs: resolved config, checkpoints (end + --save-at) loadable by from_pretrained with the tokenizer
    assert (out / "config.toml").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000030", "checkpoint-0000060"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = out / "checkpoint-0000030"
    assert (ck / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(str(ck))
    AutoTokenizer.from_pretrained(str(ck))
    # the reference log-probs were cached beside the shards
    assert len(list((Path(data_dir) / "reference").glob("*.safetensors"))) >= 1


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


# --------------------------------------------------------------------------- every loss and KL estimator runs in the loop
@pytest.mark.parametrize("loss,kl", [("ce", "full"), ("dft", "k1"), ("pearson", "k2"), ("hellinger", "k3"), ("js", "full")])
def test_losses_and_kl_in_the_loop(tiny_model_dir, data_dir, tmp_path, loss, kl):
    out = tmp_path / "o"
    r = sft("--model", tiny_model_dir, "--out", out, "--loss", loss, "--kl-coef", "0.1", "--kl-estimator", kl,
            "--global-batch", "4", "--micro-batch", "2", "--max-steps", "2", "--lr", "1e-3", "--no-tensorboard", data_dir)
    assert r.exit_code == 0, r.output
    m = read_metrics(out)
    assert [x["step"] for x in m] == [1, 2]
    assert all(np.isfinite(x["loss"]) and x.get("skipped") is None for x in m)
    first = m[0]
    assert abs(first["kl/k3"]) < 1e-6  # the model is the reference at step 1
    if kl == "full":
        assert abs(first["kl/full"]) < 1e-6 and m[1]["kl/full"] > 0
    # at step 1 the KL term is 0, so the step loss is the SFT loss alone
    assert first["loss"] == pytest.approx(first[f"loss/{loss}"], rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- the example configs
def test_example_configs(tiny_model_dir, data_dir, pref_dir, tmp_path):
    """examples/sft-tiny.toml runs through the CLI (paths overridden by flags, which win);
    the Llama-3-8B recipe resolves to the paper's settings."""
    root = Path(__file__).resolve().parents[1] / "examples"
    r = sft("--config", root / "sft-tiny.toml", "--model", tiny_model_dir, "--out", tmp_path / "o", "--eval-pairs", pref_dir,
            "--max-steps", "2", "--save-at", "1", "--eval-steps", "0", "--global-batch", "8", data_dir)
    assert r.exit_code == 0, r.output
    assert [m["step"] for m in read_metrics(tmp_path / "o")] == [0, 1, 2]
    printed = sft("--config", root / "sft-llama3-8b-ultrachat.toml", "--print-config")
    assert printed.exit_code == 0, printed.output
    recipe = load_config(SFTConfig, root / "sft-llama3-8b-ultrachat.toml")
    assert (recipe.model, recipe.lr, recipe.global_batch, recipe.epochs) == ("meta-llama/Meta-Llama-3-8B", 5e-6, 128, 1.0)
    assert recipe.deepspeed.endswith("zero3.json") and (root / "deepspeed" / "zero3.json").is_file()
    from irtrain.train.strategy import deepspeed_config

    ds = deepspeed_config(str(root / "deepspeed" / "zero3.json"), recipe, bf16=True, world_size=8)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (128, 2, 8)
    assert ds["gradient_clipping"] == recipe.max_grad_norm
