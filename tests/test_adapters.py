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
from test_train_common import base_args, data_dir, heldout_dir, load_model, pref_dir, sft, task_shards  # noqa: F401

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
