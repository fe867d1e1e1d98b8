"""`prepare` on real chat templates (tests/fixtures/templates) against transformers, token for
token: `{% generation %}` masks as `return_assistant_tokens_mask`, per-turn examples where a
template is not prefix-stable, `strftime_now` in local time, tools and template variables."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.shards import iter_documents

from test_prepare import assert_one_line_error, cli, prep, write_jsonl

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures" / "templates"


def template(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


def hf_tokenizer(tok_dir: Path, name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.chat_template = template(name)
    return tok


def reasoning_conversations() -> list[list[dict]]:
    """Multi-turn conversations with reasoning given both ways (inline <think> and
    reasoning_content), a system prompt, and a turn without reasoning."""
    return [
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "<think>\nAdd two and two.\n</think>\n\n4"},
         {"role": "user", "content": "And 3+3? 🤔"},
         {"role": "assistant", "content": "6", "reasoning_content": "Three and three."},
         {"role": "user", "content": "Thanks"},
         {"role": "assistant", "content": "You're welcome."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]


def labels_from_char_spans(enc, spans: list[tuple[int, int]]) -> list[int]:
    """transformers' rule (return_assistant_tokens_mask): a token is trained when its character
    offsets overlap a span; the first token never is (nothing predicts it)."""
    labels = [t if any(s < b and e > a for a, b in spans) else -100
              for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    labels[0] = -100
    return labels


# --------------------------------------------------------------------------- generation markers
@pytest.mark.parametrize("name", ["qwen3_training", "phi3_training", "deepseek_r1_distill_training"])
def test_generation_markers_match_return_assistant_tokens_mask(tokenizer_dirs, tmp_path, name):
    tok = hf_tokenizer(tokenizer_dirs["chatml"], name)
    convs = reasoning_conversations()
    (tmp_path / "t.jinja").write_text(template(name), encoding="utf-8")
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    m = prep(tmp_path, tokenizer_dirs["chatml"], [src], max_len=4096, chat_template=str(tmp_path / "t.jinja"))
    assert m["report"]["split_rows"] == 0  # the markers give the masks: no splitting
    docs = list(iter_documents(tmp_path / "out"))
    assert len(docs) == len(convs)
    for d, msgs in zip(docs, convs):
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        assert d["input_ids"] == ids
        assert d["labels"] == [-100] + [t if k else -100 for t, k in zip(ids[1:], mask[1:])]
        assert any(k for k in mask)


# --------------------------------------------------------------------------- per-turn examples
@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_templates_without_the_prefix_property_train_every_turn(tokenizer_dirs, tmp_path, name):
    """Qwen3 (reasoning only in the final turn) and Phi-3 (eos after the last message): each
    assistant turn is its own example, the conversation up to it rendered with it last, exact
    against transformers; the report and --preview say so."""
    tok = hf_tokenizer(tokenizer_dirs["chatml"], name)
    convs = reasoning_conversations()
    (tmp_path / "t.jinja").write_text(template(name), encoding="utf-8")
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(src), "--chat-template", str(tmp_path / "t.jinja"),
            "--preview", "4", "--max-len", "4096")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "1 row(s) split into 3 per-turn examples because the template is not prefix-stable" in text
    assert "preview: 1 row(s) split into 3 per-turn examples" in text
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["report"]["split_rows"], m["report"]["split_examples"]) == (1, 3)
    assert (m["report"]["docs_in"], m["report"]["docs_out"]) == (2, 4)
    docs = list(iter_documents(tmp_path / "out"))
    assert [d["id"] for d in docs] == [0, 1, 2, 3]
    expected = []  # (conversation, trained turn) in order
    for msgs in convs:
        turns = [i for i, x in enumerate(msgs) if x["role"] == "assistant"]
        expected += [(msgs[: i + 1], i) for i in turns] if len(turns) > 1 else [(msgs, turns[-1])]
    assert len(docs) == len(expected)
    for d, (msgs, i) in zip(docs, expected):
        full = tok.apply_chat_template(msgs, tokenize=False)
        prompt = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        assert full.startswith(prompt)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        assert d["input_ids"] == enc["input_ids"]
        assert d["labels"] == labels_from_char_spans(enc, [(len(prompt), len(full))])
    if name == "qwen3":  # every turn trains its own reasoning (rendered only when it is last)
        assert "Add two and two." in tok.decode([t for t in docs[0]["labels"] if t != -100])
        assert "Three and three." in tok.decode([t for t in docs[1]["labels"] if t != -100])
    # --mask last needs no splitting: one example per row
    m = prep(tmp_path, tokenizer_dirs["chatml"], [src], "last", max_len=4096, mask="last",
             chat_template=str(tmp_path / "t.jinja"))
    assert (m["report"]["docs_out"], m["report"]["split_rows"]) == (2, 0)


def test_template_that_drops_reasoning_from_its_own_turns_writes_them_as_at_inference(tokenizer_dirs, tmp_path):
    """DeepSeek-R1 distills: the generation prompt opens <think>, and every rendered turn drops
    its reasoning. Each turn is written as the model meets it at inference (its generation prompt,
    then the turn with its reasoning, then the end of turn), and the report and --preview say so;
    a turn with no reasoning to write after that prompt is a one-line error naming the row."""
    tok = hf_tokenizer(tokenizer_dirs["chatml"], "deepseek_r1_distill")
    (tmp_path / "t.jinja").write_text(template("deepseek_r1_distill"), encoding="utf-8")
    msgs = thinking_conversations()[0]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "c.jsonl"), "--chat-template", str(tmp_path / "t.jinja"),
            "--preview", "1", "--max-len", "4096")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "3 assistant turn(s) written as at inference because the template does not render them" in text
    assert "preview: 3 assistant turn(s) written as at inference" in text
    docs = list(iter_documents(tmp_path / "out"))
    assert len(docs) == 3
    assert tok.decode([t for t in docs[1]["labels"] if t != -100]) == (
        "Three and three.\n</think>\n\n6<｜end▁of▁sentence｜>")
    write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}, {"messages": reasoning_conversations()[1]}])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "c.jsonl"), "--chat-template", str(tmp_path / "t.jinja"),
            out="bad")
    assert_one_line_error(r, "c.jsonl:2:", "assistant turn 2 does not begin with what the generation prompt opens",
                          "give the turn its reasoning", tmp_path=tmp_path, out="bad")


def test_preference_pairs_on_a_template_that_drops_reasoning(tokenizer_dirs, tmp_path):
    """A DPO pair on the R1 distills' template: chosen and rejected are each written as at
    inference after the same prompt, reasoning included (inline, or as reasoning_content)."""
    tok = hf_tokenizer(tokenizer_dirs["chatml"], "deepseek_r1_distill")
    (tmp_path / "t.jinja").write_text(template("deepseek_r1_distill"), encoding="utf-8")
    row = {"prompt": [{"role": "user", "content": "2+2?"}],
           "chosen": [{"role": "assistant", "content": "<think>\nAdd.\n</think>\n\n4"}],
           "rejected": [{"role": "assistant", "content": "5", "reasoning_content": "A guess."}]}
    src = write_jsonl(tmp_path / "p.jsonl", [row])
    m = prep(tmp_path, tokenizer_dirs["chatml"], [src], chat_template=str(tmp_path / "t.jinja"))
    assert m["report"]["inference_turns"] == 2
    (doc,) = iter_documents(tmp_path / "out")
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<think>\n")
    for side in ("chosen", "rejected"):
        text = prompt + written_turn(row[side][0])[len("<think>\n"):] + "<｜end▁of▁sentence｜>"
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert doc[side]["input_ids"] == enc["input_ids"]
        assert doc[side]["labels"] == labels_from_char_spans(enc, [(len(prompt), len(text))])


# --------------------------------------------------------------------------- the real-template check
def thinking_conversations() -> list[list[dict]]:
    """Multi-turn conversations where every assistant turn reasons (inline <think> or
    reasoning_content), with and without a system prompt: what reasoning models are trained on."""
    first = reasoning_conversations()[0]  # its last turn, which does not reason, given reasoning
    return [
        [*first[:-1], {"role": "assistant", "content": "<think>\nBe polite.\n</think>\n\nYou're welcome."}],
        [{"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."},
         {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "<think>\nA farewell.\n</think>\n\nBye!"}],
    ]


def written_turn(m: dict) -> str:
    """An assistant turn as the model writes it (docs/FORMULAS.md: reasoning first)."""
    content, reasoning = m["content"], m.get("reasoning_content")
    if reasoning and "</think>" not in content:
        return f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
    return content


def reference_examples(tok, msgs: list[dict], mask: str, at_inference: tuple[str, str] | None):
    """What prepare must write for one conversation, from transformers' renders and tokenizer
    alone: (kind, input_ids, labels) per example. Kinds: "markers" (return_assistant_tokens_mask),
    "whole" (one example, spans between prefix renders), "turn" (the conversation up to the turn,
    rendered with it last), "inference" (the turn's generation prompt, then the turn as written
    after `opener`, then `end_of_turn`: `at_inference` gives both for the family, by hand)."""
    render = lambda m, gen=False: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if mask == "last":
        turns = turns[-1:]

    def encode(kind, text, spans):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return kind, list(enc["input_ids"]), labels_from_char_spans(enc, spans)

    if "{% generation %}" in tok.chat_template:
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, keep = list(out["input_ids"]), list(out["assistant_masks"])
        if mask == "last":  # the last block only
            k = len(keep) - 1 - keep[::-1].index(1)
            while k > 0 and keep[k - 1]:
                k -= 1
            keep = [0] * k + keep[k:]
        return [("markers", ids, [-100] + [t if k else -100 for t, k in zip(ids[1:], keep[1:])])]
    full = render(msgs)
    starts = {i: render(msgs[:i], True) for i in turns}
    ends = {i: render(msgs[: i + 1]) for i in turns}
    if all(ends[i].startswith(starts[i]) and full.startswith(ends[i]) for i in turns):
        return [encode("whole", full, [(len(starts[i]), len(ends[i])) for i in turns])]
    examples = []
    for i in turns:
        if ends[i].startswith(starts[i]):
            examples.append(encode("turn", ends[i], [(len(starts[i]), len(ends[i]))]))
            continue
        assert at_inference is not None, f"turn {i} renders neither way"
        opener, end_of_turn = at_inference
        assert starts[i].endswith(opener)
        written = written_turn(msgs[i])
        assert written.startswith(opener)
        text = starts[i] + written[len(opener):] + end_of_turn
        examples.append(encode("inference", text, [(len(starts[i]), len(text))]))
    return examples


# family: (template, tokenizer, conversations, {mask: kinds of the examples}, at inference: (opener, end of
# turn)). "mixed" conversations have a turn without reasoning and a one-turn conversation (always whole);
# reasoning families' templates need every turn to reason ("thinking"). Tokenizers are toy byte-level BPEs
# with each family's special tokens where they matter: OLMo-3 ends its last turn with eos <|endoftext|>,
# not <|im_end|>; Mistral's eos is </s>.
WHOLE, TURN, INFERENCE, MARKERS = {"whole"}, {"turn", "whole"}, {"inference"}, {"markers"}
REAL_TEMPLATES = {
    "Qwen3": ("qwen3", "chatml", "mixed", {"assistant": TURN, "last": WHOLE}, None),
    "Qwen3 (TRL training template)": ("qwen3_training", "chatml", "mixed", {"assistant": MARKERS, "last": MARKERS}, None),
    "QwQ": ("qwq", "chatml", "thinking", {"assistant": {"turn", "inference"}, "last": WHOLE}, ("<think>\n", "<|im_end|>\n")),
    "DeepSeek-R1 distills": ("deepseek_r1_distill", "chatml", "thinking", {"assistant": INFERENCE, "last": INFERENCE},
                             ("<think>\n", "<｜end▁of▁sentence｜>")),
    "DeepSeek-R1 distills (TRL training template)": ("deepseek_r1_distill_training", "chatml", "thinking",
                                                     {"assistant": MARKERS, "last": MARKERS}, None),
    "Phi-3": ("phi3", "chatml", "mixed", {"assistant": TURN, "last": WHOLE}, None),
    "Phi-3.5": ("phi3_5", "chatml", "mixed", {"assistant": TURN, "last": WHOLE}, None),
    "Phi-3 (TRL training template)": ("phi3_training", "chatml", "mixed", {"assistant": MARKERS, "last": MARKERS}, None),
    "OLMo-3 Instruct": ("olmo3_instruct", "olmo", "mixed", {"assistant": TURN, "last": WHOLE}, None),
    "OLMo-3 Think": ("olmo3_think", "olmo", "thinking", {"assistant": {"turn", "inference"}, "last": WHOLE},
                     ("<think>", "<|endoftext|>")),
    "Mistral-Nemo (system prompt)": ("mistral_nemo", "mistral", "mixed",
                                     {"assistant": {"inference", "whole"}, "last": {"inference", "whole"}}, ("", "</s>")),
    "SmolLM3": ("smollm3", "chatml", "mixed", {"assistant": MARKERS, "last": MARKERS}, None),
    "Llama-3.2": ("llama3_2", "llama3", "mixed", {"assistant": WHOLE, "last": WHOLE}, None),
    "Granite-3.3": ("granite3_3", "chatml", "mixed", {"assistant": WHOLE, "last": WHOLE}, None),
}


def family_tokenizer(tokenizer_dirs, key: str, tmp_path: Path) -> Path:
    """A toy tokenizer directory; "olmo" is the ChatML one with OLMo's eos (<|endoftext|>)."""
    if key != "olmo":
        return tokenizer_dirs[key]
    import shutil

    out = tmp_path / "olmo-tokenizer"
    shutil.copytree(tokenizer_dirs["chatml"], out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("mask", ["assistant", "last"])
@pytest.mark.parametrize("family", list(REAL_TEMPLATES))
def test_real_templates_are_exact(tokenizer_dirs, tmp_path, family, mask):
    """Must-show 1 of the data-shapes issue: on each family's real template (tests/fixtures/
    templates/README.md says where each comes from), every configuration is exact against
    transformers, as one example, by its markers, or split into per-turn examples that are exact
    (rendered with the turn last, or as at inference where the template cannot render it so)."""
    name, tok_key, convs_kind, kinds, at_inference = REAL_TEMPLATES[family]
    tok_dir = family_tokenizer(tokenizer_dirs, tok_key, tmp_path)
    tok = hf_tokenizer(tok_dir, name)
    convs = thinking_conversations() if convs_kind == "thinking" else reasoning_conversations()
    (tmp_path / "t.jinja").write_text(template(name), encoding="utf-8")
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    prep(tmp_path, tok_dir, [src], max_len=8192, mask=mask, chat_template=str(tmp_path / "t.jinja"))
    docs = list(iter_documents(tmp_path / "out"))
    expected = [e for m in convs for e in reference_examples(tok, m, mask, at_inference)]
    assert {k for k, _, _ in expected} == kinds[mask]
    assert [d["id"] for d in docs] == list(range(len(expected)))
    for d, (kind, ids, labels) in zip(docs, expected):
        assert d["input_ids"] == ids, kind
        assert d["labels"] == labels, kind
        assert any(t != -100 for t in labels)


# --------------------------------------------------------------------------- template variables
def tool_rows() -> list[dict]:
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    return [
        {"tools": [weather], "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "21 °C in Paris."}]},
        {"tools": None, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]


@pytest.mark.parametrize("name,tok_name", [("qwen2_5", "chatml"), ("llama3_1", "llama3")])
def test_tools_reach_the_template(tokenizer_dirs, tmp_path, name, tok_name):
    tok = hf_tokenizer(tokenizer_dirs[tok_name], name)
    rows = tool_rows()
    (tmp_path / "t.jinja").write_text(template(name), encoding="utf-8")
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    prep(tmp_path, tokenizer_dirs[tok_name], [src], max_len=8192, mask="all", chat_template=str(tmp_path / "t.jinja"))
    docs = list(iter_documents(tmp_path / "out"))
    for d, row in zip(docs, rows):
        out = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=True, return_dict=True)
        assert d["input_ids"] == list(out["input_ids"])
    assert "get_weather" in tok.decode(docs[0]["input_ids"][:400])
    # a tools field that is not a list is a one-line error naming the row
    write_jsonl(tmp_path / "b.jsonl", [rows[1], {**rows[0], "tools": json.dumps(rows[0]["tools"])}])
    r = cli(tmp_path, tokenizer_dirs[tok_name], str(tmp_path / "b.jsonl"), "--chat-template", str(tmp_path / "t.jinja"),
            out="bad")
    assert_one_line_error(r, "b.jsonl:2:", "'tools' must be a list", tmp_path=tmp_path, out="bad")


def test_documents_reach_the_template(tokenizer_dirs, tmp_path):
    """A RAG-style template (Command-R's way of listing `documents` before the turns)."""
    from transformers import AutoTokenizer

    src = ("{% if documents %}<docs>{% for d in documents %}[{{ loop.index0 }}] {{ d.title }}: {{ d.text }}\n"
           "{% endfor %}</docs>{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs["chatml"]))
    tok.chat_template = src
    (tmp_path / "t.jinja").write_text(src, encoding="utf-8")
    docs_field = [{"title": "Paris", "text": "Capital of France."}, {"title": "Lyon", "text": "Gastronomy ✓"}]
    msgs = [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris [0]."}]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs, "documents": docs_field}, {"messages": msgs}])
    prep(tmp_path, tokenizer_dirs["chatml"], [tmp_path / "c.jsonl"], chat_template=str(tmp_path / "t.jinja"))
    got = list(iter_documents(tmp_path / "out"))
    for d, documents in zip(got, [docs_field, None]):
        full = tok.apply_chat_template(msgs, documents=documents, tokenize=False)
        prompt = tok.apply_chat_template(msgs[:1], documents=documents, tokenize=False, add_generation_prompt=True)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        assert d["input_ids"] == enc["input_ids"]
        assert d["labels"] == labels_from_char_spans(enc, [(len(prompt), len(full))])
    assert len(got[0]["input_ids"]) > len(got[1]["input_ids"])


def test_template_vars_flag(tokenizer_dirs, tmp_path):
    """--template-vars enable_thinking: a row's enable_thinking reaches Qwen3's template (an
    empty think block in the generation prompt, so the trained span starts after it)."""
    tok = hf_tokenizer(tokenizer_dirs["chatml"], "qwen3")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    (tmp_path / "t.jinja").write_text(template("qwen3"), encoding="utf-8")
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs, "enable_thinking": False}])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(src), "--chat-template", str(tmp_path / "t.jinja"),
            "--template-vars", "enable_thinking,reasoning_effort")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["template_vars"] == ["tools", "documents", "enable_thinking", "reasoning_effort"]
    docs = list(iter_documents(tmp_path / "out"))
    assert len(docs) == 2
    for d, i in zip(docs, [1, 3]):
        full = tok.apply_chat_template(msgs[: i + 1], tokenize=False, enable_thinking=False)
        prompt = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert prompt.endswith("<think>\n\n</think>\n\n") and full.startswith(prompt)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        assert d["input_ids"] == enc["input_ids"]
        assert d["labels"] == labels_from_char_spans(enc, [(len(prompt), len(full))])
    r = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "x"), "--tokenizer",
                            str(tokenizer_dirs["chatml"]), "--template-vars", "messages"])
    assert r.exit_code == 1 and "--template-vars 'messages'" in r.output


# --------------------------------------------------------------------------- dates
_DATE_CHECK = r"""
import json, sys
from transformers import AutoTokenizer
from irtrain.config import PrepareConfig
from irtrain.prepare import run
from irtrain.shards import iter_documents
tok_dir, tmpl, data, out = sys.argv[1:]
m = run(PrepareConfig(inputs=[data], out=out, tokenizer=tok_dir, chat_template=tmpl, mask="all"))
tok = AutoTokenizer.from_pretrained(tok_dir)
tok.chat_template = open(tmpl, encoding="utf-8").read()
msgs = json.loads(open(data, encoding="utf-8").readline())["messages"]
ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
doc = next(iter_documents(out))
print(json.dumps({"same": doc["input_ids"] == list(ref), "clock": m["template_clock"],
                  "text": tok.decode(doc["input_ids"])}))
"""


@pytest.mark.parametrize("name,tok_name,pattern,fmt", [
    ("llama3_2", "llama3", r"Today Date: (\d\d \w\w\w \d{4})", "%d %b %Y"),
    ("smollm3", "chatml", r"Today Date: (\d\d \w+ \d{4})", "%d %B %Y"),
    ("granite3_3", "chatml", r"Today's Date: (\w+ \d\d, \d{4})", "%B %d, %Y"),
])
def test_strftime_now_is_local_time_fixed_once(tokenizer_dirs, tmp_path, name, tok_name, pattern, fmt):
    """Llama-3.2's, SmolLM3's and Granite-3.3's date in UTC+14 and UTC-12: at any moment one of
    them is on another date than UTC; both equal transformers' rendering (local time) in the same
    zone."""
    import datetime

    (tmp_path / "t.jinja").write_text(template(name), encoding="utf-8")
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Date?"},
                                                            {"role": "assistant", "content": "See above."}]}] * 3)
    utc = datetime.datetime.now(datetime.timezone.utc).strftime(fmt)
    dates = {}
    for tz in ("Pacific/Kiritimati", "Etc/GMT+12"):
        env = {**os.environ, "TZ": tz}
        p = subprocess.run([sys.executable, "-c", _DATE_CHECK, str(tokenizer_dirs[tok_name]), str(tmp_path / "t.jinja"),
                            str(data), str(tmp_path / tz.replace("/", "_"))],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout.strip().splitlines()[-1])
        assert res["same"], res["text"]
        date = re.search(pattern, res["text"]).group(1)
        clock = datetime.datetime.fromisoformat(res["clock"])
        assert clock.utcoffset() == datetime.timedelta(hours=14 if tz.startswith("Pacific") else -12)
        assert date == clock.strftime(fmt)  # the manifest records the clock the rows saw
        dates[tz] = date
    assert utc in dates.values() or len(set(dates.values())) == 2
    assert any(d != utc for d in dates.values())


def test_the_clock_in_the_cache_key():
    from irtrain.prepare import clock_in_key

    iso = "2026-12-01T09:30:05+14:00"
    assert clock_in_key(None, iso) is None
    assert clock_in_key("{{ messages }}", iso) is None
    assert clock_in_key(template("llama3_2"), iso) == "2026-12-01"  # strftime_now("%d %b %Y"): the date only
    assert clock_in_key("{{ strftime_now('%Y-%m-%d') }} {{ strftime_now(\"%B %d, %Y\") }}", iso) == "2026-12-01"
    assert clock_in_key("{{ strftime_now('%H:%M') }}", iso) == iso
    assert clock_in_key("{% set f = '%d' %}{{ strftime_now(f) }}", iso) == iso  # a format it cannot read
