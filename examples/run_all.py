"""Run the six seed-paper examples one after the other and write the summary table.

    python examples/run_all.py [--out examples-out] [--scale 1.0]
    python examples/run_all.py --model real                 # SmolLM2-135M-Instruct, the GPU set (~5 min on one H200)
    python examples/run_all.py --model real --smoke         # the same on a CPU at a smoke scale (minutes; inconclusive)

Each example prints the paper's expected outcome next to the measured one; this script
collects them into OUT/results/summary.md (the table the README quotes; its first line
names the model and the scale) and prints the wall time of each. Runs shared by several
examples (e.g. the ce SFT baseline) are trained once (see seed_common.Lab).
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_common import console, parse_args  # noqa: E402

EXAMPLES = ("seed_1_sft_lr", "seed_2_fdiv", "seed_3_tau", "seed_4_value_s0", "seed_5_dft", "seed_6_joint")


def main() -> None:
    args = parse_args(__doc__)
    t_all = time.perf_counter()
    times = {}
    for name in EXAMPLES:
        t0 = time.perf_counter()
        importlib.import_module(name).run(args.out, scale=args.scale, seed=args.seed, threads=args.threads, model=args.model,
                                          lora_r=args.lora_r)
        times[name] = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    results = [json.loads((Path(args.out) / "results" / f"{n}.json").read_text()) for n in EXAMPLES]
    described = {r.get("model_description") for r in results}
    assert len(described) == 1, f"the examples ran on different models: {described}"
    r0 = results[0]
    flags = f" --lora-r {args.lora_r}" if args.lora_r else ""
    lines = [f"Model: {args.model}{flags} = {r0['model_description']}.", "",
             f"Scale {args.scale:g} ({r0['n_heldout']} held-out problems, {r0['sft_steps']} SFT steps, "
             f"{r0['dpo_steps']} DPO steps per run), seed {args.seed}, "
             f"{args.threads or torch.get_num_threads()} torch thread(s); total {total / 60:.1f} min "
             "(" + ", ".join(f"{n} {t:.0f}s" for n, t in times.items()) + ").", "",
             "| # | claim | paper | measured | verdict |", "|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        lines.append(f"| {i} | {r['claim']} | {r['paper']} | {r['measured']} | {r['verdict']} |")
    lines.append("")
    for i, r in enumerate(results, 1):
        lines += [f"## {i}. {r['claim']}", "", r["details_md"], ""]
    summary = Path(args.out) / "results" / "summary.md"
    summary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.rule("[bold]all examples")
    for i, r in enumerate(results, 1):
        console.print(f"[bold]{i}. {r['claim']}[/]\n   paper:    {r['paper']}\n   measured: {r['measured']}\n   verdict:  {r['verdict']}")
    console.print(f"total {total / 60:.1f} min; summary: {summary}")


if __name__ == "__main__":
    main()
