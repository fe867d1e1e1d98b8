"""The plan of a quickstart run (every size and hyperparameter, from `--scale`) and its
state (paths, stage timings, results)."""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from irtrain.config import QuickstartConfig
from irtrain.errors import ConfigError

MARKER = "quickstart.json"
STAGES = ("task", "tokenizer", "model", "prepare", "sft", "dpo", "evaluate", "score", "rank", "report")


@dataclass
class Plan:
    """Every size and hyperparameter of a quickstart run, derived from `scale`."""

    scale: float
    seed: int
    # data
    n_sft: int
    n_pref: int
    n_heldout: int
    demo_bug_rate: float = 0.5  # half the SFT demonstrations come from the sloppy demonstrator
    vocab_size: int = 384
    # model
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    # prepare
    max_len: int = 256
    # sft
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch: int = 6  # packed rows per step (about 5 conversations each)
    sft_save_at: list[int] = field(default_factory=list)
    eval_steps: int = 30
    # dpo
    dpo_steps: int = 200
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.5
    dpo_batch: int = 8  # packed rows per step (2 pairs each)
    # evaluation
    max_new_tokens: int = 48
    bootstrap: int = 200  # rank: bootstrap resamples for the tau confidence intervals

    @classmethod
    def at(cls, scale: float, seed: int = 0) -> Plan:
        if not (scale > 0 and math.isfinite(scale)):
            raise ConfigError(f"--scale must be > 0, got {scale}")

        def n(x: float, lo: int, power: float = 1.0) -> int:
            return max(lo, int(round(x * scale ** power)))

        # Steps shrink more slowly than the data: a shortened run (tests) must still learn.
        sft_steps = n(300, 12, 0.5)
        save_at = sorted({max(1, round(sft_steps * f)) for f in (0.05, 0.1, 0.25, 0.5)} - {sft_steps})
        return cls(
            scale=scale, seed=seed,
            n_sft=n(4000, 200), n_pref=n(2000, 100), n_heldout=n(200, 48),
            sft_steps=sft_steps, sft_save_at=save_at, eval_steps=max(1, sft_steps // 10),
            dpo_steps=n(200, 8, 0.5),
        )


class Quickstart:
    """The run's state: paths, stage timings, results."""

    def __init__(self, cfg: QuickstartConfig, console: Any):
        self.cfg = cfg
        self.console = console
        self.plan = Plan.at(cfg.scale, cfg.seed)
        self.out = Path(cfg.out)
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self.task: Any = None  # irtrain.tasks.TaskData, set by the task stage
        self.data: dict[str, Path] = {}  # JSONL files by name
        self.shards: dict[str, Path] = {}  # shard directories by name
        self.p: dict[str, Path] = {
            "data": self.out / "data", "tokenizer": self.out / "tokenizer", "model": self.out / "model-init",
            "shards": self.out / "shards", "sft": self.out / "sft", "dpo": self.out / "dpo",
            "scores": self.out / "scores", "rank": self.out / "rank", "report": self.out / "report",
        }

    # ------------------------------------------------------------------ plumbing
    def prepare_out(self) -> None:
        """A fresh output directory; a previous quickstart run in it is replaced, anything else is refused."""
        if self.out.exists():
            if not self.out.is_dir():
                raise ConfigError(f"--out {self.out} exists and is not a directory")
            if any(self.out.iterdir()) and not (self.out / MARKER).is_file():
                raise ConfigError(f"--out {self.out} exists and is not a quickstart output; pick another --out")
            for path in self.p.values():
                if path.exists():
                    shutil.rmtree(path)
        self.out.mkdir(parents=True, exist_ok=True)
        self.write_marker()

    def write_marker(self) -> None:
        (self.out / MARKER).write_text(json.dumps({
            "plan": asdict(self.plan), "timings_s": self.timings, "results": self.results,
        }, indent=2, default=str), encoding="utf-8")

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one stage with a header and its wall time (a stage that fails raises)."""
        i = STAGES.index(name) + 1
        self.console.rule(f"[bold][{i}/{len(STAGES)}] {name}")
        t0 = time.perf_counter()
        try:
            result = fn()
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 2)
            self.write_marker()
        self.console.print(f"[dim]{name} took {self.timings[name]:.1f}s[/]")
        return result
