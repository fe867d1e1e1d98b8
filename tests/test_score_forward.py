"""irtrain.score.forward: the packed attention score loads by default gives the values and
log-probs of transformers' own SDPA path (the dense block-diagonal mask), on packed rows
of several documents; a truncated or corrupted checkpoint is a one-line error naming the file."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import ScoreConfig
from irtrain.errors import IrtrainIOError
from irtrain.score import load_model, read_segments, run, score_model, unescape
from irtrain.shards import Segment, ShardSet, write_shard_set
from irtrain.train.packed import VARLEN

from test_score import encode, responses


def _Quiet():  # noqa: N802 - a console that prints nothing
    from rich.console import Console

    return Console(quiet=True)


@pytest.fixture(scope="module")
def packed_shards(tiny_model_dir, tmp_path_factory):
    """Rows of 1-4 documents, some without a step boundary, so that packing is exercised."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    docs = [encode(tok, p, r) for p, r in responses(9)] + [encode(tok, "say hi", "hi there")]
    segs = [Segment(input_ids=p + r, labels=lab, example=i) for i, (p, r, lab) in enumerate(docs)]
    out = tmp_path_factory.mktemp("packed") / "shards"
    write_shard_set(out, "chat", [segs[0:4], segs[4:5], segs[5:8], segs[8:10]], max_len=512)
    return out, tok


def test_default_attention_is_irtrain_packed_and_equals_transformers_sdpa(tiny_model_dir, packed_shards):
    shards_dir, tok = packed_shards
    shards = ShardSet(shards_dir)
    segments = read_segments(shards, tok, unescape("\\n\\n"), max_len=512)
    cfg = ScoreConfig(data=str(shards_dir), model=str(tiny_model_dir), out="unused", batch_tokens=200)
    cpu = torch.device("cpu")
    model = load_model(tiny_model_dir, device=cpu, dtype=torch.float32, trust_remote_code=False)
    assert model.config._attn_implementation == VARLEN  # the CPU default: per-document SDPA, no [N, N] mask
    got = {impl: score_model(tiny_model_dir, shards, segments, cfg=cfg, device=cpu, dtype=torch.float32, console=_Quiet(),
                             label="t", attn_implementation=impl)
           for impl in (None, "sdpa", "eager")}
    ref = got["sdpa"]  # transformers' block-diagonal mask over the packed row
    for impl in (None, "eager"):
        assert got[impl].done.all() and got[impl].tokens == ref.tokens
        np.testing.assert_allclose(got[impl].logp, ref.logp, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got[impl].num_tokens, ref.num_tokens)
        for a, b in zip(got[impl].values, ref.values):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_score_run_matches_the_sdpa_path_table(tmp_path, tiny_model_dir, packed_shards):
    """Through `run` (default attention) against a table built on the SDPA path, column by column."""
    shards_dir, tok = packed_shards
    summary = run(ScoreConfig(data=str(shards_dir), model=str(tiny_model_dir), out=str(tmp_path / "o"), batch_tokens=200))
    name = next(iter(summary["tables"]))
    df = pl.read_parquet(tmp_path / "o" / f"{name}.parquet")
    shards = ShardSet(shards_dir)
    segments = read_segments(shards, tok, "\n\n", max_len=512)
    cfg = ScoreConfig(data=str(shards_dir), model=str(tiny_model_dir), out="unused", batch_tokens=200)
    sdpa = score_model(tiny_model_dir, shards, segments, cfg=cfg, device=torch.device("cpu"), dtype=torch.float32,
                       console=_Quiet(), label="t", attn_implementation="sdpa")
    np.testing.assert_allclose(df["value"].to_numpy(), np.concatenate(sdpa.values), rtol=0, atol=1e-5)
    first = df.filter(pl.col("step") == 0)
    np.testing.assert_allclose(first["logp"].to_numpy(), sdpa.logp, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("damage", ["truncate", "header", "extend"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, tiny_model_dir, packed_shards, damage):
    import shutil

    ck = tmp_path / "run" / "checkpoint-0000002"
    shutil.copytree(tiny_model_dir, ck)
    shutil.copytree(tiny_model_dir, tmp_path / "run" / "checkpoint-0000001")
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":  # a copy cut short
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header":  # garbage where the header is
        weights.write_bytes(b"\xff" * 64 + data[64:])
    else:  # bytes past the described tensors
        weights.write_bytes(data + b"\0" * 16)
    out = tmp_path / "scores"
    with pytest.raises(IrtrainIOError, match="model.safetensors: (truncated|corrupted) model weights"):
        run(ScoreConfig(data=str(packed_shards[0]), checkpoints=str(tmp_path / "run"), out=str(out)))
    assert not out.exists()  # refused before anything is loaded or written
    res = CliRunner().invoke(app, ["score", str(packed_shards[0]), "--model", str(ck), "--out", str(out)])
    assert res.exit_code == 1
    assert str(weights) in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1
