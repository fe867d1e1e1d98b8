"""`irtrain prepare` end to end: token-for-token identity with transformers, formats,
inputs, over-long handling, packing, caching, the report, and every bad-input case."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import PrepareConfig
from irtrain.errors import DataError, ShardError, TemplateError
from irtrain.prepare import run
from irtrain.shards import ShardSet, iter_documents

runner = CliRunner()
LONG = ("A long turn with many words, numbers 12345 and unicode ü ß 中文 🎉. " * 25).strip()


def corpus(system: bool) -> list[list[dict]]:
    """Multi-turn conversations with system prompts, unicode and emoji, empty assistant
    turns, very long turns, whitespace the templates trim, and control-token lookalikes."""
    s = [{"role": "system", "content": "You are terse. Système ✓"}] if system else []
    return [
        s + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        s + [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3+3? 🤔"}, {"role": "assistant", "content": "6 🎉"},
             {"role": "user", "content": "日本語で?"}, {"role": "assistant", "content": "六です。"}],
        [{"role": "user", "content": "empty answer next"}, {"role": "assistant", "content": ""},
         {"role": "user", "content": "  padded\t\n"}, {"role": "assistant", "content": "  spaced out  \n\n"}],
        s + [{"role": "user", "content": LONG}, {"role": "assistant", "content": LONG + " " + LONG}],
        [{"role": "user", "content": "literal <|im_end|> and [INST] and <|eot_id|> in text"},
         {"role": "assistant", "content": "café naïve — “quotes” 'single' \\ back\\slash"}],
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prep(tmp_path: Path, tok: Path, inputs: list, name: str = "out", **kw) -> dict:
    cfg = PrepareConfig(inputs=[str(i) for i in inputs], out=str(tmp_path / name), tokenizer=str(tok), **kw)
    return run(cfg)


def reference_labels(tok, msgs: list[dict], mask: str) -> list[int]:
    """The mask computed with transformers alone: render prefixes, find each trained turn's
    character span, mark every token whose offsets overlap one; the first token is never trained."""
    full = tok.apply_chat_template(msgs, tokenize=False)
    for i in range(1, len(msgs)):  # the construction needs prefix-stable renders
        assert full.startswith(tok.apply_chat_template(msgs[:i], tokenize=False))
    render = lambda m, gen: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if mask == "all":
        spans = [(0, len(full))]
    elif mask == "completion":
        start = max(i for i, m in enumerate(msgs) if m["role"] != "assistant") + 1
        spans = [(len(render(msgs[:start], True)), len(full))]
    else:
        turns = assistant if mask == "assistant" else assistant[-1:]
        spans = [(len(render(msgs[:i], True)), len(render(msgs[: i + 1], False))) for i in turns]
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        hit = any((a < e and s < b) if e > s else (a <= s < b) for a, b in spans)
        labels.append(tid if hit else -100)
    labels[0] = -100
    return labels


def transformers_ids(tok, msgs: list[dict]) -> list[int]:
    out = tok.apply_chat_template(msgs, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral", "qwen_style"])
@pytest.mark.parametrize("mask", ["assistant", "last", "completion", "all"])
def test_token_for_token_identity_with_transformers(tokenizer_dirs, tmp_path, template, mask):
    from transformers import AutoTokenizer

    from test_data import QWEN_STYLE_TEMPLATE, TOOL_CONV

    tok_dir = tokenizer_dirs["chatml" if template == "qwen_style" else template]
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    convs = corpus(system=template != "mistral")  # the Mistral template has no system role
    extra = {}
    if template == "qwen_style":  # a tool-calling template, given with --chat-template
        (tmp_path / "qwen.jinja").write_text(QWEN_STYLE_TEMPLATE)
        tok.chat_template = QWEN_STYLE_TEMPLATE
        extra["chat_template"] = str(tmp_path / "qwen.jinja")
        convs.append(TOOL_CONV)
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    prep(tmp_path, tok_dir, [src], max_len=16384, mask=mask, **extra)
    docs = list(iter_documents(tmp_path / "out"))
    assert [d["id"] for d in docs] == list(range(len(convs)))
    for d, msgs in zip(docs, convs):
        assert d["input_ids"] == transformers_ids(tok, msgs)
        assert d["labels"] == reference_labels(tok, msgs, mask)
    # the end-of-turn token is trained (the model must learn to stop)
    eot = tok.convert_tokens_to_ids({"mistral": "</s>", "llama3": "<|eot_id|>"}.get(template, "<|im_end|>"))
    assert eot in docs[0]["labels"]


def test_preference_formats_pack_pairs_together(tokenizer_dirs, tmp_path):
    from transformers import AutoTokenizer

    tok_dir = tokenizer_dirs["chatml"]
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    u = {"role": "user", "content": "Which is better?"}
    rows = [
        # UltraFeedback-binarized: whole conversations sharing the prompt turn, prompt as a string
        {"prompt": "Which is better?", "chosen": [u, {"role": "assistant", "content": "The first."}],
         "rejected": [u, {"role": "assistant", "content": "Dunno"}], "score_chosen": 8.0, "score_rejected": 2.0},
        # strings with a prompt
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
    ] * 20
    write_jsonl(tmp_path / "p.jsonl", rows)
    m = prep(tmp_path, tok_dir, [tmp_path / "p.jsonl"], max_len=160)
    assert m["format"] == "preference" and m["report"]["dropped"] == 0
    docs = list(iter_documents(tmp_path / "out"))
    assert len(docs) == 40
    ids = transformers_ids(tok, [u, {"role": "assistant", "content": "The first."}])
    assert docs[0]["chosen"]["input_ids"] == ids
    assert docs[1]["rejected"]["input_ids"] == transformers_ids(
        tok, [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}])
    # only the completion is trained; the prompt (with its generation prompt) is not
    prompt_ids = transformers_ids(tok, [u]) + tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    labels = docs[0]["chosen"]["labels"]
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert all(l != -100 for l in labels[len(prompt_ids):])
    ss = ShardSet(tmp_path / "out")
    for row in ss:
        assert row.num_tokens <= 160
        parts = row.seg_part.tolist()
        ex = row.seg_example.tolist()
        for j in range(0, len(parts), 2):  # chosen then rejected of the same example, side by side
            assert parts[j : j + 2] == [0, 1] and ex[j] == ex[j + 1]


def test_other_formats_and_auto_detection(tokenizer_dirs, tmp_path):
    tok_dir = tokenizer_dirs["llama3"]
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"},
                                               {"prompt": [{"role": "user", "content": "p2"}],
                                                "completion": [{"role": "assistant", "content": "c2"}]}])
    assert prep(tmp_path, tok_dir, [pc], "o1")["format"] == "prompt-completion"
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True},
                                                 {"prompt": "p", "completion": "d", "label": False}])
    prep(tmp_path, tok_dir, [kto], "o2")
    assert [d["label"] for d in iter_documents(tmp_path / "o2")] == [True, False]
    ranked = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "completions": ["a", "b", "c", "d"], "scores": [0.2, 0.9, 0.5, 0.1]}])
    prep(tmp_path, tok_dir, [ranked], "o3")
    (doc,) = iter_documents(tmp_path / "o3")
    assert [round(c["score"], 3) for c in doc["candidates"]] == [0.9, 0.5, 0.2, 0.1]
    assert ShardSet(tmp_path / "o3").row(0).seg_part.tolist() == [0, 1, 2, 3]  # all K candidates in one row


def test_inputs_jsonl_json_parquet_dir_and_hf_give_the_same_data(tokenizer_dirs, tmp_path):
    import polars as pl

    rows = [{"messages": m} for m in corpus(system=True)] * 3
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    pl.DataFrame(rows).write_parquet(tmp_path / "a.parquet")
    tok = tokenizer_dirs["chatml"]
    hashes = {}
    for name, inp in [("jsonl", d / "a.jsonl"), ("json", tmp_path / "a.json"), ("parquet", tmp_path / "a.parquet"),
                      ("dir", d), ("hf", f"hf:{d}")]:
        m = prep(tmp_path, tok, [inp], f"out-{name}", max_len=16384)
        hashes[name] = m["content_hash"]
        assert m["report"]["docs_out"] == len(rows)
    assert len(set(hashes.values())) == 1, hashes
    m = json.loads((tmp_path / "out-hf" / "manifest.json").read_text())
    assert m["sources"][0]["sha256"].startswith("hf:")


def test_truncation_modes_are_counted(tokenizer_dirs, tmp_path):
    tok = tokenizer_dirs["chatml"]
    rows = [{"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "q " * 10}, {"role": "assistant", "content": LONG}]}]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    r = prep(tmp_path, tok, [src], "drop", max_len=128)["report"]
    assert (r["docs_in"], r["docs_out"], r["dropped"], r["truncated"]) == (2, 1, 1, 0)
    r = prep(tmp_path, tok, [src], "left", max_len=128, truncation="left")["report"]
    assert (r["docs_out"], r["dropped"], r["truncated"]) == (2, 0, 1)
    long_doc = next(d for d in iter_documents(tmp_path / "left") if d["id"] == 1)
    assert len(long_doc["input_ids"]) == 128 and long_doc["labels"][0] == -100
    full = next(iter(prep(tmp_path, tok, [src], "full", max_len=100000)["shards"]))
    assert full["tokens"] > 128
    whole = next(d for d in iter_documents(tmp_path / "full") if d["id"] == 1)
    assert long_doc["input_ids"] == whole["input_ids"][-128:]  # left keeps the end
    # right truncation keeps the prompt and cuts the answer
    r = prep(tmp_path, tok, [src], "right", max_len=128, truncation="right")["report"]
    assert r["truncated"] == 1
    right = next(d for d in iter_documents(tmp_path / "right") if d["id"] == 1)
    assert right["input_ids"] == whole["input_ids"][:128]
    # a cut that leaves nothing to train drops the example (counted)
    r = prep(tmp_path, tok, [src], "right8", max_len=8, truncation="right")["report"]
    assert r["dropped_nothing_trained"] >= 1


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 60), min_size=1, max_size=40), max_len=st.integers(48, 400),
       pack=st.booleans())
def test_packing_keeps_every_document_once_and_intact(tokenizer_dirs, tmp_path_factory, lengths, max_len, pack):
    tok = tokenizer_dirs["chatml"]
    tmp = tmp_path_factory.mktemp("pack")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "word " * n}]}
            for i, n in enumerate(lengths)]
    src = write_jsonl(tmp / "p.jsonl", rows)
    m = prep(tmp, tok, [src], "packed", max_len=max_len, pack=pack)
    prep(tmp, tok, [src], "ref", max_len=100000, pack=False)
    ss = ShardSet(tmp / "packed")
    assert all(row.num_tokens <= max_len for row in ss)
    assert all(row.position_ids.tolist() == [p for s, e in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:]) for p in range(e - s)] for row in ss)
    kept = {d["id"]: d for d in iter_documents(tmp / "packed")}
    whole = {d["id"]: d for d in iter_documents(tmp / "ref")}
    seen = [int(e) for row in ss for e in row.seg_example]
    assert sorted(seen) == sorted(kept)  # every kept document exactly once
    for i, d in kept.items():
        assert d == whole[i]  # intact
    assert set(whole) - set(kept) == {i for i, d in whole.items() if len(d["input_ids"]) > max_len}
    assert m["report"]["dropped"] == len(whole) - len(kept)
    if pack and m["report"]["rows"]:
        assert m["report"]["packing_efficiency"] == pytest.approx(m["report"]["tokens_total"] / (m["report"]["rows"] * max_len), abs=1e-6)


def test_packing_over_several_windows_is_still_valid(tokenizer_dirs, tmp_path):
    from irtrain.data import load_tokenizer_files, preparer

    tok = load_tokenizer_files(str(tokenizer_dirs["chatml"]))
    rng = np.random.default_rng(1)
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "w " * int(n)}]}
            for n in rng.integers(1, 80, size=300)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    p = preparer(tok, "chat", "assistant", str(tmp_path / "shards"), max_len=256, truncation="drop", pack=True,
                 shard_rows=7, window_tokens=2000, threads=2)
    for k in range(0, len(rows), 50):  # several buffers, several packing windows
        chunk = b"".join(data.splitlines(keepends=True)[k : k + 50])
        assert p.add_jsonl(chunk, k + 1)[0] == 50
    res = json.loads(p.finish())
    assert res["counts"]["windows"] > 3 and len(res["shards"]) > 1
    total = 0
    for sh in res["shards"]:
        ro = np.fromfile(tmp_path / "shards" / sh["name"] / "row_offsets.bin", dtype="<i8")
        assert np.diff(ro).max() <= 256
        total += sh["segments"]
    assert total == 300


def test_rerun_reuses_the_output_and_a_config_change_rebuilds(tokenizer_dirs, tmp_path):
    tok = tokenizer_dirs["chatml"]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in corpus(True)])
    args = ["prepare", str(src), "--out", str(tmp_path / "out"), "--tokenizer", str(tok), "--max-len", "16384"]
    r1 = runner.invoke(app, args)
    assert r1.exit_code == 0, r1.output
    mtime = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0 and "cache hit" in r2.output
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == mtime
    r3 = runner.invoke(app, args[:-1] + ["8192"])
    assert r3.exit_code == 0 and "cache hit" not in r3.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["max_len"] == 8192
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]  # no temporary leftovers


def test_manifest_and_report(tokenizer_dirs, tmp_path):
    tok = tokenizer_dirs["chatml"]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in corpus(True)])
    m = prep(tmp_path, tok, [src], max_len=16384, shard_rows=1, pack=False)
    ss = ShardSet(tmp_path / "out")
    ss.verify()  # every per-shard checksum matches
    assert len(m["shards"]) == m["report"]["rows"] > 1
    assert m["sources"][0]["rows"] == 5 and len(m["sources"][0]["sha256"]) == 64
    assert m["config"]["max_len"] == 16384 and m["tokenizer_hash"] and m["chat_template_hash"]
    r = m["report"]
    assert r["tokens_total"] == sum(len(d["input_ids"]) for d in iter_documents(tmp_path / "out"))
    assert r["tokens_trained"] == sum(sum(1 for l in d["labels"] if l != -100) for d in iter_documents(tmp_path / "out"))
    assert 0 < r["packing_efficiency"] <= 1


def test_preview_marks_trained_tokens(tokenizer_dirs, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in corpus(True)[:2]])
    r = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "o"), "--tokenizer",
                            str(tokenizer_dirs["chatml"]), "--preview", "1"])
    assert r.exit_code == 0, r.output
    assert "«Hello!<|im_end|>\n»" in r.output
    assert "documents out" in r.output and "example 0" in r.output and "example 1" not in r.output


def test_threads_do_not_change_the_output(tokenizer_dirs, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in corpus(True)] * 10)
    a = prep(tmp_path, tokenizer_dirs["llama3"], [src], "a", threads=1)
    b = prep(tmp_path, tokenizer_dirs["llama3"], [src], "b", threads=2)
    assert a["content_hash"] == b["content_hash"] and a["cache_key"] == b["cache_key"]


# --------------------------------------------------------------------------- bad input
GOOD = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}


def cli(tmp_path: Path, tok: Path, *extra: str, out: str = "out"):
    return runner.invoke(app, ["prepare", *extra, "--out", str(tmp_path / out), "--tokenizer", str(tok)])


def assert_one_line_error(result, *needles: str, tmp_path: Path, out: str = "out") -> None:
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error:") and "\n" not in text, text
    assert "Traceback" not in text
    for n in needles:
        assert n in text, text
    assert not (tmp_path / out).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_missing_path(tokenizer_dirs, tmp_path):
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "nope.jsonl"))
    assert_one_line_error(r, "nope.jsonl", "no such file", tmp_path=tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file(tokenizer_dirs, tmp_path, content):
    (tmp_path / "e.jsonl").write_bytes(content)
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "e.jsonl"), "--format", "chat")
    assert_one_line_error(r, "e.jsonl", "empty", tmp_path=tmp_path)


def test_invalid_json_on_a_row(tokenizer_dirs, tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{\"messages\": [oops\n")
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "b.jsonl"))
    assert_one_line_error(r, "b.jsonl:3:", "invalid JSON", tmp_path=tmp_path)


def test_invalid_json_in_a_json_array_file(tokenizer_dirs, tmp_path):
    (tmp_path / "b.json").write_text("[\n" + json.dumps(GOOD) + ",\n{oops}\n]")
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "b.json"), "--format", "chat")
    assert_one_line_error(r, "b.json:3:", "invalid JSON", tmp_path=tmp_path)


def test_row_without_the_formats_fields(tokenizer_dirs, tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [GOOD, {"text": "no messages here"}])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "b.jsonl"))
    assert_one_line_error(r, "b.jsonl:2:", "no 'messages' field", tmp_path=tmp_path)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c"}])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "p.jsonl"), "--format", "preference")
    assert_one_line_error(r, "p.jsonl:1:", "'rejected'", tmp_path=tmp_path)


def test_unknown_role(tokenizer_dirs, tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [GOOD, {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "a"}]}])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "b.jsonl"))
    assert_one_line_error(r, "b.jsonl:2:", "unknown role \"robot\"", tmp_path=tmp_path)


def test_no_assistant_turn_under_assistant_masking(tokenizer_dirs, tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "alone"}]}])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "b.jsonl"))
    assert_one_line_error(r, "b.jsonl:1:", "no assistant turn", tmp_path=tmp_path)
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "b.jsonl"), "--mask", "all")
    assert r.exit_code == 0, r.output


def test_non_utf8_bytes(tokenizer_dirs, tmp_path):
    (tmp_path / "b.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "b.jsonl"))
    assert_one_line_error(r, "b.jsonl:2:", "not valid UTF-8", "0xe9", tmp_path=tmp_path)


def test_preference_pair_whose_prompts_differ(tokenizer_dirs, tmp_path):
    pair = {"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}
    write_jsonl(tmp_path / "b.jsonl", [pair])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "b.jsonl"))
    assert_one_line_error(r, "b.jsonl:1:", "different prompts", tmp_path=tmp_path)


def test_template_that_fails_to_render(tokenizer_dirs, tmp_path):
    # the Mistral template raises on a system message
    write_jsonl(tmp_path / "b.jsonl", [GOOD, {"messages": [{"role": "system", "content": "s"}, *GOOD["messages"]]}])
    r = cli(tmp_path, tokenizer_dirs["mistral"], str(tmp_path / "b.jsonl"))
    assert_one_line_error(r, "b.jsonl:2:", "Conversation roles must alternate", tmp_path=tmp_path)
    # a template that does not parse names the template file
    (tmp_path / "t.jinja").write_text("{% if messages %}unclosed")
    r = cli(tmp_path, tokenizer_dirs["mistral"], str(tmp_path / "b.jsonl"), "--chat-template", str(tmp_path / "t.jinja"))
    assert_one_line_error(r, "t.jinja", "does not parse", tmp_path=tmp_path)
    # a template that is not prefix-stable cannot mask the turns of a pair's completions
    # (a chat row would be split into per-turn examples: test_prepare_templates)
    (tmp_path / "u.jinja").write_text("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[old]"
                                      "{% else %}{{ m.content }}{% endif %}|{% endfor %}")
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "chosen": [a("x"), a("y")], "rejected": [a("z"), a("w")]}])
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "c.jsonl"), "--chat-template", str(tmp_path / "u.jinja"))
    assert_one_line_error(r, "c.jsonl:1:", "not prefix-stable", tmp_path=tmp_path)


def test_output_path_that_is_not_a_prepare_output(tokenizer_dirs, tmp_path):
    write_jsonl(tmp_path / "g.jsonl", [GOOD])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(tmp_path / "g.jsonl"))
    assert r.exit_code == 1 and "is not an irtrain prepare output" in r.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl", "out"]


def test_skip_invalid_counts_and_lists_skips(tokenizer_dirs, tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"".join([
        json.dumps(GOOD).encode() + b"\n",
        b"{oops\n",
        json.dumps({"text": "x"}).encode() + b"\n",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode() + b"\n",
        b'{"messages": [{"role": "user", "content": "\xff"}]}\n',
        json.dumps({"messages": [{"role": "user", "content": "alone"}]}).encode() + b"\n",
        json.dumps(GOOD).encode() + b"\n",
    ]))
    r = cli(tmp_path, tokenizer_dirs["chatml"], str(path), "--skip-invalid")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rep = m["report"]
    assert (rep["docs_in"], rep["docs_out"], rep["skipped"]) == (7, 2, 5)
    assert [s["row"] for s in rep["skipped_rows"]] == [2, 3, 4, 5, 6]
    assert "skipped" in r.output and f"{path}:2:" in r.output
    assert [d["id"] for d in iter_documents(tmp_path / "out")] == [0, 6]  # ids are source row indices


def test_python_api_raises_typed_errors(tokenizer_dirs, tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "system", "content": "s"}, *GOOD["messages"]]}])
    with pytest.raises(TemplateError) as e:
        prep(tmp_path, tokenizer_dirs["mistral"], [tmp_path / "b.jsonl"])
    assert e.value.row == 1 and e.value.path == str(tmp_path / "b.jsonl")
    with pytest.raises(DataError):
        prep(tmp_path, tokenizer_dirs["mistral"], [tmp_path / "missing.jsonl"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text("{}")
    with pytest.raises(ShardError):
        prep(tmp_path, tokenizer_dirs["chatml"], [tmp_path / "b.jsonl"], "other")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert os.listdir(tmp_path / "other") == ["manifest.json"]
