"""Benchmark: `irtrain sft` against TRL's `SFTTrainer` on this machine.

Same tiny Llama (built from a config), same generated conversations (irtrain.tasks), same
global batch (sequences) and number of optimizer steps, same AdamW / lr / cosine schedule,
fp32 on CPU. Each side runs in its own fresh process (so peak RSS is its own); the two
alternate `--repeats` times and the best run of each is compared (other load on a shared
machine only ever slows a run down).

- irtrain: `irtrain prepare --no-pack` (one conversation per row, so a "sequence" is the
  same thing on both sides), micro-batches concatenated padding-free.
- TRL: prompt-completion conversations (completion-only loss, as irtrain trains only the
  assistant turn), its defaults otherwise (padding to the longest in the batch).
- Both with and without gradient checkpointing (TRL's SFTConfig turns it on by default,
  irtrain leaves it off), compared at the same setting.

tokens/s = non-padding tokens processed / wall time from the start of the first
optimizer step to the end of the last (model loading, data preparation and checkpoints
excluded on both sides). Peak memory = the process's peak RSS (`ru_maxrss`), and its
growth over the RSS just before training.

    python bench/sft.py                       # defaults below
    python bench/sft.py --steps 40 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()

#: Llama shapes (hidden, layers, heads, kv heads, intermediate). "tiny" is the tests' model.
SIZES = {"tiny": (64, 2, 4, 2, 128), "small": (256, 4, 8, 4, 688)}
VOCAB = 1000


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- setup
def setup(work: Path, args: argparse.Namespace) -> None:
    """Data (JSONL for TRL, shards for irtrain), a tokenizer, and one model per size."""
    from irtrain.tasks import TaskSpec, make_task, write_jsonl
    from irtrain.toy import tiny_llama, train_tokenizer

    stamp = json.dumps({"examples": args.examples, "min_ops": args.min_ops, "max_ops": args.max_ops, "sizes": SIZES})
    if (work / "ready").is_file() and (work / "ready").read_text() == stamp:
        return
    task = make_task(args.examples, 0, 0, seed=0, spec=TaskSpec(min_ops=args.min_ops, max_ops=args.max_ops, max_value=99))
    tok_dir = train_tokenizer(task.texts(), work / "tokenizer", template="chatml", vocab_size=VOCAB)
    for name, (hidden, layers, heads, kv, inter) in SIZES.items():
        tiny_llama(tok_dir, work / f"model-{name}", hidden_size=hidden, num_layers=layers, num_heads=heads,
                   num_kv_heads=kv, intermediate_size=inter, seed=0)
    rows = task.sft_rows()
    write_jsonl(work / "chat.jsonl", rows)
    write_jsonl(work / "prompt_completion.jsonl",
                [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    subprocess.run([sys.executable, "-m", "irtrain.cli.main", "prepare", str(work / "chat.jsonl"), "--out", str(work / "shards"),
                    "--tokenizer", str(tok_dir), "--no-pack", "--max-len", "1024"], check=True, capture_output=True)
    (work / "ready").write_text(stamp)


# --------------------------------------------------------------------------- workers (each in its own process)
def run_irtrain(work: Path, args: argparse.Namespace) -> dict:
    from irtrain.config import SFTConfig
    from irtrain.sft import run
    from irtrain.train.metrics import read_metrics

    out = work / f"out-irtrain-{time.time_ns()}"
    cfg = SFTConfig(model=str(work / f"model-{args.size}"), data=[str(work / "shards")], out=str(out), lr=args.lr, warmup_ratio=0.1,
                    lr_schedule="cosine", global_batch=args.global_batch, micro_batch=args.micro_batch, max_steps=args.steps,
                    kl_metrics=False, tensorboard=False, seed=0, weight_decay=0.0,
                    gradient_checkpointing=args.gc == "on")
    base = rss_mb()
    run(cfg)
    m = read_metrics(out)
    first = m[0]
    wall = m[-1]["elapsed_s"] - (first["elapsed_s"] - first["step_time_s"])
    return {"tokens": m[-1]["tokens"], "wall_s": wall, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base,
            "final_loss": m[-1]["loss"], "steps": len(m)}


def run_trl(work: Path, args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(work / f"model-{args.size}"))
    ds = load_dataset("json", data_files=str(work / "prompt_completion.jsonl"), split="train")

    class Clock(TrainerCallback):
        t0: float | None = None
        t1: float | None = None

        def on_step_begin(self, a, state, control, **kw):
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.t1 = time.perf_counter()

    clock = Clock()
    accum = args.global_batch // args.micro_batch
    cfg = SFTConfig(output_dir=str(work / f"out-trl-{time.time_ns()}"), per_device_train_batch_size=args.micro_batch,
                    gradient_accumulation_steps=accum, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine",
                    warmup_steps=0.1, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                    use_cpu=True, bf16=False, fp16=False, max_length=1024, dataloader_num_workers=0,
                    adam_beta2=0.95, max_grad_norm=1.0, gradient_checkpointing=args.gc == "on")
    model = AutoModelForCausalLM.from_pretrained(str(work / f"model-{args.size}"), dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
    base = rss_mb()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h]
    return {"tokens": logs[-1]["num_tokens"], "wall_s": clock.t1 - clock.t0, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base,
            "final_loss": logs[-1].get("loss"), "steps": trainer.state.global_step}


# --------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/irtrain-bench-sft", help="scratch directory (data, model, outputs)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--sizes", default="tiny,small", help=f"model sizes to run, of: {', '.join(SIZES)}")
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--min-ops", type=int, default=1, help="task problems have min..max operations (sets the length spread)")
    p.add_argument("--max-ops", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0 = torch's default, the core count)")
    p.add_argument("--worker", choices=("irtrain", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--gc", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", default="off,on",
                   help="gradient checkpointing settings to compare at (TRL's default is on, irtrain's off)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        res = run_irtrain(work, args) if args.worker == "irtrain" else run_trl(work, args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    setup(work, args)
    forwarded = [a for a in sys.argv[1:]]
    summary = []
    for size in args.sizes.split(","):
        if size not in SIZES:
            sys.exit(f"unknown size {size!r}; one of {', '.join(SIZES)}")
        for gc in args.checkpointing.split(","):
            results: dict[str, list[dict]] = {"irtrain": [], "trl": []}
            for r in range(args.repeats):
                for who in ("irtrain", "trl"):
                    proc = subprocess.run([sys.executable, str(HERE), *forwarded, "--size", size, "--gc", gc, "--worker", who],
                                          capture_output=True, text=True,
                                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu"))
                    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                    if proc.returncode or line is None:
                        sys.exit(f"{who} run failed:\n{proc.stderr[-3000:]}")
                    res = json.loads(line[len("RESULT "):])
                    res["tokens_per_s"] = res["tokens"] / res["wall_s"]
                    results[who].append(res)
                    print(f"[{size} gc={gc} {r + 1}/{args.repeats}] {who:8s} {res['tokens_per_s']:9.0f} tokens/s  {res['wall_s']:6.2f} s  "
                          f"{res['tokens']:.0f} tokens  peak RSS {res['peak_rss_mb']:.0f} MB (+{res['peak_rss_mb'] - res['base_rss_mb']:.0f})  "
                          f"final loss {res['final_loss']:.3f}", flush=True)
            best = {who: max(rs, key=lambda x: x["tokens_per_s"]) for who, rs in results.items()}
            summary.append((size, gc, best["irtrain"], best["trl"]))

    print()
    print(f"data: {args.examples} generated conversations ({args.min_ops}-{args.max_ops} operations each); "
          f"{args.steps} steps x {args.global_batch} sequences (micro-batch {args.micro_batch}); fp32 CPU, "
          f"{os.cpu_count()} cores, torch threads {args.threads or 'default'}; best of {args.repeats}")
    print(f"{'model':30s}{'grad ckpt':>10s}  {'':9s}{'tokens/s':>10s}{'peak RSS MB':>13s}{'RSS growth MB':>15s}")
    for size, gc, ours, theirs in summary:
        h, layers, *_ = SIZES[size]
        label = f"{size} (hidden {h}, {layers} layers)"
        for who, r in (("irtrain", ours), ("TRL", theirs)):
            print(f"{label:30s}{gc:>10s}  {who:9s}{r['tokens_per_s']:10.0f}{r['peak_rss_mb']:13.0f}{r['peak_rss_mb'] - r['base_rss_mb']:15.0f}")
            label = ""
        print(f"{'':30s}{'':10s}  {'ratio':9s}{ours['tokens_per_s'] / theirs['tokens_per_s']:9.2f}x"
              f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:12.2f}x"
              f"{(ours['peak_rss_mb'] - ours['base_rss_mb']) / max(1.0, theirs['peak_rss_mb'] - theirs['base_rss_mb']):14.2f}x")


if __name__ == "__main__":
    main()
