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


def test_template_that_drops_reasoning_from_its_own_turns_is_refused(tokenizer_dirs, tmp_path):
    """DeepSeek-R1 distills: the generation prompt opens <think>, the rendered turn never holds
    it; no example can be exact, so the row is refused, naming the fix."""
    (tmp_path / "t.jinja").write_text(template("deepseek_r1_distill"), encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"messages": reasoning_conversations()[0]}])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "c.jsonl"), "--chat-template", str(tmp_path / "t.jinja"))
    assert_one_line_error(r, "c.jsonl:1:", "not even for assistant turn 3 alone", "generation %} markers",
                          tmp_path=tmp_path)


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


def test_strftime_now_is_local_time_fixed_once(tokenizer_dirs, tmp_path):
    """Llama-3.2's "Today Date" in UTC+14 and UTC-12: at any moment one of them is on another
    date than UTC; both equal transformers' rendering (local time) in the same zone."""
    import datetime

    (tmp_path / "t.jinja").write_text(template("llama3_2"), encoding="utf-8")
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Date?"},
                                                            {"role": "assistant", "content": "See above."}]}] * 3)
    utc = datetime.datetime.now(datetime.timezone.utc).strftime("%d %b %Y")
    dates = {}
    for tz in ("Pacific/Kiritimati", "Etc/GMT+12"):
        env = {**os.environ, "TZ": tz}
        p = subprocess.run([sys.executable, "-c", _DATE_CHECK, str(tokenizer_dirs["llama3"]), str(tmp_path / "t.jinja"),
                            str(data), str(tmp_path / tz.replace("/", "_"))],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout.strip().splitlines()[-1])
        assert res["same"], res["text"]
        date = re.search(r"Today Date: (\d\d \w\w\w \d{4})", res["text"]).group(1)
        clock = datetime.datetime.fromisoformat(res["clock"])
        assert clock.utcoffset() == datetime.timedelta(hours=14 if tz.startswith("Pacific") else -12)
        assert date == clock.strftime("%d %b %Y")  # the manifest records the clock the rows saw
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
