"""Seed 001 §4.4: models agree on the value of reasoning states: Kendall τ > 0.

The paper splits UltraChat-200K into 4 shards and SFTs Llama-3-8B on each; it adds
Llama-3-Instruct (same prior, other data) and Zephyr (other prior, similar data). On one
MATH-500 trace per problem, split into steps, each model's V(s) = logsumexp of the logits
after each step is ranked, and Kendall's τ between models is positive everywhere, close to
1 between the 4 shard models.

Here: the pretrained base SFT'd on each quarter of the SFT demonstrations (4 models);
"other data": the same base SFT'd on the clean chosen answers of the preference problems;
"other prior": a differently initialised model, pretrained the same way, SFT'd on quarter 1.
`irtrain score` on the held-out traces (V at s0 and after every step), `irtrain rank`.

With the real model (``--model real``) the base is SmolLM2-135M-Instruct and "other prior"
is its architecture and tokenizer at a random init (no pretraining at all: the one other
prior a single real model offers), SFT'd on quarter 1 with the same settings.
"""
from __future__ import annotations

import time

from seed_common import Lab, conclude, main_of, table

from irtrain.tasks import sft_example

EXAMPLE = "seed_3_tau"


def run(out: str, *, scale: float = 1.0, seed: int = 0, threads: int = 1, model: str = "tiny",
        lora_r: int = 0) -> bool:
    t0 = time.perf_counter()
    lab = Lab(out, scale=scale, seed=seed, threads=threads, model=model, lora_r=lora_r)
    other = Lab(out, scale=scale, seed=seed, threads=threads, model=model, lora_r=lora_r, init_seed=seed + 1)
    steps = max(4, lab.plan.sft_steps // 4)  # a quarter of the data for a quarter of the steps: same epochs
    rows = lab.q.task.sft_rows()
    quarters = [lab.prepare(f"sft-quarter-{k + 1}", rows[k::4], "chat") for k in range(4)]
    models = {}
    for k, shards in enumerate(quarters):
        models[f"shard-{k + 1}"] = lab.sft(f"sft-quarter-{k + 1}", data=[str(shards)], max_steps=steps).final
    clean = lab.prepare("sft-other-data", [sft_example(p) for p in lab.q.task.pref], "chat")
    models["other-data"] = lab.sft("sft-other-data", data=[str(clean)], max_steps=steps).final
    models["other-prior"] = other.sft("sft-quarter-1-other-prior", data=[str(quarters[0])], max_steps=steps).final
    summary = lab.score_rank(EXAMPLE, models)
    pooled, trace = summary["tau_pooled"], summary["tau_trace_mean"]
    labels = list(pooled)
    md = table(f"pooled Kendall τ-b of V(s) over {summary['states']} states of {summary['traces']} held-out traces",
               ["τ"] + labels, [[a] + [pooled[a][b] for b in labels] for a in labels])
    md += "\n\n" + table("per-trace mean τ", ["τ"] + labels, [[a] + [trace[a][b] for b in labels] for a in labels])
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    shard_pairs = [(a, b) for a, b in pairs if a.startswith("shard") and b.startswith("shard")]
    positive = [p for p in pairs if pooled[p[0]][p[1]] > 0]
    shard_tau = [pooled[a][b] for a, b in shard_pairs]
    cross = {x: [pooled[x][s] for s in labels if s.startswith("shard")] for x in ("other-data", "other-prior")}
    measured = (f"pooled τ > 0 for {len(positive)} of {len(pairs)} model pairs; between the 4 shard models "
                f"{min(shard_tau):.3f}–{max(shard_tau):.3f}; other-data vs shards {min(cross['other-data']):.3f}–"
                f"{max(cross['other-data']):.3f}; other-prior vs shards {min(cross['other-prior']):.3f}–{max(cross['other-prior']):.3f}")
    verdict = ("reproduced: every τ > 0" if len(positive) == len(pairs) else
               f"partly: {len(pairs) - len(positive)} of {len(pairs)} pairs have τ <= 0")
    conclude(out, EXAMPLE, claim="Value rankings agree across checkpoints: Kendall τ > 0 (§4.4)",
             paper="τ > 0 for every pair; close to 1 between the 4 shard models; lower with another prior or data",
             measured=measured, verdict=verdict, details_md=md, seconds=time.perf_counter() - t0, lab=lab)
    return True


if __name__ == "__main__":
    main_of(run, __doc__)
