"""`irtrain quickstart`: the whole of irtrain on a task it generates, in minutes on a CPU.

1. task       multi-step arithmetic (`irtrain.tasks`): SFT conversations, preference pairs
              whose rejected answer carries a planted error, held-out problems
2. tokenizer  a byte-level BPE trained on the task text (`irtrain.toy.train_tokenizer`)
3. model      a tiny Llama built from a config, random init (`irtrain.toy.tiny_llama`)
4. prepare    `irtrain.prepare.run`: SFT chat shards, preference shards, held-out pairs
              and held-out traces
5. sft        `irtrain.sft.run` with early-exit checkpoints (--save-at) and --eval-pairs
6. dpo        `irtrain.dpo.run` from the final SFT checkpoint
7. evaluate   held-out task accuracy by greedy generation + exact checker; held-out
              preference accuracy (implicit reward against the untrained model)
8. score      `irtrain.score.run` on the held-out traces, for several checkpoints
9. rank       `irtrain.rank.run`: Kendall tau between the checkpoints' value rankings
10. report    OUT/report/report.md with the numbers, and PNG plots

Every stage calls the same `run(cfg)` a user calls (the CLI calls it too). `scale` shrinks
the data and the steps (the tests run a small scale through this same code). Each stage
either runs or raises.

The package: `irtrain.quickstart.plan` (the plan and the run's state), `.stages` (stages 1-9),
`.writeup` (stage 10: plots and report.md); `run` here.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from irtrain.config import QuickstartConfig
from irtrain.display import quiet_transformers
from irtrain.errors import ConfigError
from irtrain.quickstart.plan import MARKER, STAGES, Plan, Quickstart
from irtrain.quickstart.stages import (
    SHARD_SETS,
    models,
    stage_dpo,
    stage_evaluate,
    stage_model,
    stage_prepare,
    stage_rank,
    stage_score,
    stage_sft,
    stage_task,
    stage_tokenizer,
)
from irtrain.quickstart.writeup import stage_report

__all__ = [
    "run", "quiet_transformers", "Plan", "Quickstart", "MARKER", "STAGES", "SHARD_SETS", "models", "stage_task",
    "stage_tokenizer", "stage_model", "stage_prepare", "stage_sft", "stage_dpo", "stage_evaluate", "stage_score",
    "stage_rank", "stage_report",
]


def run(cfg: QuickstartConfig, *, console: Any = None) -> Path:
    """Run the quickstart as `cfg` says; return the report directory."""
    from rich.console import Console

    console = console or Console(highlight=False)
    quiet_transformers()
    if cfg.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {cfg.threads}")
    q = Quickstart(cfg, console)
    q.prepare_out()
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        _run_stages(q, t_start)
    finally:
        torch.set_num_threads(threads_before)
    report = q.p["report"] / "report.md"
    console.rule("[bold]done")
    console.print(f"quickstart finished in {q.timings['total']:.0f}s; report: [bold]{report}[/]")
    return q.p["report"]


def _run_stages(q: Quickstart, t_start: float) -> None:
    console, cfg = q.console, q.cfg
    console.print(f"[bold]irtrain quickstart[/] → {q.out}  (scale {cfg.scale:g}, seed {cfg.seed}, "
                  f"{torch.get_num_threads()} torch thread(s))")

    q.stage("task", lambda: stage_task(q))
    q.stage("tokenizer", lambda: stage_tokenizer(q))
    q.stage("model", lambda: stage_model(q))
    q.stage("prepare", lambda: stage_prepare(q))
    q.stage("sft", lambda: stage_sft(q))
    q.stage("dpo", lambda: stage_dpo(q))
    q.stage("evaluate", lambda: stage_evaluate(q))
    q.stage("score", lambda: stage_score(q))
    q.stage("rank", lambda: stage_rank(q))
    q.timings["total"] = round(time.perf_counter() - t_start, 2)
    q.stage("report", lambda: stage_report(q))
    q.timings["total"] = round(time.perf_counter() - t_start, 2)
    q.write_marker()
