"""irtrain.labels: display labels of models (run@step) and --labels."""
from __future__ import annotations

import pytest

from irtrain.errors import ConfigError
from irtrain.labels import assign_labels, default_label, default_labels, parse_labels


def test_default_label_is_run_at_step():
    assert default_label("sft-checkpoint-0000200") == "sft@200"
    assert default_label("dpo-checkpoint-0000200") == "dpo@200"
    assert default_label("runs-dpo-lora-checkpoint-0001500") == "runs-dpo-lora@1500"
    assert default_label("sft-checkpoint-0000000") == "sft@0"
    assert default_label("sft-checkpoint-0000200-2") == "sft@200-2"  # the same directory given twice
    assert default_label("checkpoint-0000012") == "@12"
    assert default_label("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert default_label("my-checkpoint-notes") == "my-checkpoint-notes"
    # two names that would meet keep their full names
    assert default_labels(["a-checkpoint-0000002", "a-checkpoint-2", "b-checkpoint-0000002"]) == [
        "a-checkpoint-0000002", "a-checkpoint-2", "b@2"]


def test_labels_in_order_and_by_path(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "sft").mkdir()
    entries = [("base", [str(tmp_path / "base")]), ("sft-checkpoint-0000200", [str(tmp_path / "sft")])]
    assert assign_labels([], entries, what="model") == ["base", "sft@200"]
    assert assign_labels(["B", "S"], entries, what="model") == ["B", "S"]
    assert assign_labels(["B,S"], entries, what="model") == ["B", "S"]  # one comma-separated value
    assert parse_labels(["a, b", "c"]) == ["a", "b", "c"]
    # label=path: the path resolved (relative or absolute), or the table's name; others keep their default
    assert assign_labels([f"S={tmp_path}/./sft"], entries, what="model") == ["base", "S"]
    assert assign_labels(["S=sft-checkpoint-0000200"], entries, what="model") == ["base", "S"]
    # labels a score table recorded come first; two that meet give way to the names
    assert assign_labels([], entries, what="model", recorded=["u", None]) == ["u", "sft@200"]
    assert assign_labels([], entries, what="model", recorded=["u", "u"]) == ["base", "sft-checkpoint-0000200"]


@pytest.mark.parametrize("given, message", [
    (["a"], r"--labels: 1 label\(s\) for 2 model\(s\) \(base, sft-checkpoint-0000200\)"),
    (["a", "b", "c"], "3 label"),
    (["a=base", "b"], "either one label per model .* or label=path pairs, not both"),
    (["a=nowhere"], "--labels a=nowhere: nowhere is none of the models"),
    (["=base"], "empty label"),
    (["same", "same"], "the label 'same' names two models"),
    (["sft@200=base"], "the label 'sft@200' names two models"),  # clashes with the other's default
])
def test_bad_labels_are_one_line_errors(tmp_path, given, message):
    entries = [("base", [str(tmp_path / "b")]), ("sft-checkpoint-0000200", [str(tmp_path / "s")])]
    with pytest.raises(ConfigError, match=message):
        assign_labels(given, entries, what="model")
