"""Reference log-probs cached beside the shards (irtrain/train/reference.py): values,
alignment with a training batch, reuse, and refusal of a cache made for something else."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from irtrain.config import SFTConfig
from irtrain.errors import ReferenceMismatchError
from irtrain.losses import response_token_stats
from irtrain.shards import ShardSet
from irtrain.train.batching import PackedData
from irtrain.train.packed import packed_forward
from irtrain.train.reference import ReferenceKey, ReferenceLogps, batch_reference, default_path, ensure_reference, model_hash
from irtrain.train.strategy import Strategy

from test_train_common import make_sft_shards, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    shards = ShardSet(make_sft_shards(tok, tmp_path_factory.mktemp("ref") / "data", n=24, max_len=128))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    strategy = Strategy(SFTConfig(device="cpu"))
    key = ReferenceKey(model_hash(tiny_model_dir), shards.tokenizer_hash, shards.content_hash)
    return shards, model, strategy, key


def test_values_and_alignment(setup):
    shards, model, strategy, key = setup
    ref = ensure_reference(shards, key, model_fn=lambda: model, strategy=strategy, token_budget=200)
    assert ref.path == default_path(shards, key) and ref.path.parent == shards.path / "reference"
    assert ref.num_rows == len(shards) and len(ref.seg_logps) == shards.num_segments
    # each row alone, computed directly
    with torch.no_grad():
        for i in range(len(shards)):
            row = shards.row(i)
            ids = torch.as_tensor(np.asarray(row.input_ids, dtype=np.int64))[None]
            labels = torch.as_tensor(np.asarray(row.labels, dtype=np.int64))[None]
            pos = torch.as_tensor(np.asarray(row.position_ids, dtype=np.int64))[None]
            stats = response_token_stats(model(input_ids=ids, position_ids=pos, use_cache=False).logits, labels)
            np.testing.assert_allclose(ref.row_tokens(i), stats.logps.numpy(), rtol=1e-5, atol=1e-5)
            sums, counts = ref.row_segments(i)
            assert counts.sum() == len(stats.logps)
            np.testing.assert_allclose(sums.sum(), float(stats.logps.double().sum()), rtol=1e-5)
    # aligned with a training micro-batch (rows in plan order, concatenated)
    data = PackedData([shards])
    batch = data.batch([3, 0, 5])
    tok_ref, seg_ref, seg_n = batch_reference([ref], batch)
    with torch.no_grad():
        stats = response_token_stats(packed_forward(model, batch), batch.labels)
    torch.testing.assert_close(tok_ref, stats.logps, rtol=1e-5, atol=1e-5)
    assert seg_ref.shape == (batch.num_segments,) and int(seg_n.sum()) == len(stats.logps)


def test_reused_and_refused(setup, tmp_path):
    shards, model, strategy, key = setup
    ref = ensure_reference(shards, key, model_fn=lambda: model, strategy=strategy, token_budget=200)
    mtime = ref.path.stat().st_mtime_ns

    def no_model():
        raise AssertionError("the cache should have been reused")

    again = ensure_reference(shards, key, model_fn=no_model, strategy=strategy, token_budget=200)
    assert again.path.stat().st_mtime_ns == mtime
    # a file made for another model / tokenizer / data is refused with a clear error
    for other in (ReferenceKey("0" * 64, key.tokenizer_hash, key.data_hash),
                  ReferenceKey(key.model_hash, "1" * 64, key.data_hash),
                  ReferenceKey(key.model_hash, key.tokenizer_hash, "2" * 64)):
        with pytest.raises(ReferenceMismatchError, match="made for another"):
            ReferenceLogps.load(ref.path, expect=other)
        # ... also when it sits where the other key's cache would be
        target = default_path(shards, other, tmp_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ref.path, target)
        with pytest.raises(ReferenceMismatchError):
            ensure_reference(shards, other, model_fn=no_model, strategy=strategy, token_budget=200, reference_dir=tmp_path)
    with pytest.raises(ReferenceMismatchError, match="rows"):
        ReferenceLogps.load(ref.path, expect=key, shards=ShardSet(make_other(tmp_path, shards)))


def make_other(tmp_path: Path, shards: ShardSet) -> Path:
    """A shard set with fewer rows (to check the shape guard)."""
    from irtrain.shards import Segment, write_shard_set

    row = shards.row(0)
    seg = Segment(list(map(int, row.input_ids)), list(map(int, row.labels)), example=0)
    return write_shard_set(tmp_path / "one-row", "chat", [[seg]], max_len=128) and tmp_path / "one-row"

