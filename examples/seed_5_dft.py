"""Seed 004 (DFT, arXiv 2508.05629): Dynamic Fine-Tuning generalizes better than plain SFT.

DFT rescales each token's cross-entropy by its (detached) probability, `-sg(p_t)·log p_t`
(FORMULAS.md `dft`), which the paper argues rectifies the implicit reward of SFT; it reports
better generalization than ce on math benchmarks it did not train on, fine-tuning base models
that already know their chat format.

Here: `irtrain sft --loss ce` and `--loss dft` (same lr, steps, data, seed) on the
quickstart's demonstrations (half from the sloppy demonstrator) and on clean ones, from two
bases: the examples' plain-text base (it has never seen the chat template, so the format
tokens start near probability 0, where DFT's gradient p·∇log p vanishes) and a base
pretrained on the same text rendered with the chat template (the DFT paper's situation).
Held-out task accuracy on problems seen in neither.

With the real model (``--model real``) there is one base, SmolLM2-135M-Instruct itself: a
pretrained model that already knows its chat format, the DFT paper's setting.
"""
from __future__ import annotations

import time

from seed_common import REAL_NAME, Lab, conclude, main_of, table

EXAMPLE = "seed_5_dft"
DATA = (("sloppy demos", None), ("clean demos", 0.0))
BASES = (("plain-text base", "text"), ("chat-format base", "chat"))
REAL_BASES = ((f"{REAL_NAME} (pretrained chat model)", "text"),)  # the real model is its own base: no pretraining


def run(out: str, *, scale: float = 1.0, seed: int = 0, threads: int = 1, model: str = "tiny",
        lora_r: int = 0) -> bool:
    t0 = time.perf_counter()
    rows, res = [], {}
    bases = BASES if model == "tiny" else REAL_BASES
    paper_base = bases[-1][0]  # the base that knows the chat format (the DFT paper's setting)
    labs = []
    for base_label, fmt in bases:
        first = None
        for data_label, rate in DATA:
            lab = Lab(out, scale=scale, seed=seed, threads=threads, model=model, lora_r=lora_r, demo_bug_rate=rate, base_from=first, pretrain_format=fmt)
            if first is None:
                first = lab
                labs.append(lab)
                rows.append([base_label, "—", "base (before SFT)", lab.evaluate(lab.base)["task"], None, None])
            tag = ("" if rate is None else f"-bug{rate:g}") + lab.tag
            for loss in ("ce", "dft"):
                s = lab.sft(f"sft-{loss}-lr{lab.plan.sft_lr:g}{tag}", loss=loss)
                e = lab.evaluate(s.final)
                res[(base_label, data_label, loss)] = e
                rows.append([base_label, data_label, loss, e["task"], e["task_strict"], e["pref"]])
    md = table("SFT loss → held-out (after SFT)",
               ["base", "SFT data", "loss", "task acc", "task acc (every step)", "pref acc"], rows)
    cells = [(b, d) for b, _ in bases for d, _ in DATA]
    wins = [(b, d) for b, d in cells if res[(b, d, "dft")]["task"] > res[(b, d, "ce")]["task"]]
    measured = "; ".join(f"{b}, {d}: dft {res[(b, d, 'dft')]['task']:.3f} vs ce {res[(b, d, 'ce')]['task']:.3f}"
                         for b, d in cells) + " (held-out task accuracy)"
    chat_wins = [w for w in wins if w[0] == paper_base]
    where = "the chat-format base" if model == "tiny" else f"the pretrained {REAL_NAME}"
    if len(chat_wins) == len(DATA):
        verdict = f"reproduced from {where} (the paper's setting)"
    elif chat_wins:
        verdict = f"mixed: from {where} dft is better only with {chat_wins[0][1]}"
    else:
        verdict = "not reproduced: ce generalizes as well or better"
    if model == "tiny":
        if any(w[0] == "plain-text base" for w in wins):
            verdict += "; dft also better from the plain-text base in " + ", ".join(d for b, d in wins if b == "plain-text base")
        else:
            verdict += "; from the plain-text base dft does not learn the format (vanishing p·∇log p)"
    conclude(out, EXAMPLE, claim="DFT generalizes better than ce on held-out problems (seed 004)",
             paper="DFT beats SFT (ce) on math benchmarks not trained on, across Qwen/Llama models",
             measured=measured, verdict=verdict, details_md=md, seconds=time.perf_counter() - t0, lab=labs[0])
    return True


if __name__ == "__main__":
    main_of(run, __doc__)
