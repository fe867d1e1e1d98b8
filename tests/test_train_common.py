"""Helpers shared by the training tests: data made here (from token lists, or the generated
task through the real `irtrain prepare`), the `irtrain sft` runner, and the fixtures the
sft and loop tests share. No tests of its own: the data plan and micro-batch split are
tested in test_batching.py, the lr schedule in test_schedule.py."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

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
    shard dirs `sft`, `heldout` (chat) and `heldout_pref` (preference) with n_heldout, and
    `pref` (preference) with n_pref, tokenized with the model's tokenizer, under `out`."""
    from typer.testing import CliRunner

    from irtrain.cli.main import app
    from irtrain.tasks import make_task, write_task

    files = write_task(make_task(n_sft, n_pref, n_heldout, seed=seed), out / "jsonl")
    shards = {}
    for name in ("sft", "pref", "heldout", "heldout_pref"):
        if (name == "pref" and not n_pref) or (name.startswith("heldout") and not n_heldout):
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


# --------------------------------------------------------------------------- `irtrain sft` and its shared fixtures
def sft(*args: object):
    """`irtrain sft ARGS` through Typer's test runner (the real CLI, in this process)."""
    from typer.testing import CliRunner

    from irtrain.cli.main import app

    return CliRunner().invoke(app, ["sft", *map(str, args)])


def base_args(model, data, out, *extra) -> list:
    """The common flags of the loop tests' `irtrain sft` runs (8 rows a step, 2 per micro-batch)."""
    return ["--model", model, "--out", out, "--lr", "1e-3", "--global-batch", "8", "--micro-batch", "2",
            "--warmup-ratio", "0", "--no-kl-metrics", "--no-tensorboard", *extra, data]


def load_model(path):
    """A checkpoint or model directory in fp32, for inspection (no KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    m.config.use_cache = False
    return m


@pytest.fixture(scope="module")
def task_shards(tiny_model_dir, tmp_path_factory):
    """The generated arithmetic task through the real `irtrain prepare` (import into a test
    module with the fixtures below)."""
    return prepare_task(tmp_path_factory.mktemp("task"), tiny_model_dir, n_sft=200, n_heldout=48, seed=0, max_len=128)


@pytest.fixture(scope="module")
def data_dir(task_shards):
    return task_shards["sft"]


@pytest.fixture(scope="module")
def heldout_dir(task_shards):
    return task_shards["heldout"]


@pytest.fixture(scope="module")
def pref_dir(task_shards):
    return task_shards["heldout_pref"]


# --------------------------------------------------------------------------- 2 CPU processes
def torchrun_irtrain(nproc: int = 2) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m irtrain.cli.main` (torch.distributed.run where
    torchrun is not on PATH): the prefix of every multi-process test's command."""
    import shutil
    import sys

    torchrun = shutil.which("torchrun")
    return [*([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]), "--standalone", "--nproc_per_node",
            str(nproc), "-m", "irtrain.cli.main"]


def cpu_dist_env() -> dict[str, str]:
    """The environment of a DeepSpeed run on CPU processes: gloo, one torch thread each."""
    import os

    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
