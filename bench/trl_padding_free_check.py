"""Check: is TRL `SFTTrainer(padding_free=True)` correct on this CPU (sdpa attention, no flash-attn)?

TRL documents padding-free as supported with FlashAttention 2/3 only. Its collator flattens a
micro-batch into one row with position ids restarting per sequence and no attention mask;
transformers (5.x) then builds a block-diagonal causal mask from the position ids
(`masking_utils.find_packed_sequence_indices`), so sdpa should keep the sequences apart. This
script checks it on the real model, on the conversations bench/sft.py --model smollm2 trains on:
TRL's own loss (`SFTTrainer.compute_loss`, its default `nll` fused head) of one micro-batch,
padded vs padding-free vs each sequence alone (the reference), and the same flattened row with
position ids that do not restart (what leaking across sequences gives), to show the check can fail.

    python bench/sft.py --model smollm2 ...            # makes the data first (its scratch directory)
    python bench/trl_padding_free_check.py --n 4 --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _common import default_work, real_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="bench/sft.py --model smollm2's scratch directory (default /tmp/irtrain-bench-sft-smollm2)")
    p.add_argument("--n", type=int, default=4, help="sequences in the micro-batch")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    work = Path(args.work) if args.work else default_work("sft", "smollm2")
    data = work / "prompt_completion.jsonl"
    if not data.is_file():
        sys.exit(f"{data} missing: run bench/sft.py --model smollm2 first (or pass --work)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = str(real_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    print(f"attention implementation: {model.config._attn_implementation}")

    def trainer(padding_free: bool, tmp: str) -> SFTTrainer:
        ds = load_dataset("json", data_files=str(data), split="train", cache_dir=f"{tmp}/hf-{padding_free}")
        cfg = SFTConfig(output_dir=f"{tmp}/out", per_device_train_batch_size=args.n, use_cpu=True, bf16=False, report_to=[],
                        padding_free=padding_free, max_length=None, gradient_checkpointing=False)
        return SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)

    def loss(t: SFTTrainer, batch: dict) -> float:
        t.model.eval()
        with torch.no_grad():
            return float(t.compute_loss(t.model, dict(batch)))

    with tempfile.TemporaryDirectory() as tmp:
        padded, free = trainer(False, tmp), trainer(True, tmp)
        rows = [padded.train_dataset[i] for i in range(args.n)]
        lengths = [len(r["input_ids"]) for r in rows]
        pb = padded.data_collator(rows)
        fb = free.data_collator([free.train_dataset[i] for i in range(args.n)])
        # each alone: no padding, no other sequence; TRL's loss is the mean over the micro-batch's trained tokens
        alone = [(loss(padded, padded.data_collator([r])), sum(x != -100 for x in r["labels"][1:])) for r in rows]
        reference = sum(v * k for v, k in alone) / sum(k for _, k in alone)
        leaky = dict(fb, position_ids=torch.arange(fb["input_ids"].shape[1])[None])
        leaky.pop("cu_seq_lens_q"), leaky.pop("cu_seq_lens_k"), leaky.pop("max_length_q"), leaky.pop("max_length_k")
        results = {"padded": loss(padded, pb), "padding-free": loss(free, fb), "padding-free, position ids not restarting": loss(free, leaky)}

    print(f"{args.n} sequences of {lengths} tokens; padded batch {tuple(pb['input_ids'].shape)}, padding-free row "
          f"{tuple(fb['input_ids'].shape)}")
    print(f"{'each sequence alone (reference)':45s} loss {reference:.7f}")
    for name, v in results.items():
        print(f"{name:45s} loss {v:.7f}  |diff| {abs(v - reference):.2e}")
    ok = abs(results["padding-free"] - reference) < 1e-4 and abs(results["padded"] - reference) < 1e-4
    print("padding-free is correct here" if ok else "MISMATCH: padding-free is not correct here")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
