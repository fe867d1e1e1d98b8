"""Seed 001 §4.3: Pearson χ² / squared-Hellinger SFT gives a weaker SFT checkpoint but a
better model after DPO.

The paper derives SFT objectives from other f-divergences that keep a KL-like term
(FORMULAS.md `pearson`, `hellinger`; value term detached, so `pearson` has DFT's gradient
-p∇log p and `hellinger` -½√p∇log p), and finds, for Llama-3-8B and Mistral-7B, both
weaker than ce after SFT but better after DPO: "a better SFT checkpoint does not
necessarily give a better DPO model".

Here: `irtrain sft --loss ce|pearson|hellinger` (same lr, steps, data, seed) from the
pretrained base, then the same `irtrain dpo` from each. Held-out task accuracy (greedy,
exact) and preference accuracy (implicit reward against the base), after SFT and after DPO.
"""
from __future__ import annotations

import time

from seed_common import Lab, conclude, main_of, table

EXAMPLE = "seed_2_fdiv"
LOSSES = ("ce", "pearson", "hellinger")


def run(out: str, *, scale: float = 1.0, seed: int = 0, threads: int = 1, model: str = "tiny",
        lora_r: int = 0) -> bool:
    t0 = time.perf_counter()
    lab = Lab(out, scale=scale, seed=seed, threads=threads, model=model, lora_r=lora_r)
    lr = lab.plan.sft_lr
    res, rows = {}, [["base (before SFT)", lab.evaluate(lab.base)["task"], None, None, None]]
    for loss in LOSSES:
        s = lab.sft(f"sft-{loss}-lr{lr:g}", loss=loss)
        d = lab.dpo(f"dpo-from-sft-{loss}-lr{lr:g}", s.final)
        res[loss] = (lab.evaluate(s.final), lab.evaluate(d.final))
        es, ed = res[loss]
        rows.append([loss, es["task"], es["pref"], ed["task"], ed["pref"]])
    md = table("SFT loss → after SFT / after DPO (held-out)",
               ["SFT loss", "task acc after SFT", "pref acc after SFT", "task acc after DPO", "pref acc after DPO"], rows)
    ce_s, ce_d = res["ce"]
    parts, verdicts = [], []
    for loss in LOSSES[1:]:
        es, ed = res[loss]
        weaker = es["task"] < ce_s["task"]
        better = {m: ed[m] > ce_d[m] for m in ("task", "pref")}
        parts.append(f"{loss}: SFT task acc {es['task']:.3f} (ce {ce_s['task']:.3f}), after DPO task {ed['task']:.3f} "
                     f"(ce {ce_d['task']:.3f}), pref {ed['pref']:.3f} (ce {ce_d['pref']:.3f})")
        if weaker and all(better.values()):
            verdicts.append(f"{loss}: reproduced")
        elif weaker and any(better.values()):
            verdicts.append(f"{loss}: weaker after SFT, better after DPO on {'task' if better['task'] else 'pref'} accuracy only")
        elif weaker:
            verdicts.append(f"{loss}: weaker after SFT and not better after DPO")
        else:
            verdicts.append(f"{loss}: not weaker after SFT" + (" and better after DPO" if any(better.values()) else ""))
    conclude(out, EXAMPLE, claim="Pearson χ² / squared-Hellinger SFT → weaker SFT checkpoint, better after DPO (§4.3)",
             paper="both weaker than ce after SFT and better after DPO, on Llama-3-8B and Mistral-7B",
             measured="; ".join(parts), verdict="; ".join(verdicts), details_md=md, seconds=time.perf_counter() - t0, lab=lab)
    return True


if __name__ == "__main__":
    main_of(run, __doc__)
