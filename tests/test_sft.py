"""`irtrain sft`: the SFT objective in the shared loop. Packed = separate, its reduction
invariance (micro-batches, accumulation, ranks), it learns, every loss and KL estimator
runs, and the example configs run as written.

All on a 2-layer Llama built from a config (conftest `tiny_model_dir`) and data generated
here (`test_train_common`). The loss values and gradients of each SFT loss are tested in
test_losses.py; the loop itself (resume, SIGTERM, the non-finite guard, its checks) in
test_loop.py; here we test the SFT objective's use of them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import DPOConfig, SFTConfig, config_to_dict, load_config
from irtrain.losses import response_token_stats, segment_sums
from irtrain.sft import SFTObjective
from irtrain.shards import ShardSet
from irtrain.train.batching import PackedData, collate, split_step
from irtrain.train.metrics import read_metrics
from irtrain.train.packed import packed_forward
from irtrain.train.reference import sequence_logps

import test_train_common as common
from test_train_common import load_model, prepare_task, sft

# fixtures shared with test_loop.py (assigned, not imported: pytest finds them by name)
one_torch_thread, task_shards = common.one_torch_thread, common.task_shards
data_dir, heldout_dir, pref_dir = common.data_dir, common.heldout_dir, common.pref_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# --------------------------------------------------------------------------- packed = separate
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


# --------------------------------------------------------------------------- reduction invariance
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


# --------------------------------------------------------------------------- it learns (+ the run's outputs)
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
def _file_values(path: Path) -> dict:
    """An example file's settings, keyed as the config's fields."""
    return {k.replace("-", "_"): v for k, v in tomllib.loads(path.read_text(encoding="utf-8")).items()}


def _assert_run_used(example: Path, cls: type, out: Path, flags: dict) -> None:
    """OUT/config.toml, the config the run resolved, holds every value of the example file,
    except the ones the test gave as flags, which hold the flags' values."""
    resolved = config_to_dict(load_config(cls, out / "config.toml"))
    for key, value in _file_values(example).items():
        if key not in flags:
            assert resolved[key] == value, (example.name, key, resolved[key], value)
    for key, value in flags.items():
        assert resolved[key] == value, (example.name, key)


@pytest.fixture
def tiny_workdir(tiny_model_dir, tmp_path, monkeypatch):
    """What the tiny examples' headers make, laid out where they expect it, in a fresh
    working directory: tiny/model and tiny/shards/{sft,pref,heldout_pref} (--max-len 512)."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "tiny" / "model")
    prepare_task(tmp_path / "tiny" / "shards", model, n_sft=64, n_pref=32, n_heldout=16, seed=0, max_len=512)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_tiny_examples_run_as_written(tiny_workdir):
    """examples/sft-tiny.toml, then examples/dpo-tiny.toml from its last checkpoint as its
    header says, each run for 2 steps with the file's own paths and settings: the resolved
    config the run wrote is the file's, and the run shows them (2 steps of the file's cosine
    schedule without warmup: lr, lr/2; the file's global batch; its eval pairs evaluated at
    the start and the end; its out directory)."""
    runner = CliRunner()
    sft_toml, dpo_toml = EXAMPLES / "sft-tiny.toml", EXAMPLES / "dpo-tiny.toml"

    # sft: --save-at 10,20 lies beyond a 2-step run, so it is overridden too
    r = runner.invoke(app, ["sft", "--config", str(sft_toml), "--max-steps", "2", "--save-at", "1"])
    assert r.exit_code == 0, r.output
    sft_file, out = _file_values(sft_toml), Path(_file_values(sft_toml)["out"])
    _assert_run_used(sft_toml, SFTConfig, out, {"max_steps": 2, "save_at": "1"})
    m = read_metrics(out)
    assert [x["step"] for x in m] == [0, 1, 2]
    assert [x["step"] for x in m if "eval/pref_accuracy" in x] == [0, 2]  # eval_steps 20: the start and the end
    steps = [x for x in m if "loss" in x]
    assert [x["lr"] for x in steps] == pytest.approx([sft_file["lr"], sft_file["lr"] / 2])
    rows = len(ShardSet(sft_file["data"][0]))
    assert [x["epoch"] for x in steps] == pytest.approx([sft_file["global_batch"] / rows, 2 * sft_file["global_batch"] / rows])
    assert all(f"loss/{sft_file['loss']}" in x for x in steps)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000001", "checkpoint-0000002"]

    # dpo, from the sft run's last checkpoint (as the file's header has it)
    start = sorted(out.glob("checkpoint-*"))[-1]
    r = runner.invoke(app, ["dpo", "--config", str(dpo_toml), "--model", str(start), "--max-steps", "2"])
    assert r.exit_code == 0, r.output
    dpo_file, dpo_out = _file_values(dpo_toml), Path(_file_values(dpo_toml)["out"])
    _assert_run_used(dpo_toml, DPOConfig, dpo_out, {"model": str(start), "max_steps": 2})
    m = read_metrics(dpo_out)
    assert [x["step"] for x in m] == [0, 1, 2]
    assert [x["step"] for x in m if "eval/pref_accuracy" in x] == [0, 2]
    steps = [x for x in m if "loss" in x]
    assert [x["lr"] for x in steps] == pytest.approx([dpo_file["lr"], dpo_file["lr"] / 2])
    rows = len(ShardSet(dpo_file["data"][0]))
    assert [x["epoch"] for x in steps] == pytest.approx([dpo_file["global_batch"] / rows, 2 * dpo_file["global_batch"] / rows])
    assert sorted(p.name for p in dpo_out.glob("checkpoint-*")) == ["checkpoint-0000002"]


@pytest.mark.parametrize("name,command,cls", [("sft-llama3-8b-ultrachat.toml", "sft", SFTConfig),
                                              ("dpo-llama3-8b-ultrafeedback.toml", "dpo", DPOConfig)])
def test_big_recipes_resolve(name, command, cls, tmp_path, monkeypatch):
    """The 8-GPU recipes load, their options pass the objective's checks, `--print-config`
    prints a config that loads back to the same one, and the DeepSpeed file they name
    (relative to the repo root, where their launch lines run) fills in to their global
    batch on the 8 GPUs they are sized for."""
    from irtrain.train.strategy import deepspeed_config

    recipe = EXAMPLES / name
    cfg = load_config(cls, recipe)
    if cls is SFTConfig:
        SFTObjective(cfg)
    else:
        from irtrain.dpo import resolve_loss

        resolve_loss(cfg)
    printed = CliRunner().invoke(app, [command, "--config", str(recipe), "--print-config"])
    assert printed.exit_code == 0, printed.output
    (tmp_path / "printed.toml").write_text(printed.output, encoding="utf-8")
    assert config_to_dict(load_config(cls, tmp_path / "printed.toml")) == config_to_dict(cfg)
    assert all(config_to_dict(cfg)[k] == v for k, v in _file_values(recipe).items())  # nothing in the file is dropped
    monkeypatch.chdir(EXAMPLES.parent)
    ds = deepspeed_config(cfg.deepspeed, cfg, bf16=True, world_size=8)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == cfg.global_batch  # micro_batch x accumulation x 8 GPUs
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8 == cfg.global_batch
    assert ds["gradient_clipping"] == cfg.max_grad_norm
