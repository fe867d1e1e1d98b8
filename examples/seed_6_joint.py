"""Seed 001 App. D: joint SFT+DPO with an adaptive λ, and alternating SFT/DPO, both hurt.

The paper tried training SFT and DPO as one objective, L = L_sft + λ·L_pref with λ halved
when the preference accuracy is within δ of a target and doubled otherwise
(FORMULAS.md "Multi-objective and alternating SFT/DPO"),
and an alternating schedule SFT_1 → DPO_1 → … → SFT_4 → DPO_4; both gave worse models than
the sequential SFT → DPO (AlpacaEval 2: each SFT stage after a DPO stage lowered the win
rate, e.g. 12.94 → 8.44).

Here, from the pretrained base, with the same data and the same number of rows trained on:
sequential (`irtrain sft` then `irtrain dpo`), joint (`irtrain dpo --joint-sft`), and
alternating (`irtrain dpo --alternate-with --rounds 4`). Held-out task accuracy (greedy,
exact) and preference accuracy (implicit reward against the base).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from seed_common import Lab, conclude, main_of, table

from irtrain.shards import ShardSet

EXAMPLE = "seed_6_joint"


def run(out: str, *, scale: float = 1.0, seed: int = 0, threads: int = 1, model: str = "tiny",
        lora_r: int = 0) -> bool:
    t0 = time.perf_counter()
    lab = Lab(out, scale=scale, seed=seed, threads=threads, model=model, lora_r=lora_r)
    pl = lab.plan
    sft_shards, pref_shards = str(lab.shards["sft"]), str(lab.shards["pref"])
    batch = pl.dpo_batch
    # every schedule trains on 2 epochs of each dataset with the same global batch of packed rows
    seq_sft = lab.sft("seq-sft", epochs=2.0, max_steps=0, global_batch=batch, micro_batch=batch)
    seq = lab.dpo("seq-dpo", seq_sft.final, epochs=2.0, max_steps=0)
    rows = 2 * (len(ShardSet(sft_shards)) + len(ShardSet(pref_shards)))
    joint = lab.dpo("joint", lab.base, joint_sft=sft_shards, lr=pl.sft_lr, max_steps=rows // batch,
                    target_accuracy=0.8, lambda_interval=10, lambda_init=1.0)
    alt = lab.dpo("alternating", lab.base, alternate_with=sft_shards, rounds=4, epochs=2.0, max_steps=0,
                  sft_lr=pl.sft_lr, lr=pl.dpo_lr)
    res = {name: lab.evaluate(r.final) for name, r in (("sequential SFT → DPO", seq), ("joint SFT+DPO (adaptive λ)", joint),
                                                         ("alternating ×4", alt))}
    rows_md = [[name, e["task"], e["task_strict"], e["pref"], e["logp_rank"]] for name, e in res.items()]
    md = table("schedule → held-out", ["schedule", "task acc", "task acc (every step)", "pref acc", "log-prob ranking"], rows_md)
    # the alternating schedule's stages, as in the paper's Table 5
    stages = [json.loads(line) for line in (alt.out / "stages.jsonl").read_text().splitlines() if line.strip()]
    stage_rows = []
    for st in stages:
        e = lab.evaluate(Path(st["checkpoint"]))
        stage_rows.append([f"{st['kind'].upper()} {st['round']}", e["task"], e["pref"]])
    md += "\n\n" + table("alternating schedule, after each stage", ["stage", "task acc", "pref acc"], stage_rows)
    lams = [m["joint/lambda"] for m in joint.metrics() if "joint/lambda" in m]
    if lams:
        md += f"\n\njoint λ: start {lams[0]:g}, min {min(lams):g}, max {max(lams):g}, end {lams[-1]:g}"
    s = res["sequential SFT → DPO"]
    j, a = res["joint SFT+DPO (adaptive λ)"], res["alternating ×4"]
    hurt = {name: {m: e[m] < s[m] for m in ("task", "pref")} for name, e in (("joint", j), ("alternating", a))}
    measured = (f"task accuracy: sequential {s['task']:.3f}, joint {j['task']:.3f}, alternating {a['task']:.3f}; "
                f"preference accuracy: sequential {s['pref']:.3f}, joint {j['pref']:.3f}, alternating {a['pref']:.3f}")
    # the paper's Table 5 reading: each SFT stage after a DPO stage lowers the score
    drops = {m: sum(stage_rows[i][k] < stage_rows[i - 1][k] for i in range(2, len(stage_rows), 2))
             for m, k in (("task", 1), ("pref", 2))}
    later_sft = len(range(2, len(stage_rows), 2))
    measured += (f"; in the alternating schedule an SFT stage after a DPO stage lowers task accuracy {drops['task']}/{later_sft} "
                 f"times, preference accuracy {drops['pref']}/{later_sft} times")

    def words(h: dict[str, bool]) -> str:
        worse = [m for m, v in h.items() if v]
        return ("worse on both metrics" if len(worse) == 2 else f"worse on {worse[0]} accuracy only" if worse
                else "not worse")

    verdict = ("reproduced: both worse than sequential on both metrics" if all(all(h.values()) for h in hurt.values())
               else f"partly: joint {words(hurt['joint'])}; alternating {words(hurt['alternating'])}")
    conclude(out, EXAMPLE, claim="Joint SFT+DPO (adaptive λ) and alternating SFT/DPO hurt (App. D)",
             paper="both worse than sequential SFT → DPO; in the alternating schedule each SFT stage after a DPO stage lowers the score",
             measured=measured, verdict=verdict, details_md=md, seconds=time.perf_counter() - t0, lab=lab)
    return True


if __name__ == "__main__":
    main_of(run, __doc__)
