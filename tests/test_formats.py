"""The input formats of `irtrain prepare` beyond chat rows (`rust_ext/core/src/rows.rs`):
plain `text`, ShareGPT conversations, `--columns` renaming and `--no-chat-template` plain-text
prompt/completion/preference rows, each against transformers' rendering and tokenization and,
for the plain-text ones, against what TRL 1.16's SFTTrainer / DPOTrainer put in their datasets."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from irtrain.config import PrepareConfig, load_config
from irtrain.errors import ConfigError
from irtrain.prepare import run
from irtrain.shards import iter_documents

from test_prepare import assert_one_line_error, cli, reference_labels, transformers_ids, write_jsonl

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "Plain text for continued pretraining. Unicode: café, naïve, 日本語, emoji 🎉🚀.",
    "  leading spaces, tabs\tand\n\nnewlines  ",
    "A document that already ends with the end-of-sequence token.{eos}",
    "x",
    "Question 7: what is 7 plus 21? The answer is 28. " * 6,
]
PAIRS = [  # (prompt, completion): boundaries inside a word, at spaces, after newlines
    ("Question: what is 2+2?", " Answer: 4"),
    ("Translate to French: cat", "\nchat"),
    ("abc", "def"),
    ("Ends with a space ", "and continues."),
    ("Emoji 🎉", "🚀 done{eos}"),
]


def _tok(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


# --------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def tokenizers(tokenizer_dirs, tmp_path_factory) -> dict[str, Path]:
    """Byte-level toy (no special tokens added), Llama-3 style (its post-processor adds bos),
    the same with tokenizer_config.json's add_bos_token=false/add_eos_token=true (which
    transformers 5 ignores when there is a tokenizer.json), a SentencePiece-style Metaspace BPE whose
    post-processor adds <s> (no chat template), and the real SmolLM2 tokenizer."""
    from conftest import TEXTS as CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("format-tokenizers")
    out = {"chatml": tokenizer_dirs["chatml"]}
    bos = root / "bos"
    shutil.copytree(tokenizer_dirs["llama3"], bos)
    tj = json.loads((bos / "tokenizer.json").read_text())
    bos_id = next(t["id"] for t in tj["added_tokens"] if t["content"] == "<|begin_of_text|>")
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos_id],
                                                                     "tokens": ["<|begin_of_text|>"]}}}
    (bos / "tokenizer.json").write_text(json.dumps(tj))
    out["llama3_bos"] = bos
    flags = root / "flags"
    shutil.copytree(bos, flags)
    cfg = json.loads((flags / "tokenizer_config.json").read_text())
    (flags / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False, "add_eos_token": True}))
    out["llama3_flags"] = flags

    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    sp.train_from_iterator(CORPUS + TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                                show_progress=False))
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        root / "metaspace")
    out["metaspace"] = root / "metaspace"
    got = subprocess.run([sys.executable, str(ROOT / "scripts" / "get-real-model")], check=True, capture_output=True,
                         text=True)
    out["smollm2"] = Path(got.stdout.strip().splitlines()[-1])
    return out


def test_the_tokenizers_differ_in_what_they_add(tokenizers):
    """The fixture covers the cases: nothing added, bos from tokenizer.json's post-processor
    (tokenizer_config.json's add_*_token flags ignored), <s> with a SentencePiece-style
    pre-tokenizer."""
    added = {}
    for name, d in tokenizers.items():
        tok = _tok(d)
        added[name] = [t for t in tok("hi")["input_ids"] if t in tok.all_special_ids]
    assert added["chatml"] == [] and added["smollm2"] == []
    assert added["llama3_bos"] == [_tok(tokenizers["llama3_bos"]).bos_token_id]
    assert added["llama3_flags"] == added["llama3_bos"]
    assert added["metaspace"] == [_tok(tokenizers["metaspace"]).bos_token_id]


# --------------------------------------------------------------------------- TRL, the reference
def _tiny_model(tok, path: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").is_file():
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)).save_pretrained(path)
    return str(path)


def trl_dataset(kind: str, tok_dir: Path, rows: list[dict], work: Path) -> list[dict]:
    """What TRL's SFTTrainer (`kind` sft), DPOTrainer (dpo) or KTOTrainer (kto) makes of `rows`
    before training."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    tok = _tok(tok_dir)
    model = _tiny_model(tok, work / f"tiny-{tok_dir.name}")
    common = dict(output_dir=str(work / "trl"), report_to=[], max_length=None, use_cpu=True)
    if kind == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    else:
        trainer_cls, config_cls = {"dpo": (DPOTrainer, DPOConfig), "kto": (KTOTrainer, KTOConfig)}[kind]
        trainer = trainer_cls(model=model, args=config_cls(**common), train_dataset=Dataset.from_list(rows),
                              processing_class=tok)
    return list(trainer.train_dataset)


def _with_eos(texts: list[str], tok) -> list[str]:
    return [t.replace("{eos}", tok.eos_token) for t in texts]


# --------------------------------------------------------------------------- text
@pytest.mark.parametrize("name", ["chatml", "llama3_bos", "llama3_flags", "metaspace", "smollm2"])
def test_text_is_tokenizer_of_text_plus_eos(tokenizers, tmp_path, name):
    """`{"text": ...}` rows (auto-detected): transformers' `tokenizer(text + eos)` (eos appended
    unless the text ends with it, as TRL's SFTTrainer does), every token trained but the first,
    packed; no chat template needed (the Metaspace tokenizer has none)."""
    tok = _tok(tokenizers[name])
    texts = _with_eos(TEXTS, tok)
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    m = run(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "out"), tokenizer=str(tokenizers[name]), max_len=256))
    assert m["format"] == "text" and m["report"]["dropped"] == 0
    docs = list(iter_documents(tmp_path / "out"))
    for d, t in zip(docs, texts, strict=True):
        ids = tok(t if t.endswith(tok.eos_token) else t + tok.eos_token)["input_ids"]
        assert d["input_ids"] == ids
        assert d["labels"] == [-100] + ids[1:]
        assert d["input_ids"].count(tok.eos_token_id) == 1
    assert m["report"]["rows"] < len(texts)  # packed


@pytest.mark.parametrize("name", ["chatml", "metaspace", "smollm2"])
def test_text_equals_trl_sft_trainer(tokenizers, tmp_path, name):
    tok = _tok(tokenizers[name])
    texts = _with_eos(TEXTS, tok)
    ref = trl_dataset("sft", tokenizers[name], [{"text": t} for t in texts], tmp_path)
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    run(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "out"), tokenizer=str(tokenizers[name]), pack=False))
    for d, r in zip(iter_documents(tmp_path / "out"), ref, strict=True):
        assert d["input_ids"] == r["input_ids"]
        labels = r.get("labels") or r["input_ids"]  # no mask column: TRL trains every token
        assert d["labels"][1:] == labels[1:] and d["labels"][0] == -100  # position 0 predicts nothing


# --------------------------------------------------------------------------- plain prompt/completion
@pytest.mark.parametrize("name", ["chatml", "llama3_bos", "metaspace", "smollm2"])
def test_plain_prompt_completion_equals_trl_sft_trainer(tokenizers, tmp_path, name):
    """`--format prompt-completion --no-chat-template`: TRL's non-conversational prompt-completion
    tokenization (prompt + completion + eos as one text, the completion trained from where the
    tokenized prompt stops being a prefix), token for token and label for label."""
    tok = _tok(tokenizers[name])
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    rows = [{k: v.replace("{eos}", tok.eos_token) for k, v in r.items()} for r in rows]
    ref = trl_dataset("sft", tokenizers[name], rows, tmp_path)
    src = write_jsonl(tmp_path / "pc.jsonl", rows)
    r = cli(tmp_path, tokenizers[name], str(src), "--format", "prompt-completion", "--no-chat-template", "--no-pack")
    assert r.exit_code == 0, r.output
    docs = list(iter_documents(tmp_path / "out"))
    for d, t, row in zip(docs, ref, rows, strict=True):
        assert d["input_ids"] == t["input_ids"], row
        assert d["labels"][1:] == t["labels"][1:] and d["labels"][0] == -100, row
    # auto-detection sees prompt/completion; the flag alone makes it plain text
    chat = write_jsonl(tmp_path / "pc2.jsonl", rows[:1])
    assert cli(tmp_path, tokenizers[name], str(chat), "--no-chat-template", out="auto").exit_code == 0
    assert next(iter_documents(tmp_path / "auto"))["input_ids"] == ref[0]["input_ids"]


@pytest.mark.parametrize("name", ["chatml", "metaspace"])
def test_plain_preference_equals_trl_dpo_trainer(tokenizers, tmp_path, name):
    """String prompt/chosen/rejected with --no-chat-template: TRL's DPOTrainer (prompt_ids, then
    chosen_ids/rejected_ids from the smallest point where either stops sharing the prompt)."""
    tok = _tok(tokenizers[name])
    rows = [{"prompt": "Which is better? ", "chosen": "The first one.", "rejected": "Dunno"},
            {"prompt": "abc", "chosen": "def", "rejected": "xyz" + tok.eos_token},
            {"prompt": "2+2=", "chosen": "4", "rejected": "22"}]
    ref = trl_dataset("dpo", tokenizers[name], rows, tmp_path)
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    m = run(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "out"), tokenizer=str(tokenizers[name]),
                          apply_chat_template=False))
    assert m["format"] == "preference"
    for d, t in zip(iter_documents(tmp_path / "out"), ref, strict=True):
        n = len(t["prompt_ids"])
        for side in ("chosen", "rejected"):
            assert d[side]["input_ids"] == t["prompt_ids"] + t[f"{side}_ids"]
            assert d[side]["labels"] == [-100] * n + t[f"{side}_ids"]


@pytest.mark.parametrize("name", ["chatml", "metaspace"])
def test_plain_unpaired_equals_trl_kto_trainer(tokenizers, tmp_path, name):
    rows = [{"prompt": "Q: is it? ", "completion": "yes", "label": True},
            {"prompt": "abc", "completion": "def", "label": False}]
    ref = trl_dataset("kto", tokenizers[name], rows, tmp_path)
    kto = write_jsonl(tmp_path / "k.jsonl", rows)
    run(PrepareConfig(inputs=[str(kto)], out=str(tmp_path / "k"), tokenizer=str(tokenizers[name]),
                      apply_chat_template=False))
    docs = list(iter_documents(tmp_path / "k"))
    assert [x["label"] for x in docs] == [True, False]
    for d, t in zip(docs, ref, strict=True):
        assert d["input_ids"] == t["prompt_ids"] + t["completion_ids"]
        assert d["labels"] == [-100] * len(t["prompt_ids"]) + t["completion_ids"]


def test_plain_ranked_and_mask_all(tokenizers, tmp_path):
    tok = _tok(tokenizers["chatml"])
    d = tokenizers["chatml"]
    rk = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q: ", "completions": ["a", "bb", "c"], "scores": [1, 3, 2]}])
    run(PrepareConfig(inputs=[str(rk)], out=str(tmp_path / "r"), tokenizer=str(d), apply_chat_template=False))
    (doc,) = iter_documents(tmp_path / "r")
    assert [c["input_ids"] for c in doc["candidates"]] == [tok("Q: " + c + tok.eos_token)["input_ids"] for c in ("bb", "c", "a")]
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: ", "completion": "yes"}])
    run(PrepareConfig(inputs=[str(pc)], out=str(tmp_path / "all"), tokenizer=str(d), apply_chat_template=False,
                      mask="all"))
    ids = tok("Q: yes" + tok.eos_token)["input_ids"]
    assert next(iter_documents(tmp_path / "all"))["labels"] == [-100] + ids[1:]  # completion_only_loss=False


# --------------------------------------------------------------------------- ShareGPT
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "日本語で?"}, {"from": "gpt", "value": "六です。"}]},
    {"system": "You are terse.", "conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]},
    {"conversation": [{"from": "system", "value": "Sys ✓"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": ""}]},
]
ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
        "observation": "tool", "tool": "tool"}


def as_messages(row: dict) -> list[dict]:
    """The mapping stated in README (axolotl's roles + LLaMA-Factory's tags), written out in Python."""
    conv = row.get("conversations", row.get("conversation"))
    msgs = []
    if isinstance(row.get("system"), str) and conv[0]["from"] != "system":
        msgs.append({"role": "system", "content": row["system"]})
    for m in conv:
        if m["from"] == "function_call":
            calls = json.loads(m["value"])
            calls = calls if isinstance(calls, list) else [calls]
            msgs.append({"role": "assistant", "tool_calls": [{"type": "function", "function": c} for c in calls]})
        else:
            msgs.append({"role": ROLE[m["from"]], "content": m["value"]})
    return msgs


@pytest.mark.parametrize("mask", ["assistant", "last", "all"])
def test_sharegpt_equals_transformers_on_the_mapped_messages(tokenizers, tmp_path, mask):
    d = tokenizers["chatml"]
    tok = _tok(d)
    src = write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    m = run(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "out"), tokenizer=str(d), mask=mask, max_len=512))
    assert m["format"] == "chat"
    for doc, row in zip(iter_documents(tmp_path / "out"), SHAREGPT, strict=True):
        msgs = as_messages(row)
        assert doc["input_ids"] == transformers_ids(tok, msgs)
        assert doc["labels"] == reference_labels(tok, msgs, mask)


def test_sharegpt_tool_turns_with_a_tool_template(tokenizers, tmp_path):
    """LLaMA-Factory's function_call / observation turns become an assistant tool call and a
    tool turn, rendered by a Qwen-2.5-style template exactly as transformers renders them."""
    from test_data import QWEN_STYLE_TEMPLATE

    d = tokenizers["chatml"]
    tok = _tok(d)
    tok.chat_template = QWEN_STYLE_TEMPLATE
    (tmp_path / "q.jinja").write_text(QWEN_STYLE_TEMPLATE)
    row = {"conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "{\"temp\": 3}"},
        {"from": "gpt", "value": "3 °C."}]}
    src = write_jsonl(tmp_path / "s.jsonl", [row])
    run(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "out"), tokenizer=str(d), chat_template=str(tmp_path / "q.jinja")))
    (doc,) = iter_documents(tmp_path / "out")
    msgs = as_messages(row)
    assert doc["input_ids"] == transformers_ids(tok, msgs)
    assert doc["labels"] == reference_labels(tok, msgs, "assistant")  # the tool call is an assistant turn: trained
    assert "get_weather" in tok.decode([t for t in doc["labels"] if t != -100])


# --------------------------------------------------------------------------- --columns
def test_columns_rename_before_detection(tokenizers, tmp_path):
    d = tokenizers["chatml"]
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": msgs}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"dialog": msgs, "messages_count": 2}])
    run(PrepareConfig(inputs=[str(a)], out=str(tmp_path / "a"), tokenizer=str(d)))
    r = cli(tmp_path, d, str(b), "--columns", "messages=dialog", out="b")
    assert r.exit_code == 0, r.output
    assert list(iter_documents(tmp_path / "a")) == list(iter_documents(tmp_path / "b"))
    # preference columns, swapped on purpose: chosen=worse, rejected=better
    p = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "better": "good", "worse": "bad"}])
    r = cli(tmp_path, d, str(p), "--columns", "prompt=question, chosen=worse,rejected=better", out="p")
    assert r.exit_code == 0, r.output
    (doc,) = iter_documents(tmp_path / "p")
    tok = _tok(d)
    assert doc["chosen"]["input_ids"] == transformers_ids(tok, [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "bad"}])
    # TOML: the same fields
    (tmp_path / "c.toml").write_text('columns = "messages=dialog"\napply_chat_template = true\n')
    cfg = load_config(PrepareConfig, tmp_path / "c.toml")
    assert (cfg.columns, cfg.apply_chat_template) == ("messages=dialog", True)


@pytest.mark.parametrize(("spec", "needle"), [
    ("messages", "'messages' is not NAME=COLUMN"),
    ("messages=", "'messages=' is not NAME=COLUMN"),
    ("msgs=dialog", "'msgs' is not a field irtrain reads"),
    ("messages=a,messages=b", "maps a field or column a second time"),
    ("prompt=a,completion=a", "maps a field or column a second time"),
])
def test_bad_columns_flag_is_a_one_line_error(tokenizers, tmp_path, spec, needle):
    src = write_jsonl(tmp_path / "a.jsonl", [{"dialog": []}])
    assert_one_line_error(cli(tmp_path, tokenizers["chatml"], str(src), "--columns", spec), "--columns", needle,
                          tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="--columns"):
        run(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "out"), tokenizer=str(tokenizers["chatml"]), columns=spec))


# --------------------------------------------------------------------------- bad rows
GOOD_TEXT = {"text": "fine"}
GOOD_CHAT = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(("rows", "extra", "needles"), [
    ([GOOD_TEXT, {"text": ["a", "b"]}], [], ["t.jsonl:2", "'text' must be a string, not a list"]),
    ([GOOD_TEXT, {"body": "x"}], ["--format", "text"], ["t.jsonl:2", "no 'text' field"]),
    ([{"prompt": "p", "completion": "c"}, {"prompt": [{"role": "user", "content": "p"}], "completion": "c"}],
     ["--no-chat-template"], ["t.jsonl:2", "'prompt' is a list of messages, but --no-chat-template"]),
    ([{"prompt": "p", "chosen": "c"}], ["--no-chat-template", "--format", "preference"], ["t.jsonl:1", "no 'rejected'"]),
    ([{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}], ["--no-chat-template"],
     ["--no-chat-template", "need the chat template"]),
    ([{"conversations": [{"from": "human", "value": "u"}, {"from": "bard", "value": "a"}]}], [],
     ["t.jsonl:1", "unknown ShareGPT speaker \"bard\" in conversations[1].from"]),
    ([{"conversations": [{"from": "human", "value": "u"}, {"from": "function_call", "value": "get()"}]}], [],
     ["t.jsonl:1", "conversations[1] (function_call): the value must be JSON"]),
    ([{"dialog": GOOD_CHAT}, {"dialog": GOOD_CHAT, "messages": GOOD_CHAT}], ["--columns", "messages=dialog"],
     ["t.jsonl:2", "both 'dialog' and 'messages'"]),
    ([{"body": "x"}], ["--columns", "messages=dialog"], ["t.jsonl:1", "after --columns messages=dialog"]),
])
def test_bad_rows_are_one_line_errors_naming_file_and_row(tokenizers, tmp_path, rows, extra, needles):
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_one_line_error(cli(tmp_path, tokenizers["chatml"], str(src), *extra), *needles, tmp_path=tmp_path)


def test_plain_text_needs_an_eos_token(tokenizers, tmp_path):
    d = tmp_path / "no-eos"
    shutil.copytree(tokenizers["chatml"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    src = write_jsonl(tmp_path / "t.jsonl", [GOOD_TEXT])
    assert_one_line_error(cli(tmp_path, d, str(src)), "names no eos_token", "text format", tmp_path=tmp_path)
