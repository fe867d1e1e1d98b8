"""irtrain.data and the Rust pieces under it, each against a pure-Python oracle or its peer:
the shard writer against `shards.write_shard_set` (byte for byte), packing against the
rules (hypothesis) and TRL's BFD, rendering and tokenization against transformers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irtrain import data
from irtrain.errors import DataError, TemplateError
from irtrain.models import tokenizer_hash
from irtrain.shards import ARRAYS, Segment, write_shard_set

# --------------------------------------------------------------------------- shard writer
segments = st.builds(
    lambda ids, labels_on, ex, part, score: Segment(
        input_ids=ids, labels=[t if on else -100 for t, on in zip(ids, labels_on * len(ids))], example=ex,
        part=part, score=score),
    st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=12),
    st.lists(st.booleans(), min_size=1, max_size=1),
    st.integers(0, 10**12),
    st.integers(0, 7),
    st.one_of(st.just(float("nan")), st.floats(-1e6, 1e6, width=32)),
)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.lists(segments, min_size=1, max_size=4), max_size=9), shard_rows=st.integers(1, 4))
def test_rust_writer_is_byte_identical_to_the_reference(tmp_path_factory, rows, shard_rows):
    root = tmp_path_factory.mktemp("w")
    ref = write_shard_set(root / "ref", "chat", rows, max_len=64, shard_rows=shard_rows)
    metas = data.write_shards(root / "rust", rows, shard_rows=shard_rows)
    assert [m["name"] for m in metas] == [m["name"] for m in ref["shards"]]
    for mine, theirs in zip(metas, ref["shards"]):
        assert mine == theirs  # rows, segments, tokens and every file's sha256
        for name in ARRAYS:
            a = (root / "rust" / mine["name"] / f"{name}.bin").read_bytes()
            b = (root / "ref" / mine["name"] / f"{name}.bin").read_bytes()
            assert a == b, name


def test_write_shards_rejects_inconsistent_arrays(tmp_path):
    from irtrain import _rust

    with pytest.raises(DataError, match="array lengths"):
        _rust.write_shards(str(tmp_path / "x"), 4, np.zeros(3, np.uint32), np.zeros(3, np.int32),
                           np.array([0, 3], np.int64), np.zeros(2, np.int64), np.zeros(1, np.int32),
                           np.zeros(1, np.float32), np.array([0, 1], np.int64))


# --------------------------------------------------------------------------- packing
@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), max_size=200), cap=st.integers(300, 1000))
def test_bfd_packs_every_item_once_within_capacity(lengths, cap):
    rows = data.pack_bfd(lengths, cap)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= cap for r in rows)
    assert all(r for r in rows)
    assert len(rows) >= math.ceil(sum(lengths) / cap)
    # best fit decreasing never leaves two rows that could be merged
    loads = sorted(sum(lengths[i] for i in r) for r in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > cap


def test_bfd_rejects_items_longer_than_a_row():
    with pytest.raises(DataError, match="more than the row capacity"):
        data.pack_bfd([5, 11], 10)


def test_bfd_needs_no_more_rows_than_trl():
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.5, 0.8, size=3000).astype(int), 1, 4096)
    ds = Dataset.from_dict({"input_ids": [[1] * int(n) for n in lengths]})
    trl_rows = len(pack_dataset(ds, 4096, strategy="bfd"))
    ours = len(data.pack_bfd(lengths.tolist(), 4096))
    assert ours <= trl_rows, (ours, trl_rows)


# --------------------------------------------------------------------------- tokenizer files and rendering
def test_load_tokenizer_files_reads_template_and_specials(tokenizer_dirs):
    tok = data.load_tokenizer_files(str(tokenizer_dirs["llama3"]))
    assert dict(tok.special_tokens)["bos_token"] == "<|begin_of_text|>"
    assert "<|start_header_id|>" in tok.chat_template
    assert len(tok.file_sha256) == 64


def test_chat_template_by_name(tokenizer_dirs, tmp_path):
    """--chat-template NAME: the tokenizer's named templates as transformers'
    apply_chat_template(chat_template=NAME) picks them (tokenizer_config.json's list, and
    additional_chat_templates/NAME.jinja), else a built-in style; anything else is an error
    naming both lists."""
    import shutil

    from transformers import AutoTokenizer

    from irtrain.toy import CHAT_TEMPLATES

    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dirs["chatml"], d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    tool_use = CHAT_TEMPLATES["chatml"].replace("<|im_start|>", "<|im_start|>[tools]")
    cfg["chat_template"] = [{"name": "default", "template": CHAT_TEMPLATES["chatml"]},
                            {"name": "tool_use", "template": tool_use}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    def check(names: list[tuple[str, str]]) -> None:
        hf = AutoTokenizer.from_pretrained(str(d))
        for name, text in names:
            assert data.load_tokenizer_files(str(d), name).chat_template == text
            ref = hf.apply_chat_template(msgs, chat_template=name, tokenize=True, return_dict=True)["input_ids"]
            assert data.encode_rows([{"messages": msgs}], str(d), chat_template=name)[0]["input_ids"] == list(ref)

    check([("default", CHAT_TEMPLATES["chatml"]), ("tool_use", tool_use)])
    assert data.load_tokenizer_files(str(d)).chat_template == CHAT_TEMPLATES["chatml"]
    # template files take priority over every template of the config, as in transformers
    (d / "additional_chat_templates").mkdir()
    rag = CHAT_TEMPLATES["chatml"].replace("<|im_start|>", "<|im_start|>[docs]")
    (d / "additional_chat_templates" / "rag.jinja").write_text(rag)
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATES["mistral"])
    check([("default", CHAT_TEMPLATES["mistral"]), ("rag", rag)])
    assert data.load_tokenizer_files(str(d)).chat_template == CHAT_TEMPLATES["mistral"]
    files = data.load_tokenizer_files(str(tokenizer_dirs["chatml"]), "llama3")
    assert (files.chat_template, files.chat_template_origin) == (CHAT_TEMPLATES["llama3"], "built-in template 'llama3'")
    with pytest.raises(DataError, match=r"--chat-template 'qwen9': no such file, and no template of that name "
                                        r"\(the tokenizer's: default, rag; built in: chatml, llama3, mistral\)"):
        data.load_tokenizer_files(str(d), "qwen9")


def test_tokenizer_hash_matches_what_training_checks(tokenizer_dirs):
    """`irtrain.train` compares manifests' tokenizer_hash with sha256(backend_tokenizer.to_str())."""
    import hashlib

    from transformers import AutoTokenizer

    d = tokenizer_dirs["chatml"]
    backend = AutoTokenizer.from_pretrained(str(d)).backend_tokenizer
    assert data.Encoder(str(d)).tokenizer_hash == hashlib.sha256(backend.to_str().encode()).hexdigest()


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral"])
def test_encoder_tokenizer_hash_is_models_tokenizer_hash(tokenizer_dirs, template):
    """One definition of the tokenizer hash: the Rust data path's (what `prepare` writes into
    manifests) is `irtrain.models.tokenizer_hash` of the transformers tokenizer (what
    training and score check shards against)."""
    from transformers import AutoTokenizer

    d = tokenizer_dirs[template]
    assert data.Encoder(str(d)).tokenizer_hash == tokenizer_hash(AutoTokenizer.from_pretrained(str(d)))


def test_missing_tokenizer_dir_is_an_error(tmp_path):
    from irtrain.errors import TokenizerError

    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        data.load_tokenizer_files(str(tmp_path / "empty"))


HF_STYLE_TEMPLATE = (
    # constructs real hub templates use: namespace, loop controls, python string methods,
    # selectattr, tojson, whitespace control, trim_blocks/lstrip_blocks, raise_exception
    "{%- set ns = namespace(sys='') -%}\n"
    "{%- for m in messages %}\n"
    "    {%- if m.role == 'system' %}{% set ns.sys = m.content.strip() %}{% continue %}{% endif %}\n"
    "    {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n"
    "<|{{ m.role }}|>\n"
    "    {% if loop.first and ns.sys %}[{{ ns.sys | upper }}] {% endif %}\n"
    "{{ m.content.replace('  ', ' ') | trim }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}\n"
    "{%- if messages | selectattr('role', 'equalto', 'user') | list | length > 1 %}#{{ messages[-1] | tojson }}{% endif %}\n"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}\n"
)


# in the style of Qwen2.5's template (tools, tool calls via tojson, system default)
QWEN_STYLE_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# in the style of Llama-3.1's template (system split off, items filter, trim, header tokens)
LLAMA31_STYLE_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}{{- '"parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}" }}
        {%- for k, v in tool_call.arguments | items %}{{ '' if loop.first else ',' }}{{ k }}{%- endfor %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
TEMPLATES = {"hf_style": HF_STYLE_TEMPLATE, "qwen_style": QWEN_STYLE_TEMPLATE, "llama31_style": LLAMA31_STYLE_TEMPLATE}
TOOL_CONV = [
    {"role": "system", "content": "Use tools. "},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 2, "ratio": 0.5}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "21 °C <sunny> & \"nice\""},
]


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral", "hf_style", "qwen_style", "llama31_style"])
def test_render_matches_transformers(tokenizer_dirs, template, tmp_path):
    from transformers import AutoTokenizer

    d = tokenizer_dirs[template if template in tokenizer_dirs else "chatml"]
    tok = AutoTokenizer.from_pretrained(str(d))
    src = None
    if template in TEMPLATES:
        (tmp_path / "t.jinja").write_text(TEMPLATES[template])
        src = str(tmp_path / "t.jinja")
        tok.chat_template = TEMPLATES[template]
    enc = data.Encoder(str(d), chat_template=src)
    convs = [
        [{"role": "user", "content": "  hi  there \n"}, {"role": "assistant", "content": "yo 🎉 \"q\" <b>&"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "日本語\tx"},
         {"role": "assistant", "content": "b\n\n"}],
    ]
    if template != "mistral":
        convs.append([{"role": "system", "content": " sys "}, {"role": "user", "content": "u"}])
    if template in ("qwen_style", "llama31_style"):
        convs.append(TOOL_CONV)
    for msgs in convs:
        for gen in (False, True):
            assert enc.render(msgs, gen) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_template_errors(tokenizer_dirs, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(TemplateError, match="bad.jinja.*does not parse"):
        data.Encoder(str(tokenizer_dirs["chatml"]), chat_template=str(bad))
    enc = data.Encoder(str(tokenizer_dirs["mistral"]))
    docs, errors = enc.encode([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                             {"role": "assistant", "content": "a"}]}])
    assert docs == [] and errors[0][:2] == (1, "template")
    assert "Conversation roles must alternate" in errors[0][2]


# --------------------------------------------------------------------------- encode_rows (what `score` can reuse)
def test_encode_rows_shapes(tokenizer_dirs):
    tok = str(tokenizer_dirs["chatml"])
    chat = data.encode_rows([{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}], tok)
    assert chat[0]["id"] == 0 and len(chat[0]["input_ids"]) == len(chat[0]["labels"])
    pref = data.encode_rows([{"prompt": "q", "chosen": "good", "rejected": "bad"}], tok, fmt="preference")
    assert set(pref[0]) == {"id", "chosen", "rejected"}
    ranked = data.encode_rows([{"prompt": "q", "completions": ["x", "y", "z"], "scores": [1, 3, 2]}], tok, fmt="ranked")
    assert [c["score"] for c in ranked[0]["candidates"]] == [3.0, 2.0, 1.0]
    kto = data.encode_rows([{"prompt": "q", "completion": "c", "label": False}], tok, fmt="unpaired")
    assert kto[0]["label"] is False
    with pytest.raises(DataError, match=r"<rows>:2: .*no 'messages'"):
        data.encode_rows([{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
                          {"text": "x"}], tok)



def _as_lists(docs):
    """encode_rows output with numpy arrays as lists, for ==."""
    if isinstance(docs, dict):
        return {k: _as_lists(v) for k, v in docs.items()}
    if isinstance(docs, list):
        return [_as_lists(v) for v in docs]
    return docs.tolist() if isinstance(docs, np.ndarray) else docs


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral"])
def test_encode_rows_takes_tokenizer_objects(tokenizer_dirs, template, tmp_path):
    """An `AutoTokenizer` result encodes exactly as its directory does (every format); a
    `tokenizers.Tokenizer` with the template given as a file tokenizes alike; anything else is
    a one-line TokenizerError."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from irtrain.errors import TokenizerError

    path = tokenizer_dirs[template]
    rows = {
        "chat": [{"messages": [{"role": "user", "content": "2 plus 2? café 🎉"}, {"role": "assistant", "content": "4."}]}],
        "preference": [{"prompt": "q", "chosen": "good", "rejected": "bad"}],
        "ranked": [{"prompt": "q", "completions": ["x", "y", "z"], "scores": [1, 3, 2]}],
    }
    auto = AutoTokenizer.from_pretrained(str(path))
    for fmt, rs in rows.items():
        expected = _as_lists(data.encode_rows(rs, str(path), fmt=fmt))
        assert _as_lists(data.encode_rows(rs, auto, fmt=fmt)) == expected, fmt
        assert _as_lists(data.encode_rows(rs, path, fmt=fmt)) == expected, fmt  # a pathlib.Path
    assert data.Encoder(auto).tokenizer_hash == data.Encoder(str(path)).tokenizer_hash
    files = data.load_tokenizer_files(str(path))
    jinja = tmp_path / "t.jinja"
    jinja.write_text(files.chat_template, encoding="utf-8")
    raw = Tokenizer.from_file(files.tokenizer_file)
    if not any(name in files.chat_template for name, _ in files.special_tokens):  # a template naming bos_token needs the config
        assert _as_lists(data.encode_rows(rows["chat"], raw, chat_template=str(jinja))) == _as_lists(data.encode_rows(rows["chat"], str(path)))
    with pytest.raises(TemplateError, match="no chat template"):
        data.encode_rows(rows["chat"], raw)
    with pytest.raises(TokenizerError, match="got dict"):
        data.encode_rows(rows["chat"], {"not": "a tokenizer"})

def test_detect_format():
    assert data.detect_format(json.dumps({"messages": []})) == "chat"
    assert data.detect_format(json.dumps({"prompt": "p", "chosen": [], "rejected": [], "messages": []})) == "preference"
    assert data.detect_format(json.dumps({"text": "x"})) == "text"
    assert data.detect_format(json.dumps({"conversations": [], "text": "x"})) == "chat"  # ShareGPT
    assert data.detect_format(json.dumps({"dialog": []}), [("messages", "dialog")]) == "chat"
    with pytest.raises(DataError, match="cannot tell the format"):
        data.detect_format(json.dumps({"body": "x"}))


def test_iter_documents_is_reexported():
    from irtrain import shards

    assert data.iter_documents is shards.iter_documents


# --------------------------------------------------------------------------- fast byte-level BPE path
texts = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
        st.sampled_from(["<|im_end|>", "<|im_start|>", "<|endoftext|>", "  ", "\n\n", " 123456", "'s", "🎉🚀", "é", "\u00a0"]),
    ),
    max_size=12,
).map("".join)


@pytest.fixture(scope="module")
def encoders(tokenizer_dirs):
    d = str(tokenizer_dirs["chatml"])
    return data.Encoder(d, mask="all"), data.Encoder(d, mask="all", fast_bpe=False)


@settings(max_examples=150, deadline=None)
@given(user=texts, answer=texts)
def test_fast_bpe_is_token_identical_to_the_tokenizers_crate(encoders, user, answer):
    fast, slow = encoders
    assert fast.fast_bpe and not slow.fast_bpe
    rows = [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}]
    a, ea = fast.encode_jsonl(json.dumps(rows[0]).encode())
    b, eb = slow.encode_jsonl(json.dumps(rows[0]).encode())
    assert ea == eb
    for k in ("input_ids", "labels", "seg_offsets"):
        assert np.array_equal(a[k], b[k]), k


def test_fast_bpe_matches_transformers_on_hard_text(tokenizer_dirs):
    from transformers import AutoTokenizer

    d = str(tokenizer_dirs["llama3"])
    tok = AutoTokenizer.from_pretrained(d)
    enc = data.Encoder(d, mask="all")
    assert enc.fast_bpe
    hard = "x" + " " * 300 + "\n" * 50 + "a" * 500 + "🎉" * 30 + "<|eot_id|>" * 3 + "\u0301\u200d" * 20 + "1234567890" * 20
    msgs = [{"role": "user", "content": hard}, {"role": "assistant", "content": hard[::-1]}]
    (doc,), errors = enc.encode([{"messages": msgs}])
    assert not errors
    out = tok.apply_chat_template(msgs, tokenize=True)
    assert doc["input_ids"] == list(out["input_ids"])
