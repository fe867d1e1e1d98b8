"""LoRA / DoRA through peft (irtrain/adapters.py): a LoRA sft and dpo run on a tiny model
change only adapter parameters, the adapter loads with peft and with transformers, the
merged model equals base + adapter, resume is bit-identical, the reference is the base with
its adapters disabled, and every bad flag is a one-line error before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_common import (  # noqa: F401 (fixtures)
    base_args,
    cpu_dist_env,
    data_dir,
    heldout_dir,
    load_model,
    pref_dir,
    sft,
    task_shards,
    torchrun_irtrain,
)

pytest.importorskip("peft")

LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"]


def dpo(*args: object):
    from typer.testing import CliRunner

    from irtrain.cli.main import app

    return CliRunner().invoke(app, ["dpo", *map(str, args)])


def final(out: Path) -> Path:
    return sorted(out.glob("checkpoint-*"))[-1]


def adapter_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "adapter_model.safetensors"))


def peft_model(base_dir: Path, ckpt: Path):
    from peft import PeftModel

    m = PeftModel.from_pretrained(load_model(base_dir), str(ckpt))
    return m.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_sft(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-sft") / "run"
    r = sft(*base_args(tiny_model_dir, data_dir, out, "--max-steps", "4", "--save-steps", "2", "--merge-at-end", *LORA))
    assert r.exit_code == 0, r.output
    return out


# --------------------------------------------------------------------------- what a LoRA checkpoint is
def test_lora_sft_checkpoint_is_a_peft_adapter(tiny_model_dir, lora_sft):
    ckpt = final(lora_sft)
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt",
            "irtrain_base.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert Path(cfg["base_model_name_or_path"]) == Path(tiny_model_dir).resolve()
    tensors = adapter_tensors(ckpt)
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    assert not any("lm_head" in k or "embed" in k for k in tensors)
    # the adapter trained: B moved from its zero initialisation
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_B" in k)


def test_only_adapter_parameters_change(tiny_model_dir, lora_sft):
    """The base weights are never changed; the optimizer holds only the adapter's parameters."""
    base = load_model(tiny_model_dir)
    m = peft_model(tiny_model_dir, final(lora_sft))
    merged_base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                   for k, v in m.state_dict().items() if "lora_" not in k}
    for k, v in base.state_dict().items():
        assert torch.equal(merged_base[k], v), k
    opt = torch.load(final(lora_sft) / "optimizer.pt", weights_only=True)
    n_state = sum(v["exp_avg"].numel() for v in opt["state"].values())
    n_adapter = sum(v.numel() for v in adapter_tensors(final(lora_sft)).values())
    assert n_state == n_adapter


def test_adapter_loads_with_peft_and_transformers(tiny_model_dir, lora_sft):
    ckpt = final(lora_sft)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 14]])
    with_peft = logits(peft_model(tiny_model_dir, ckpt), ids)
    base = load_model(tiny_model_dir)
    base.load_adapter(str(ckpt))  # transformers' own adapter loading
    with_tf = logits(base.eval(), ids)
    assert torch.allclose(with_peft, with_tf, atol=1e-6)
    assert not torch.allclose(with_peft, logits(load_model(tiny_model_dir).eval(), ids), atol=1e-4)


def test_merged_model_equals_base_plus_adapter(tiny_model_dir, lora_sft):
    merged_dir = lora_sft / "merged"
    assert (merged_dir / "config.json").is_file() and (merged_dir / "model.safetensors").is_file()
    assert (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 14, 99, 3]])
    merged = load_model(merged_dir).eval()  # plain transformers: no peft involved
    assert torch.allclose(logits(merged, ids), logits(peft_model(tiny_model_dir, final(lora_sft)), ids), atol=1e-5)


def test_lora_resume_is_bit_identical(tiny_model_dir, data_dir, lora_sft, tmp_path):
    """Stopped at step 2 (its checkpoint copied alone) and resumed: the same adapter as the straight run."""
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(lora_sft / "checkpoint-0000002", out / "checkpoint-0000002")
    r = sft(*base_args(tiny_model_dir, data_dir, out, "--max-steps", "4", "--save-steps", "2", "--resume", *LORA))
    assert r.exit_code == 0, r.output
    a, b = adapter_tensors(final(out)), adapter_tensors(final(lora_sft))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    m1 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (lora_sft / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in m1 if m["step"] > 2] == [m["loss"] for m in m2 if m["step"] > 2]


def test_memory_line_is_printed(tiny_model_dir, data_dir, tmp_path):
    r = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "run", "--max-steps", "1", *LORA))
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("memory:"))
    assert "LoRA r=4" in line and "trainable" in line and "MiB" in line


# --------------------------------------------------------------------------- the reference is the base, never a second copy
@pytest.fixture
def count_loads(monkeypatch):
    """How many times the loop loads a model (the base, once, for a LoRA run)."""
    import irtrain.train.strategy as strategy

    calls: list[str] = []
    real = strategy.load_causal_lm

    def counting(path, **kwargs):
        calls.append(str(path))
        return real(path, **kwargs)

    monkeypatch.setattr(strategy, "load_causal_lm", counting)
    return calls


def test_lora_dpo_reference_is_the_base_with_adapters_disabled(tiny_model_dir, pref_dir, tmp_path, count_loads):
    """A LoRA dpo run: only adapter parameters change; its reference log-probs (computed by the
    training model with its adapters disabled) equal a full fine-tune's (computed by the base
    itself), entry for entry; a resumed run loads the base once and no second copy."""
    from irtrain.train.reference import ReferenceLogps

    common = ["--model", tiny_model_dir, "--lr", "1e-3", "--global-batch", "4", "--micro-batch", "2", "--warmup-ratio", "0",
              "--no-tensorboard", "--max-steps", "3", "--save-steps", "1", "--beta", "0.1", str(pref_dir)]
    full = dpo(*common, "--out", tmp_path / "full", "--reference-dir", tmp_path / "ref-full")
    assert full.exit_code == 0, full.output
    lora = dpo(*common, "--out", tmp_path / "lora", "--reference-dir", tmp_path / "ref-lora", *LORA)
    assert lora.exit_code == 0, lora.output
    assert count_loads == [str(tiny_model_dir), str(tiny_model_dir)]  # one per run: no reference copy for either
    (a,), (b,) = list((tmp_path / "ref-full").glob("*.safetensors")), list((tmp_path / "ref-lora").glob("*.safetensors"))
    assert a.name == b.name  # the same key: the base's hash
    ra, rb = ReferenceLogps.load(a), ReferenceLogps.load(b)
    np_eq = [(getattr(ra, n) == getattr(rb, n)).all() for n in ("token_logps", "seg_logps", "seg_tokens")]
    assert all(np_eq)
    # every rewards/* metric starts at 0: the step-1 policy (B = 0) is the reference
    m = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["rewards/margins"] == 0.0 and m[0]["kl/k1"] == 0.0
    # resume from step 1 with the cache moved away: recomputed with adapters disabled, same values
    import shutil

    for ck in ("checkpoint-0000002", "checkpoint-0000003"):
        shutil.rmtree(tmp_path / "lora" / ck)
    count_loads.clear()
    again = dpo(*common, "--out", tmp_path / "lora", "--reference-dir", tmp_path / "ref-resume", "--resume", *LORA)
    assert again.exit_code == 0, again.output
    assert count_loads == [str(tiny_model_dir)]
    (c,) = list((tmp_path / "ref-resume").glob("*.safetensors"))
    assert (ReferenceLogps.load(c).token_logps == ra.token_logps).all()
    m2 = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in m2] == [x["loss"] for x in m]


def test_lora_sft_kl_full_uses_the_base_with_adapters_disabled(tiny_model_dir, data_dir, tmp_path, count_loads):
    r = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "run", "--max-steps", "2", "--kl-coef", "0.1", "--kl-estimator", "full",
                       *LORA))
    assert r.exit_code == 0, r.output
    assert count_loads == [str(tiny_model_dir)]
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["kl/full"] == 0.0  # step 1: B = 0, the policy is the base exactly
    assert m[1]["kl/full"] > 0.0


def test_lora_kto_reference_without_a_copy(tiny_model_dir, tmp_path, count_loads):
    """KTO's reference point z0 needs the reference on mismatched pairs (a forward, not a
    cache lookup): with LoRA it is the training model with adapters disabled."""
    from transformers import AutoTokenizer

    from test_dpo import write_unpaired

    data = write_unpaired(AutoTokenizer.from_pretrained(str(tiny_model_dir)), tmp_path / "unpaired", n=16)
    r = dpo("--model", tiny_model_dir, "--out", tmp_path / "kto", "--loss", "kto", "--lr", "1e-3", "--global-batch", "4",
            "--micro-batch", "2", "--max-steps", "2", "--no-tensorboard", *LORA, data)
    assert r.exit_code == 0, r.output
    assert count_loads == [str(tiny_model_dir)]


# --------------------------------------------------------------------------- the head under peft
def test_modules_to_save_lm_head_matches_the_full_logit_path(tiny_model_dir, data_dir):
    """With the LM head trained in full next to the adapters, the chunked head (fused path, on
    the trained copy) gives the same stats and gradients as transformers' full logits."""
    from irtrain.adapters import LoraSpec, apply_lora
    from irtrain.shards import ShardSet
    from irtrain.train.batching import collate
    from irtrain.train.packed import packed_token_stats

    spec = LoraSpec(r=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"), modules_to_save=("lm_head",), use_dora=False,
                    quantization=None, base_name=str(tiny_model_dir))
    torch.manual_seed(0)
    model = apply_lora(load_model(tiny_model_dir), spec)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n or "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)  # the copy and the adapter differ from the base
    batch = collate([ShardSet(data_dir).row(i) for i in range(2)])

    def run(keep_logits: bool):
        model.zero_grad()
        s = packed_token_stats(model, batch, tau=0.7, keep_logits=keep_logits)
        (s.logps.sum() + 0.3 * s.values.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return s, grads

    fused, g_fused = run(False)
    full, g_full = run(True)
    assert full.logits is not None and fused.logits is None  # the two paths really differ
    torch.testing.assert_close(fused.logps, full.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.values, full.values, rtol=1e-5, atol=1e-5)
    assert any("modules_to_save" in n for n in g_fused)
    for n in g_full:
        torch.testing.assert_close(g_fused[n], g_full[n], rtol=1e-4, atol=1e-6, msg=n)
    # and the head that ran is the trained copy: with adapters disabled the logps change
    with model.disable_adapter():
        base = packed_token_stats(model, batch, tau=0.7)
    assert not torch.allclose(base.logps, fused.logps.detach())


def test_dora_run(tiny_model_dir, data_dir, tmp_path):
    r = sft(*base_args(tiny_model_dir, data_dir, tmp_path / "run", "--max-steps", "2", "--use-dora", *LORA))
    assert r.exit_code == 0, r.output
    assert "DoRA r=4" in r.output
    ckpt = final(tmp_path / "run")
    assert any("lora_magnitude_vector" in k for k in adapter_tensors(ckpt))
    assert json.loads((ckpt / "adapter_config.json").read_text())["use_dora"] is True
    peft_model(tiny_model_dir, ckpt)  # loads


# --------------------------------------------------------------------------- score / rank on adapter checkpoints
def test_score_adapter_checkpoints_equal_their_merged_model(tiny_model_dir, lora_sft, heldout_dir, tmp_path):
    import polars as pl
    from typer.testing import CliRunner

    from irtrain.cli.main import app

    r = CliRunner().invoke(app, ["score", str(heldout_dir), "--checkpoints", str(lora_sft), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["score", str(heldout_dir), "--model", str(lora_sft / "merged"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    adapter = pl.read_parquet(tmp_path / "a" / "run-checkpoint-0000004.parquet")
    merged = pl.read_parquet(tmp_path / "m" / "merged.parquet")
    assert {"run-checkpoint-0000002.parquet", "run-checkpoint-0000004.parquet"} <= {p.name for p in (tmp_path / "a").iterdir()}
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(adapter["logp"].to_numpy(), merged["logp"].to_numpy(), rtol=1e-5, atol=1e-5)


def test_an_adapter_on_another_base_is_refused(tiny_model_dir, lora_sft, heldout_dir, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from irtrain.cli.main import app

    ckpt = tmp_path / "ckpt"
    shutil.copytree(final(lora_sft), ckpt)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(lora_sft / "merged")  # a different model than it was trained on
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(app, ["score", str(heldout_dir), "--model", str(ckpt), "--out", str(tmp_path / "out")])
    assert r.exit_code != 0
    assert "adapter trained on another base model" in r.output and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- bad input: one line, nothing written
@pytest.mark.parametrize("flags, says", [
    (["--lora-r", "-1"], "--lora-r must be >= 0"),
    (["--lora-r", "4", "--lora-target", "q_proj,qkv"], "--lora-target 'qkv' names no module"),
    (["--lora-r", "4", "--lora-modules-to-save", "head"], "--lora-modules-to-save 'head' names no module"),
    (["--lora-r", "4", "--load-in-4bit"], "--load-in-4bit (QLoRA) needs a CUDA GPU"),
    (["--lora-r", "4", "--load-in-8bit"], "--load-in-8bit (QLoRA) needs a CUDA GPU"),
    (["--merge-at-end"], "--merge-at-end needs LoRA"),
    (["--use-dora"], "--use-dora needs LoRA"),
    (["--lora-r", "4", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
])
def test_bad_adapter_flags_are_one_line_errors(tiny_model_dir, data_dir, tmp_path, flags, says):
    out = tmp_path / "run"
    r = sft(*base_args(tiny_model_dir, data_dir, out, "--max-steps", "1", *flags))
    assert r.exit_code != 0
    assert says in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 2
    assert not out.exists()
    if "lora-target" in flags:
        assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in r.output


# --------------------------------------------------------------------------- DeepSpeed with LoRA
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_lora_matches_single_process(stage, tiny_model_dir, data_dir, tmp_path):
    """2 CPU processes (gloo) under ZeRO-2/3 with LoRA: the loss trace and the adapter equal the
    single-process run; the DeepSpeed state holds no frozen base weights; a ZeRO run killed
    after step 2 resumes to the same adapter."""
    import shutil
    import subprocess

    common = ["--model", str(tiny_model_dir), "--lr", "1e-3", "--global-batch", "8", "--micro-batch", "2", "--max-steps", "3",
              "--save-steps", "2", "--warmup-ratio", "0", "--no-tensorboard", "--no-kl-metrics", *LORA, str(data_dir)]
    env = cpu_dist_env()

    def launch(*extra):
        proc = subprocess.run([*torchrun_irtrain(), "sft",
                               "--deepspeed", stage, "--out", str(tmp_path / "ds"), *common, *extra],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    launch()
    single = sft("--out", tmp_path / "single", *common)
    assert single.exit_code == 0, single.output
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ds", "single")]
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    a, b = adapter_tensors(final(tmp_path / "ds")), adapter_tensors(final(tmp_path / "single"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ds_bytes = sum(p.stat().st_size for p in (final(tmp_path / "ds") / "deepspeed").iterdir())
    base_bytes = (Path(tiny_model_dir) / "model.safetensors").stat().st_size
    assert ds_bytes < base_bytes  # adapter and its optimizer state only
    # resume from step 2
    before = adapter_tensors(final(tmp_path / "ds"))
    shutil.rmtree(final(tmp_path / "ds"))
    launch("--resume")
    after = adapter_tensors(final(tmp_path / "ds"))
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-7)


def test_alternating_and_joint_schedules_with_lora(tiny_model_dir, data_dir, pref_dir, tmp_path):
    """--alternate-with: each stage trains a new adapter on the one before (its base is the
    previous stage's adapter checkpoint), and the last one loads as the whole chain merged;
    --joint-sft trains one adapter."""
    from irtrain.adapters import load_causal_lm

    common = ["--model", tiny_model_dir, "--global-batch", "4", "--micro-batch", "2", "--max-steps", "2", "--lr", "1e-3",
              "--no-tensorboard", *LORA]
    r = dpo(*common, "--out", tmp_path / "alt", "--alternate-with", data_dir, "--rounds", "2", pref_dir)
    assert r.exit_code == 0, r.output
    stages = [json.loads(x) for x in (tmp_path / "alt" / "stages.jsonl").read_text().splitlines()]
    assert [s["kind"] for s in stages] == ["sft", "dpo", "sft", "dpo"]
    last = Path(stages[-1]["checkpoint"])
    assert Path(json.loads((last / "adapter_config.json").read_text())["base_model_name_or_path"]) == Path(stages[-2]["checkpoint"]).resolve()
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    chain = logits(load_causal_lm(last, dtype=torch.float32).eval(), ids)
    assert not torch.allclose(chain, logits(load_model(tiny_model_dir).eval(), ids), atol=1e-4)
    r = dpo(*common, "--out", tmp_path / "joint", "--joint-sft", data_dir, pref_dir)
    assert r.exit_code == 0, r.output
    assert (final(tmp_path / "joint") / "adapter_model.safetensors").is_file()
