"""Helpers shared by the training tests (data made here, from token lists), and tests of
the loop's pure pieces: the data plan, the micro-batch split, the lr schedule."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from irtrain.shards import Segment, write_shard_set


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Training tests run torch on one thread: on a shared 2-core machine, OpenMP's two
    threads spin-wait for each other whenever a core is taken and runs slow down ~40x;
    one thread keeps the suite's time predictable (and results do not depend on it)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tokenizer_hash(tokenizer) -> str:
    """As `irtrain prepare` computes it (sha256 of the canonical tokenizer.json)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def prepare_task(out: Path, model_dir: Path, *, n_sft: int, n_heldout: int = 0, n_pref: int = 0, seed: int = 0,
                 max_len: int = 256) -> dict[str, Path]:
    """The project's generated task (irtrain.tasks) through the real `irtrain prepare`:
    shard dirs `sft`, `heldout` (chat) and `heldout_pref` (preference) tokenized with the
    model's tokenizer."""
    from typer.testing import CliRunner

    from irtrain.cli.main import app
    from irtrain.tasks import make_task, write_task

    files = write_task(make_task(n_sft, n_pref, n_heldout, seed=seed), out / "jsonl")
    shards = {}
    for name in ("sft", "heldout", "heldout_pref"):
        if name != "sft" and not n_heldout:
            continue
        r = CliRunner().invoke(app, ["prepare", str(files[name]), "--out", str(out / name), "--tokenizer", str(model_dir),
                                     "--max-len", str(max_len)])
        assert r.exit_code == 0, r.output
        shards[name] = out / name
    return shards


def arithmetic_conversations(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Tiny deterministic task: 'Compute: a + b - c' -> worked answer."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        convs.append([
            {"role": "user", "content": f"Compute: {a} + {b} - {c}"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}\n\n{a + b} - {c} = {a + b - c}\n\nAnswer: {a + b - c}"},
        ])
    return convs


def tokenize_chat(tokenizer, conv: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 on the prompt) of one conversation, last turn trained."""
    full = tokenizer.apply_chat_template(conv, tokenize=False)
    prompt = tokenizer.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(p_ids)] == p_ids
    return ids, [-100] * len(p_ids) + ids[len(p_ids):]


def pack(segments: list[Segment], max_len: int) -> list[list[Segment]]:
    """Greedy packing in order (a test fixture, not `prepare`'s best-fit)."""
    rows, cur, n = [], [], 0
    for s in segments:
        if cur and n + len(s.input_ids) > max_len:
            rows.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += len(s.input_ids)
    if cur:
        rows.append(cur)
    return rows


def make_sft_shards(tokenizer, out: Path, *, n: int, seed: int = 0, max_len: int = 128, fmt: str = "chat",
                    tok_hash: str | None = None) -> Path:
    segs = []
    for i, conv in enumerate(arithmetic_conversations(n, seed)):
        ids, labels = tokenize_chat(tokenizer, conv)
        segs.append(Segment(ids, labels, example=i))
    write_shard_set(out, fmt, pack(segs, max_len), max_len=max_len,
                    tokenizer_hash=tokenizer_hash(tokenizer) if tok_hash is None else tok_hash)
    return out


def make_preference_shards(tokenizer, out: Path, *, n: int, seed: int = 1, max_len: int = 256) -> Path:
    """Pairs whose rejected answer has a wrong final result."""
    rows = []
    for i, conv in enumerate(arithmetic_conversations(n, seed)):
        ids_w, lab_w = tokenize_chat(tokenizer, conv)
        bad = [conv[0], {"role": "assistant", "content": conv[1]["content"].rsplit("Answer: ", 1)[0] + "Answer: 17"}]
        ids_l, lab_l = tokenize_chat(tokenizer, bad)
        rows.append([Segment(ids_w, lab_w, example=i, part=0), Segment(ids_l, lab_l, example=i, part=1)])
    write_shard_set(out, "preference", rows, max_len=max_len, tokenizer_hash=tokenizer_hash(tokenizer))
    return out


# --------------------------------------------------------------------------- the data plan
from irtrain.errors import ConfigError  # noqa: E402
from irtrain.train.batching import epoch_order, plan_steps, split_step  # noqa: E402
from irtrain.train.schedule import lr_at, warmup_steps  # noqa: E402


def test_plan_is_deterministic_and_covers_each_epoch():
    lengths = np.arange(10, 30)
    a = plan_steps(lengths, global_batch=4, seed=3, epochs=2)
    b = plan_steps(lengths, global_batch=4, seed=3, epochs=2)
    assert len(a) == 10 and all((x == y).all() for x, y in zip(a, b))
    first, second = np.concatenate(a[:5]), np.concatenate(a[5:])
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert not (first == second).all()  # each epoch has its own order
    assert (np.concatenate(a) == np.concatenate([epoch_order(20, 3, 0), epoch_order(20, 3, 1)])).all()
    # a longer run starts with the same steps (resume may extend --max-steps)
    longer = plan_steps(lengths, global_batch=4, seed=3, max_steps=12)
    assert all((x == y).all() for x, y in zip(a, longer))
    with pytest.raises(ConfigError, match="no complete optimizer step"):
        plan_steps(lengths, global_batch=64, seed=0, epochs=1)


def test_plan_by_tokens():
    lengths = np.full(50, 10)
    steps = plan_steps(lengths, global_batch=0, global_batch_tokens=35, seed=0, epochs=1)
    assert all(len(s) == 4 for s in steps) and len(steps) == 12  # 4 rows reach 35 tokens; 2 rows left over
    assert len(set(np.concatenate(steps).tolist())) == 48


def test_split_step_ranks_and_micro_batches():
    lengths = np.array([5, 50, 7, 20, 9, 30, 11, 3])
    rows = np.arange(8)
    # row budget: contiguous equal slices, micro-batches of 2 rows
    r0 = split_step(rows, lengths, world_size=2, rank=0, micro_batch=2)
    r1 = split_step(rows, lengths, world_size=2, rank=1, micro_batch=2)
    assert [m for m, _ in r0] == [[0, 1], [2, 3]] and [m for m, _ in r1] == [[4, 5], [6, 7]]
    # token budget: balanced ranks, equal micro-batch counts, fillers weigh 0
    parts = [split_step(rows, lengths, world_size=2, rank=k, micro_batch_tokens=40, by_tokens=True) for k in range(2)]
    assert len(parts[0]) == len(parts[1])
    real = sorted(g for p in parts for m, w in p if w for g in m)
    assert real == list(range(8))
    loads = [sum(int(lengths[g]) for m, w in p if w for g in m) for p in parts]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    for p in parts:
        for m, w in p:
            assert w == 0.0 or sum(int(lengths[g]) for g in m) <= 40 or len(m) == 1
    with pytest.raises(ConfigError, match="divisible"):
        split_step(np.arange(6), lengths, world_size=4, rank=0)


def test_lr_schedule():
    total, peak = 100, 1.0
    w = warmup_steps(total, 0.1)
    assert w == 10
    lrs = [lr_at(s, total_steps=total, peak=peak, warmup=w, schedule="cosine") for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3
    lin = [lr_at(s, total_steps=total, peak=peak, warmup=0, schedule="linear") for s in range(total)]
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.5)
    assert lr_at(77, total_steps=total, peak=2.0, warmup=0, schedule="constant") == 2.0
