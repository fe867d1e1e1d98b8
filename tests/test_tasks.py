"""The generated arithmetic task: determinism, disjoint splits, planted errors, the exact checker."""
from __future__ import annotations

import random

import pytest

from irtrain.tasks import (
    ERROR_KINDS,
    PLANTED_KINDS,
    STEP_DELIMITER,
    Problem,
    TaskSpec,
    check_answer,
    check_steps,
    corrupt,
    generate_problems,
    make_task,
    parse_answer,
    problem_from_prompt,
    read_jsonl,
    write_task,
)


def test_problem_rendering_by_hand():
    p = Problem(7, (("+", 5), ("-", 3), ("+", 4)))
    assert p.prompt == "Compute: 7 + 5 - 3 + 4"
    assert p.values() == [12, 9, 13]
    assert p.answer == 13
    assert p.solution() == "7 + 5 = 12\n\n12 - 3 = 9\n\n9 + 4 = 13\n\nAnswer: 13"
    assert p.messages() == [
        {"role": "user", "content": "Compute: 7 + 5 - 3 + 4"},
        {"role": "assistant", "content": p.solution()},
    ]
    assert problem_from_prompt(p.prompt) == p


def test_deterministic_in_seed():
    a = make_task(50, 30, 20, seed=3)
    b = make_task(50, 30, 20, seed=3)
    c = make_task(50, 30, 20, seed=4)
    assert a.sft_rows() == b.sft_rows() and a.pref_rows() == b.pref_rows() and a.heldout_rows() == b.heldout_rows()
    assert a.heldout_pref_rows() == b.heldout_pref_rows()
    assert a.sft_rows() != c.sft_rows()


def test_splits_are_disjoint_and_distinct():
    t = make_task(400, 200, 100, seed=0)
    sft, pref, held = set(t.sft), set(t.pref), set(t.heldout)
    assert len(sft) == 400 and len(pref) == 200 and len(held) == 100
    assert not (sft & pref) and not (sft & held) and not (pref & held)


def test_values_stay_in_range():
    spec = TaskSpec(min_ops=2, max_ops=4, max_operand=9, max_value=29)
    for p in generate_problems(2000, seed=1, spec=spec):
        assert 2 <= len(p.ops) <= 4
        assert 1 <= p.start <= 9
        assert all(0 <= v <= 29 for v in p.values())
        assert all(1 <= b <= 9 for _, b in p.ops)


def test_checker_accepts_the_solution_and_variants():
    p = Problem(3, (("+", 5), ("-", 8)))
    assert check_answer(p, p.solution()) and check_steps(p, p.solution())
    assert check_answer(p, "whatever\n\nAnswer: 0")  # final answer only
    assert not check_steps(p, "whatever\n\nAnswer: 0")  # steps must be there and right
    assert check_answer(p, p.solution() + "  \n")
    assert not check_answer(p, "Answer: 1")
    assert not check_answer(p, "Answer: 0 and more")
    assert not check_answer(p, "")
    assert parse_answer("x\n\nAnswer: -4") == -4
    assert parse_answer("no answer") is None
    # a right answer reached through a wrong step fails the strict check
    assert not check_steps(p, "3 + 5 = 9\n\n8 - 8 = 0\n\nAnswer: 0")
    # a step that does not follow the problem fails too
    assert not check_steps(p, "3 + 4 = 7\n\n7 - 7 = 0\n\nAnswer: 0")


@pytest.mark.parametrize("kind", PLANTED_KINDS)
def test_planted_errors_are_wrong_and_minimal(kind):
    rng = random.Random(0)
    for p in generate_problems(500, seed=2):
        wrong, k = corrupt(p, rng, kind)
        assert k == kind
        assert wrong != p.solution()
        assert not check_steps(p, wrong)
        assert check_answer(p, wrong) == (kind == "slip")  # a slip keeps the right final answer
        good_steps, bad_steps = p.solution().split(STEP_DELIMITER), wrong.split(STEP_DELIMITER)
        assert len(good_steps) == len(bad_steps)  # same shape; only numbers differ
        if kind == "final":
            assert good_steps[:-1] == bad_steps[:-1]
        elif kind == "slip":  # exactly one step's result differs
            diff = [i for i, (g, b) in enumerate(zip(good_steps, bad_steps)) if g != b]
            assert len(diff) == 1 and diff[0] < len(p.ops)
            assert good_steps[diff[0]].partition(" = ")[0] == bad_steps[diff[0]].partition(" = ")[0]
        else:
            # the first differing step is an arithmetic error; later steps follow from it
            first = next(i for i, (g, b) in enumerate(zip(good_steps, bad_steps)) if g != b)
            assert first < len(p.ops)
            a, _, rest = bad_steps[first].partition(" = ")
            assert a == good_steps[first].partition(" = ")[0]


def test_preference_rows_share_the_prompt():
    t = make_task(10, 40, 10, seed=0)
    kinds = set()
    for row in t.pref_rows():
        assert row["chosen"][0] == row["rejected"][0] == {"role": "user", "content": row["prompt"]}
        p = problem_from_prompt(row["prompt"])
        assert check_steps(p, row["chosen"][1]["content"])
        assert not check_steps(p, row["rejected"][1]["content"])
        kinds.add(row["error"])
    assert kinds == set(ERROR_KINDS)


def test_error_kinds_can_be_chosen():
    t = make_task(10, 30, 10, seed=0, error_kinds=("final",))
    assert {r["error"] for r in t.pref_rows() + t.heldout_pref_rows()} == {"final"}
    with pytest.raises(ValueError):
        make_task(10, 10, 10, error_kinds=("nope",))


def test_write_task(tmp_path):
    t = make_task(20, 10, 5, seed=1)
    paths = write_task(t, tmp_path)
    assert set(paths) == {"sft", "pref", "heldout", "heldout_pref"}
    assert read_jsonl(paths["sft"]) == t.sft_rows()
    assert read_jsonl(paths["pref"]) == t.pref_rows()
    held = read_jsonl(paths["heldout"])
    assert [r["answer"] for r in held] == [p.answer for p in t.heldout]
    assert len(read_jsonl(paths["heldout_pref"])) == 5


def test_sloppy_demonstrator():
    from irtrain.tasks import buggy_subtract

    assert buggy_subtract(13, 5) == 12 and buggy_subtract(21, 4) == 23 and buggy_subtract(20, 7) == 27
    assert buggy_subtract(18, 5) == 13 and buggy_subtract(7, 3) == 4  # no borrow: right
    p = Problem(8, (("+", 5), ("-", 6), ("+", 2)))  # 13 - 6 needs a borrow
    assert p.has_borrow and p.buggy_values() == [13, 13, 15] and p.values() == [13, 7, 9]
    assert p.buggy_solution() == "8 + 5 = 13\n\n13 - 6 = 13\n\n13 + 2 = 15\n\nAnswer: 15"
    q = Problem(8, (("+", 5), ("-", 2)))
    assert not q.has_borrow and q.buggy_solution() == q.solution()
    rng = random.Random(0)
    assert preference_pair_kind(p, rng) == "bug" and preference_pair_kind(q, rng) != "bug"


def preference_pair_kind(p, rng):
    from irtrain.tasks import preference_example

    row = preference_example(p, rng)
    assert not check_steps(p, row["rejected"][1]["content"])
    return row["error"]


def test_demo_bug_rate():
    clean = make_task(400, 10, 10, seed=0)
    assert all(check_steps(p, r["messages"][1]["content"]) for p, r in zip(clean.sft, clean.sft_rows()))
    noisy = make_task(400, 10, 10, seed=0, demo_bug_rate=0.5)
    wrong = [not check_steps(p, r["messages"][1]["content"]) for p, r in zip(noisy.sft, noisy.sft_rows())]
    borrow = [p.has_borrow for p in noisy.sft]
    assert not any(w and not b for w, b in zip(wrong, borrow))  # only borrow problems can be wrong
    frac = sum(wrong) / sum(borrow)
    assert 0.35 < frac < 0.65, frac
    assert noisy.sft_rows() == make_task(400, 10, 10, seed=0, demo_bug_rate=0.5).sft_rows()
