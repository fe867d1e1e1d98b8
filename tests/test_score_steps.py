"""irtrain.score.steps: the states computed in Rust against the Python reference here (the
per-token splitting score used before, and the end-of-turn rule), on the score tests' data
and on random inputs, for byte-level and other tokenizers (a real one too); all states equal
today's except the last: the content's last token, then the end-of-turn token (terminal)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irtrain.score import read_segments, split_states, token_bytes
from irtrain.shards import Segment, ShardSet, write_shard_set

from test_score import encode, responses

REAL = Path("/root/.cache/irtrain/smollm2-135m-instruct-float32")
BLANK = b" \t\n\r\x0b\x0c"


# --------------------------------------------------------------------------- the Python reference
def ref_token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """Each token's bytes: byte-level BPE through the byte alphabet (added tokens as their
    content), else incremental decoding (score's Python path before the Rust one)."""
    table = _byte_decoder(tokenizer)
    if table is not None:
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        pieces = []
        for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
            if i in added:
                pieces.append(added[i].encode("utf-8"))
            elif t is not None and all(c in table for c in t):
                pieces.append(bytes(table[c] for c in t))
            else:
                return ref_incremental_token_bytes(tokenizer, ids)
        return pieces
    return ref_incremental_token_bytes(tokenizer, ids)


def ref_incremental_token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """Two decodes of a window starting at the same token give each token the text it adds;
    a trailing U+FFFD waits for the token completing the character."""
    dec = lambda a, b: tokenizer.decode(ids[a:b], skip_special_tokens=False,  # noqa: E731
                                        clean_up_tokenization_spaces=False)
    pieces: list[bytes] = []
    prefix, read, extra = 0, 0, 0
    for k in range(len(ids)):
        before = dec(prefix, read)
        now = dec(prefix, k + 1)
        stable = len(now)
        if k < len(ids) - 1:
            while stable > 0 and now[stable - 1] == "\ufffd":
                stable -= 1
        start = len(before) + extra
        pieces.append(now[start:stable].encode("utf-8") if stable > start else b"")
        extra += max(0, stable - start)
        if stable == len(now):
            prefix, read, extra = read, k + 1, 0
    return pieces


def _spec(tokenizer) -> dict:
    key = id(tokenizer)  # the tests' tokenizers live as long as the module
    if key not in _SPECS:
        _SPECS[key] = json.loads(tokenizer.backend_tokenizer.to_str())
    return _SPECS[key]


_SPECS: dict[int, dict] = {}


def _byte_decoder(tokenizer) -> dict[str, int] | None:
    spec = _spec(tokenizer)
    dec = spec.get("decoder") or {}
    if "ByteLevel" not in [dec.get("type")] + [d.get("type") for d in dec.get("decoders", []) or []]:
        return None
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def ref_step_ends(pieces: list[bytes], delimiter: bytes) -> list[int]:
    """The token ending each step (the delimiter closes its step; a run is one boundary; a
    leading one opens none; the last step ends at the last token; one token ends one step)."""
    if not pieces:
        return []
    text = b"".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    boundaries = []
    i = 0
    while (j := text.find(delimiter, i)) != -1:
        e = j + len(delimiter)
        while text.startswith(delimiter, e):
            e += len(delimiter)
        if j > 0:
            boundaries.append(e)
        i = e
    tokens = [min(int(np.searchsorted(ends, b, side="left")), len(pieces) - 1) for b in boundaries if b < len(text)]
    tokens.append(len(pieces) - 1)
    out: list[int] = []
    for t in tokens:
        if not out or out[-1] != t:
            out.append(t)
    return out


def ref_end_of_turn(pieces: list[bytes], special: list[bool]) -> int | None:
    """The first special token of the trailing run of special and whitespace-only tokens."""
    eot = None
    for k in range(len(pieces) - 1, -1, -1):
        if special[k]:
            eot = k
        elif pieces[k].strip(BLANK):
            break
    return eot


def ref_states(tokenizer, ids: list[int], labels: list[int], delimiter: bytes) -> tuple[list[int], bool]:
    """(states, terminal) of one segment: s_0, the end of each content step, the end-of-turn token."""
    resp = np.flatnonzero(np.asarray(labels) != -100)
    r_ids = [ids[t] for t in resp]
    pieces = ref_token_bytes(tokenizer, r_ids)
    specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} - {_unk_id(tokenizer)}
    eot = ref_end_of_turn(pieces, [i in specials for i in r_ids])
    ends = ref_step_ends(pieces[:eot], delimiter) + ([eot] if eot is not None else [])
    return [int(resp[0]) - 1] + [int(resp[e]) for e in ends], eot is not None


def _unk_id(tokenizer) -> int | None:
    """The model's unknown token (content it could not encode, never the end of a turn)."""
    unk = _spec(tokenizer)["model"].get("unk_token")
    return tokenizer.convert_tokens_to_ids(unk) if unk else None


def old_states(tokenizer, ids: list[int], labels: list[int], delimiter: bytes) -> list[int]:
    """The states before: s_0 and the step ends over the whole response (its last token last)."""
    resp = np.flatnonzero(np.asarray(labels) != -100)
    ends = ref_step_ends(ref_token_bytes(tokenizer, [ids[t] for t in resp]), delimiter)
    return [int(resp[0]) - 1] + [int(resp[e]) for e in ends]


# --------------------------------------------------------------------------- tokenizers
def _metaspace():
    """A SentencePiece-style BPE (Metaspace, not byte-level): incremental decoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(["step one is here\n\nstep two is there", "and the answer is 4"] * 20,
                          trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "</s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>")


def _byte_fallback():
    """Llama-2 / Mistral style: Metaspace BPE with <0xXX> byte fallback and a decoder sequence,
    so a character outside the vocabulary is several tokens (U+FFFD until the last)."""
    from conftest import TEXTS
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(TEXTS[:50], trainers.BpeTrainer(vocab_size=300, limit_alphabet=40, show_progress=False,
                                                          special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(t.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


KINDS = ["chatml", "llama3", "mistral", "metaspace", "byte_fallback", "smollm2"]


@pytest.fixture(scope="module")
def tokenizers_by_kind(tokenizer_dirs):
    from transformers import AutoTokenizer

    out = {name: AutoTokenizer.from_pretrained(str(tokenizer_dirs[name])) for name in ("chatml", "llama3", "mistral")}
    out["metaspace"], out["byte_fallback"] = _metaspace(), _byte_fallback()
    if REAL.is_dir():
        out["smollm2"] = AutoTokenizer.from_pretrained(str(REAL))
    return out


def _tok(tokenizers_by_kind, kind):
    if kind not in tokenizers_by_kind:
        pytest.skip(f"{REAL} is not here (scripts/get-real-model)")
    return tokenizers_by_kind[kind]


def end_of_turn_token(tok) -> str:
    for t in ("<|im_end|>", "<|eot_id|>"):
        if t in tok.get_vocab():
            return t
    return tok.eos_token


# --------------------------------------------------------------------------- the score tests' data
def test_states_of_the_score_tests_data_equal_the_reference(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    docs = [encode(tok, p, r) for p, r in responses(9)] + [encode(tok, "say hi", "hi there"),
                                                         encode(tok, "and?", "\n\nnothing more")]
    segs = [Segment(p + r, lab, example=i) for i, (p, r, lab) in enumerate(docs)]
    write_shard_set(tmp_path / "s", "chat", [segs[0:4], segs[4:5], segs[5:8], segs[8:11]], max_len=512, shard_rows=2)
    shards = ShardSet(tmp_path / "s")
    got = read_segments(shards, tok, "\n\n", max_len=512)
    assert [s.example for s in got] == list(range(len(docs)))
    for s, (p, r, lab) in zip(got, docs):
        ids = p + r
        want, terminal = ref_states(tok, ids, lab, b"\n\n")
        assert s.states.tolist() == want and s.terminal == terminal is True
        row = shards.row(s.row)
        assert row.input_ids[s.start:s.start + s.length].tolist() == ids
        old = old_states(tok, ids, lab, b"\n\n")
        # today's states but the last; then the last content token and <|im_end|>, terminal
        assert s.states[:-2].tolist() == old[:-1] and s.states[-1] == old[-1] == len(ids) - 1
        assert s.states[-2] == len(ids) - 2 and tok.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"
        assert s.num_steps == len(old) - 1


def test_chatml_scaffold_after_the_turn_is_no_state(tok_chatml):
    """`<|im_end|>` then the template's newline, trained: the newline is no state."""
    tok = tok_chatml
    p = tok("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    r = tok("Step one.\n\nStep two.<|im_end|>\n", add_special_tokens=False).input_ids
    found = split_states(tok, [(np.array(p + r), np.array([-100] * len(p) + r), np.array([0, len(p) + len(r)]))], "\n\n")
    pieces = token_bytes(tok, r)
    assert b"".join(pieces) == b"Step one.\n\nStep two.<|im_end|>\n"
    eot = pieces.index(b"<|im_end|>")
    boundary = next(k for k in range(len(pieces)) if b"".join(pieces[:k + 1]).endswith(b".\n\n"))
    assert found.states.tolist() == [len(p) - 1, len(p) + boundary, len(p) + eot - 1, len(p) + eot]
    assert found.terminal.tolist() == [True] and found.segment.tolist() == [0]


@pytest.fixture(scope="module")
def tok_chatml(tokenizer_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dirs["chatml"]))


# --------------------------------------------------------------------------- random inputs
FRAGMENTS = ["Step", " 1", ":", " x", "\n\n", "\n", " ", "café", "日本語", "🎉", "é", "\t", "is", " is ", "...", "。",
             "{EOT}", " {EOT}", "{EOS}"]
DELIMITERS = ["\n\n", "\n", " is ", "。", "🎉", "é", ".\n\n"]


@st.composite
def traces(draw):
    """Several segments: a prompt, then a response of random fragments (specials too), ending
    with nothing, the end-of-turn token, or it and scaffold; some response tokens untrained."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        body = "".join(draw(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=14)))
        end = draw(st.sampled_from(["", "{EOT}", "{EOT}\n", "{EOT}\n{EOS}", "\n"]))
        gaps = draw(st.lists(st.integers(0, 40), max_size=2))
        out.append((draw(st.integers(1, 3)), body + end, gaps))
    return out, draw(st.sampled_from(DELIMITERS))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=traces())
def test_random_traces_equal_the_reference(tokenizers_by_kind, kind, data):
    tok = _tok(tokenizers_by_kind, kind)
    segments, delim = data
    eot, eos = end_of_turn_token(tok), tok.eos_token or ""
    ids_all, labels_all, offsets, cases = [], [], [0], []
    for n_prompt, text, gaps in segments:
        r = tok(text.replace("{EOT}", eot).replace("{EOS}", eos), add_special_tokens=False).input_ids
        ids = tok("q", add_special_tokens=False).input_ids[:1] * n_prompt + r
        labels = [-100] * n_prompt + r
        for g in gaps:  # untrained tokens inside the response (another turn's prompt)
            if n_prompt + g < len(ids) - 1:
                labels[n_prompt + g] = -100
        ids_all += ids
        labels_all += labels
        offsets.append(len(ids_all))
        cases.append((ids, labels))
    arrays = [(np.array(ids_all, np.uint32), np.array(labels_all, np.int32), np.array(offsets, np.int64))]
    found = split_states(tok, arrays, delim)
    trained = [k for k, (_, lab) in enumerate(cases) if any(x != -100 for x in lab)]
    assert found.segment.tolist() == trained
    d = delim.encode()
    for i, k in enumerate(trained):
        ids, labels = cases[k]
        got = found.states[found.offsets[i]:found.offsets[i + 1]].tolist()
        want, terminal = ref_states(tok, ids, labels, d)
        assert (got, bool(found.terminal[i])) == (want, terminal)
        old = old_states(tok, ids, labels, d)
        if not terminal:  # no end-of-turn token: exactly today's states
            assert got == old
        else:  # today's states before the content's last token; then it, then the end-of-turn token
            resp = [t for t, x in enumerate(labels) if x != -100]
            eot = resp.index(got[-1])
            assert got[-1] <= old[-1] and ids[got[-1]] in tok.all_special_ids + [i for i, t in
                                                                                  tok.added_tokens_decoder.items() if t.special]
            if eot == 0:  # no content: s_0, then the end of the turn
                assert got == [old[0], got[-1]]
            else:
                assert got[-2] == resp[eot - 1] and [s for s in old if s < got[-2]] == got[:-2]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_token_bytes_equal_the_reference(tokenizers_by_kind, kind, data):
    tok = _tok(tokenizers_by_kind, kind)
    if data.draw(st.booleans()):  # arbitrary ids
        ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=20))
    else:
        text = "".join(data.draw(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=12)))
        ids = tok(text.replace("{EOT}", end_of_turn_token(tok)).replace("{EOS}", tok.eos_token or ""),
                  add_special_tokens=False).input_ids
    assert token_bytes(tok, ids) == ref_token_bytes(tok, ids)


# --------------------------------------------------------------------------- token bytes by hand
def test_token_bytes_are_exact_for_byte_level_bpe(tok_chatml):
    tok = tok_chatml
    text = "Unicode: café, naïve, 日本語, emoji 🎉🚀\n\nnext step\n\n\tand  spaces<|im_end|>"
    ids = tok(text, add_special_tokens=False).input_ids
    fast = token_bytes(tok, ids)
    assert b"".join(fast) == text.encode("utf-8")
    slow = ref_incremental_token_bytes(tok, ids)
    assert b"".join(slow) == text.encode("utf-8")
    # incremental decoding gives a split character to the token completing it: same step ends
    for delim in ("\n\n", "語", "🎉", "🚀", "é"):
        assert ref_step_ends(fast, delim.encode()) == ref_step_ends(slow, delim.encode())


def test_incremental_bytes_for_a_non_byte_level_tokenizer():
    fast = _metaspace()
    text = "step one is here and the answer is 4"
    ids = fast(text, add_special_tokens=False).input_ids
    pieces = token_bytes(fast, ids)  # not byte-level: incremental decoding
    assert b"".join(pieces).decode() == fast.decode(ids, clean_up_tokenization_spaces=False)
    assert pieces == ref_incremental_token_bytes(fast, ids)
