import json

import numpy as np
import pytest

from irtrain.errors import ShardError
from irtrain.shards import Segment, ShardSet, iter_documents, write_shard_set


def _pref_rows():
    return [
        [Segment([1, 2, 3], [1, 2, 3], 0, 0), Segment([1, 2, 4], [-100, 2, 4], 0, 1)],
        [Segment([5, 6], [5, 6], 1, 0), Segment([5, 7, 8], [-100, -100, 8], 1, 1)],
    ]


def test_roundtrip_preference(tmp_path):
    write_shard_set(tmp_path / "s", "preference", _pref_rows(), max_len=8, shard_rows=1)
    ss = ShardSet(tmp_path / "s")
    ss.verify()
    assert len(ss) == 2 and len(ss.shards) == 2
    row = ss.row(1)
    assert row.input_ids.tolist() == [5, 6, 5, 7, 8]
    assert row.labels.tolist() == [-100, 6, -100, -100, 8]  # first label of a segment is always -100
    assert row.position_ids.tolist() == [0, 1, 0, 1, 2]
    assert row.cu_seqlens.tolist() == [0, 2, 5]
    docs = list(iter_documents(tmp_path / "s"))
    assert [d["id"] for d in docs] == [0, 1]
    assert docs[0]["rejected"] == {"input_ids": [1, 2, 4], "labels": [-100, 2, 4]}


def test_ranked_and_unpaired_documents(tmp_path):
    ranked = [[Segment([1, 2], [1, 2], 7, 1, 0.5), Segment([1, 3], [1, 3], 7, 0, 0.9)]]
    write_shard_set(tmp_path / "r", "ranked", ranked, max_len=8)
    (doc,) = iter_documents(tmp_path / "r")
    assert [c["score"] for c in doc["candidates"]] == pytest.approx([0.9, 0.5])
    write_shard_set(tmp_path / "u", "unpaired", [[Segment([1, 2], [1, 2], 0, 0, 0.0)]], max_len=8)
    (doc,) = iter_documents(tmp_path / "u")
    assert doc["label"] is False


def test_corruption_and_missing_manifest_are_refused(tmp_path):
    write_shard_set(tmp_path / "s", "preference", _pref_rows(), max_len=8)
    with open(tmp_path / "s" / "shard-00000" / "labels.bin", "r+b") as f:
        f.write(b"\x07")
    with pytest.raises(ShardError, match="checksum"):
        ShardSet(tmp_path / "s").verify()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardSet(tmp_path / "empty")
    with pytest.raises(ShardError, match="does not exist"):
        ShardSet(tmp_path / "nope")


def test_writer_refuses_existing_output_and_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(ShardError):
        write_shard_set(tmp_path / "exists", "chat", [], max_len=8)
    with pytest.raises(ValueError):
        write_shard_set(tmp_path / "bad", "chat", [[Segment([1, 2], [1], 0)]], max_len=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_manifest_sizes_checked(tmp_path):
    write_shard_set(tmp_path / "s", "chat", [[Segment([1, 2, 3], [1, 2, 3], 0)]], max_len=8)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["shards"][0]["tokens"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="do not match"):
        ShardSet(tmp_path / "s")
    assert np.dtype("<u4").itemsize == 4
