"""`irtrain.models`: where a model is, its tokenizer, whether the data fits it, its identity."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from irtrain.errors import ConfigError, ShardError, TokenizerError
from irtrain.models import DTYPES, check_tokenizer, load_tokenizer, model_hash, resolve_device, resolve_dtype, resolve_model, tokenizer_hash
from irtrain.shards import Segment, ShardSet, write_shard_set


def test_resolve_model_local_and_errors(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(ConfigError, match=r"^--model is required"):
        resolve_model("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^--ref-model .*empty has no config.json"):
        resolve_model(str(tmp_path / "empty"), flag="--ref-model")
    with pytest.raises(ConfigError, match=r"^--model \./nowhere: no such directory$"):
        resolve_model("./nowhere")
    # a hub-style name with no hub reachable: a one-line error naming the flag, not a traceback
    with pytest.raises(ConfigError, match=r"^--model irtrain-test/no-such-model: not a local directory and not loadable from the hub"):
        resolve_model("irtrain-test/no-such-model")


def test_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_dtype("auto", auto=torch.bfloat16) is torch.bfloat16
    assert {name: resolve_dtype(name, auto=torch.float64) for name in DTYPES} == {
        "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shards(tmp_path, name, ids, tok_hash):
    return ShardSet(_write(tmp_path / name, ids, tok_hash))


def _write(path, ids, tok_hash):
    write_shard_set(path, "chat", [[Segment(ids, [-100] + ids[1:], example=0)]], max_len=64, tokenizer_hash=tok_hash)
    return path


def test_tokenizer_hash_and_check(tiny_model_dir, tokenizer_dirs, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    h = tokenizer_hash(tok)
    assert len(h) == 64 and h == tokenizer_hash(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    other = tokenizer_hash(AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama3"])))
    assert other != h
    good = _shards(tmp_path, "good", [1, 2, 3], h)
    assert check_tokenizer(tiny_model_dir, tok, [good]) == h
    assert check_tokenizer(tiny_model_dir, tok, [_shards(tmp_path, "unknown", [1, 2, 3], "")]) == h  # no hash recorded: ids checked only
    with pytest.raises(TokenizerError, match=r"was made with another tokenizer than the model's"):
        check_tokenizer(tiny_model_dir, tok, [good, _shards(tmp_path, "other", [1, 2, 3], other)])
    with pytest.raises(TokenizerError, match=rf"token id {len(tok)} is outside the model tokenizer's vocabulary \({len(tok)}\)"):
        check_tokenizer(tiny_model_dir, tok, [_shards(tmp_path, "big", [1, len(tok)], "")])


def test_load_tokenizer_error_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"cannot load the model's tokenizer") as e:
        load_tokenizer(tmp_path / "m")
    assert "\n" not in str(e.value)


def test_model_hash_changes_with_weights_not_with_checkpoints(tiny_model_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    assert model_hash(copy) == model_hash(tiny_model_dir)
    shutil.copytree(tiny_model_dir, copy / "checkpoint-0000001")  # a run inside the model dir does not change it
    assert model_hash(copy) == model_hash(tiny_model_dir)
    m = AutoModelForCausalLM.from_pretrained(str(copy))
    with torch.no_grad():
        next(m.parameters()).add_(1e-3)
    m.save_pretrained(copy)
    assert model_hash(copy) != model_hash(tiny_model_dir)
    (tmp_path / "none").mkdir()
    with pytest.raises(ShardError, match="no model weights"):
        model_hash(tmp_path / "none")


def test_token_ids_beyond_the_models_embedding_are_refused(tiny_model_dir, tmp_path):
    """A model whose embedding is smaller than its tokenizer (config.json vocab_size): ids past
    the embedding are refused before the model is loaded (it would be an IndexError mid-run)."""
    import json

    small = tmp_path / "small-vocab"
    shutil.copytree(tiny_model_dir, small)
    cfg = json.loads((small / "config.json").read_text())
    tok = load_tokenizer(small)
    cfg["vocab_size"] = len(tok) - 10
    (small / "config.json").write_text(json.dumps(cfg))
    ok = _shards(tmp_path, "ok", [1, 2, len(tok) - 11], "")
    assert check_tokenizer(small, tok, [ok]) == tokenizer_hash(tok)
    past = _shards(tmp_path, "past", [1, 2, len(tok) - 10], "")
    with pytest.raises(TokenizerError, match=rf"token id {len(tok) - 10} is outside the model's vocabulary \(.*config.json vocab_size\) \({len(tok) - 10}\)"):
        check_tokenizer(small, tok, [past])
