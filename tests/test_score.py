"""irtrain.score: values and log-probs against transformers, step splitting, rewards, inputs."""
from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from irtrain.config import ScoreConfig
from irtrain.errors import ConfigError, DataError
from irtrain.score import read_table_meta, run
from irtrain.shards import Segment, write_shard_set

DELIM = "\n\n"


def responses(n: int) -> list[tuple[str, str]]:
    return [(f"what is {i} plus {i * 3}?",
             f"Let's think.\n\nStep 1: {i} + {i * 3} = {i * 4}.\n\nThe answer is {i * 4}.") for i in range(n)]


def encode(tok, prompt: str, response: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids) with the chat template; the response ends with <|im_end|>."""
    p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    p_ids = tok(p, add_special_tokens=False).input_ids
    r_ids = tok(response + "<|im_end|>", add_special_tokens=False).input_ids
    return p_ids, r_ids, [-100] * len(p_ids) + r_ids


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ref_model_dir(tokenizer_dirs, tmp_path_factory):
    from irtrain.toy import tiny_llama

    return tiny_llama(tokenizer_dirs["chatml"], tmp_path_factory.mktemp("ref"), seed=1)


@pytest.fixture(scope="module")
def chat_shards(tok, tmp_path_factory):
    """Packed shards: rows of 1-3 documents, so that packing across documents is exercised."""
    docs = [encode(tok, p, r) for p, r in responses(7)]
    segs = [Segment(input_ids=p + r, labels=lab, example=i) for i, (p, r, lab) in enumerate(docs)]
    rows = [segs[0:3], segs[3:4], segs[4:6], segs[6:7]]
    out = tmp_path_factory.mktemp("chat") / "shards"
    write_shard_set(out, "chat", rows, max_len=512)
    return out, docs


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


# --------------------------------------------------------------------------- values vs transformers
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_value_is_logsumexp_of_transformers_logits_at_the_states(tmp_path, tiny_model_dir, tok, model, chat_shards, tau):
    shards, docs = chat_shards
    summary = run(ScoreConfig(data=str(shards), model=str(tiny_model_dir), out=str(tmp_path), value_temperature=tau,
                              batch_tokens=150))  # several forwards, several documents per forward
    df = pl.read_parquet(tmp_path / f"{tiny_model_dir.name}.parquet")
    assert summary["tables"] == {tiny_model_dir.name: f"{tiny_model_dir.name}.parquet"}
    assert df.height == 5 * len(docs)  # s_0, 3 steps, the end-of-turn token
    for i, (p_ids, r_ids, _) in enumerate(docs):
        rows = df.filter(pl.col("example_id") == i).sort("step")
        ids = p_ids + r_ids
        logits = full_logits(model, ids)  # the document alone, no packing
        pos = np.array(rows["position"].to_list())
        want = tau * torch.logsumexp(logits[pos] / tau, dim=-1).numpy()
        np.testing.assert_allclose(rows["value"].to_numpy(), want, rtol=0, atol=2e-5)
        # s_0 is the last prompt position; the last step ends at the last content token; the
        # terminal state is <|im_end|>, the response's last token here
        assert pos[0] == len(p_ids) - 1 and pos[-2] == len(ids) - 2 and pos[-1] == len(ids) - 1
        assert rows["terminal"].to_list() == [False] * 4 + [True]
        assert rows["value_s0"].to_list() == [rows["value"][0]] * 5
        # the state after step k is the token that completes step k's text (its delimiter included)
        text = tok.decode(r_ids)
        cut = [m + len(DELIM) for m in (text.index(DELIM), text.index(DELIM, text.index(DELIM) + 1))]
        for k, c in enumerate(cut, start=1):
            e = int(pos[k]) - len(p_ids)
            assert len(tok.decode(r_ids[:e])) < c <= len(tok.decode(r_ids[: e + 1]))
        # log pi(y|x) = sum over response tokens of log_softmax(l(s_t))[a_t]
        lp = torch.log_softmax(logits, -1)
        logp = sum(float(lp[t - 1, ids[t]]) for t in range(len(p_ids), len(ids)))
        assert rows["logp"][0] == pytest.approx(logp, abs=1e-4)
        assert rows["num_tokens"][0] == len(r_ids)
        assert rows["logp_mean"][0] == pytest.approx(logp / len(r_ids), abs=1e-5)
        assert rows["num_steps"].to_list() == [3] * 5
    meta = read_table_meta(tmp_path / f"{tiny_model_dir.name}.parquet")
    assert meta["kind"] == "irtrain-score" and meta["step_delimiter"] == DELIM and meta["value_temperature"] == tau
    assert meta["data_hash"] == json.loads((shards / "manifest.json").read_text())["content_hash"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["data"]["content_hash"] == meta["data_hash"]
    assert on_disk["models"][tiny_model_dir.name]["value/s0"] == pytest.approx(float(df.filter(pl.col("step") == 0)["value"].mean()))


# --------------------------------------------------------------------------- rewards and pairs
def test_reference_rewards_and_dpo_pair_metrics(tmp_path, tiny_model_dir, ref_model_dir, tok, model):
    from transformers import AutoModelForCausalLM

    pairs = []
    for i in range(3):
        p, good, _ = encode(tok, f"what is {i} plus {i}?", f"Step 1: ok.\n\nThe answer is {2 * i}.")
        _, bad, _ = encode(tok, f"what is {i} plus {i}?", f"The answer is {2 * i + 1}.")
        pairs.append((p, good, bad))
    rows = [[Segment(p + c, [-100] * len(p) + c, example=i, part=0), Segment(p + r, [-100] * len(p) + r, example=i, part=1)]
            for i, (p, c, r) in enumerate(pairs)]
    shards = tmp_path / "pref"
    write_shard_set(shards, "preference", rows, max_len=256)
    beta = 0.1
    run(ScoreConfig(data=str(shards), model=str(tiny_model_dir), ref_model=str(ref_model_dir), beta=beta, out=str(tmp_path / "o")))
    df = pl.read_parquet(tmp_path / "o" / f"{tiny_model_dir.name}.parquet").filter(pl.col("step") == 0).sort("example_id", "part")
    ref = AutoModelForCausalLM.from_pretrained(str(ref_model_dir), dtype=torch.float32).eval()

    def seq_logp(m, p, r):
        lp = torch.log_softmax(full_logits(m, p + r), -1)
        return sum(float(lp[len(p) + t - 1, r[t]]) for t in range(len(r)))

    for i, (p, c, r) in enumerate(pairs):
        got = df.filter(pl.col("example_id") == i)
        want_ref = [seq_logp(ref, p, c), seq_logp(ref, p, r)]
        np.testing.assert_allclose(got["ref_logp"].to_numpy(), want_ref, atol=1e-4)
        rewards = beta * (got["logp"].to_numpy() - got["ref_logp"].to_numpy())
        np.testing.assert_allclose(got["reward"].to_numpy(), rewards, atol=1e-12)
        m = rewards[0] - rewards[1]
        assert got["margin"].to_list() == pytest.approx([m, m], abs=1e-12)
        assert got["dpo_loss"][0] == pytest.approx(math.log1p(math.exp(-m)), abs=1e-12)  # -log sigmoid(m)
        assert got["dpo_accuracy"][0] == float(m > 0)


# --------------------------------------------------------------------------- inputs
def test_raw_chat_file_is_prepared_then_scored(tmp_path, tiny_model_dir):
    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for p, r in responses(4):
            f.write(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}) + "\n")
    out = tmp_path / "out"
    summary = run(ScoreConfig(data=str(data), model=str(tiny_model_dir), out=str(out)))
    assert (out / "prepared" / "manifest.json").is_file()
    assert summary["data"]["format"] == "chat" and summary["data"]["segments"] == 4
    df = pl.read_parquet(out / f"{tiny_model_dir.name}.parquet")
    assert df["num_steps"].unique().to_list() == [3]
    assert sorted(df["example_id"].unique().to_list()) == [0, 1, 2, 3]
    # ChatML's turn ends "<|im_end|>\n", both trained: <|im_end|> is the terminal state, the newline no state
    from transformers import AutoTokenizer

    from irtrain.shards import ShardSet

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    shards = ShardSet(out / "prepared")
    for r in range(len(shards)):
        row = shards.row(r)
        ids, labels, ex = row.input_ids.tolist(), row.labels.tolist(), int(row.seg_example[0])
        assert tok.convert_ids_to_tokens(ids[-2:]) == ["<|im_end|>", "Ċ"] and labels[-2:] == ids[-2:]
        rows = df.filter(pl.col("example_id") == ex).sort("step")
        assert rows["position"][-1] == len(ids) - 2 and rows["terminal"].to_list() == [False] * 4 + [True]


def test_rank_matches_raw_and_packed_scorings_of_the_same_traces(tmp_path, tiny_model_dir, ref_model_dir):
    """The same traces scored from the raw file (prepared unpacked) and from packed shards of
    it have the same states hash, so `irtrain rank` compares them (τ = 1 for one model); other
    traces are refused by name."""
    from irtrain.config import PrepareConfig, RankConfig
    from irtrain.prepare import run as prepare
    from irtrain.rank import run as rank

    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for p, r in responses(9):
            f.write(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}) + "\n")
    packed = tmp_path / "packed"
    prepare(PrepareConfig(inputs=[str(data)], out=str(packed), tokenizer=str(tiny_model_dir), mask="last", max_len=512))
    assert json.loads((packed / "manifest.json").read_text())["report"]["rows"] < 9  # really packed
    raw = run(ScoreConfig(data=str(data), model=str(tiny_model_dir), out=str(tmp_path / "s-raw")))
    pk = run(ScoreConfig(data=str(packed), model=str(ref_model_dir), out=str(tmp_path / "s-packed")))
    assert raw["data"]["content_hash"] != pk["data"]["content_hash"]  # other shards ...
    assert raw["data"]["states_hash"] == pk["data"]["states_hash"]  # ... the same states
    summary = rank(RankConfig(tables=[str(tmp_path / "s-raw"), str(tmp_path / "s-packed")], out=str(tmp_path / "rank")))
    assert summary["states"] == raw["data"]["states"]
    # other traces: refused, naming what differs
    with data.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "1.\n\n2."}]}) + "\n")
    run(ScoreConfig(data=str(data), model=str(tiny_model_dir), out=str(tmp_path / "s-more")))
    with pytest.raises(DataError, match="different states"):
        rank(RankConfig(tables=[str(tmp_path / "s-more"), str(tmp_path / "s-packed")], out=str(tmp_path / "rank2"), intersect=True))


def test_checkpoints_directory_scores_every_model_in_order(tmp_path, tiny_model_dir, chat_shards):
    import shutil

    ck = tmp_path / "run"
    for step in (20, 3):
        shutil.copytree(tiny_model_dir, ck / f"checkpoint-{step:07d}")
    (ck / "logs").mkdir()  # not a model: ignored
    summary = run(ScoreConfig(data=str(chat_shards[0]), checkpoints=str(ck), out=str(tmp_path / "s")))
    # named by run and checkpoint (irtrain.score.inputs.table_names), in step order
    assert list(summary["tables"]) == ["run-checkpoint-0000003", "run-checkpoint-0000020"]
    a, b = (pl.read_parquet(tmp_path / "s" / f) for f in summary["tables"].values())
    assert a.equals(b)  # the same weights give the same table


def test_bad_input_is_a_clear_error(tmp_path, tiny_model_dir, chat_shards):
    shards = str(chat_shards[0])
    with pytest.raises(ConfigError, match="no model"):
        run(ScoreConfig(data=shards, out=str(tmp_path)))
    with pytest.raises(ConfigError, match="no model in it"):
        run(ScoreConfig(data=shards, checkpoints=str(tmp_path), out=str(tmp_path / "o")))
    with pytest.raises(DataError, match="no such file"):
        run(ScoreConfig(data=str(tmp_path / "nope.jsonl"), model=str(tiny_model_dir), out=str(tmp_path / "o")))
    with pytest.raises(DataError, match="more than --max-len 16"):
        run(ScoreConfig(data=shards, model=str(tiny_model_dir), out=str(tmp_path / "o"), max_len=16))
    with pytest.raises(ConfigError, match="value.temperature"):
        run(ScoreConfig(data=shards, model=str(tiny_model_dir), out=str(tmp_path / "o"), value_temperature=0))
