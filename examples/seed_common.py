"""Shared plumbing of the seed-paper examples (examples/seed_*.py).

A `Lab` holds the quickstart's generated task, tokenizer, untrained model and shards (built
with the quickstart's own stages, `irtrain.quickstart`), and runs `irtrain sft` / `irtrain
dpo` / `irtrain score` / `irtrain rank` through their `run(cfg)` functions, exactly as the
CLI does. Runs are cached by their full config under ``OUT/runs/<name>`` (a rerun with the
same config reuses the finished run; CPU training here is deterministic), so examples that
share a baseline train it once when run together (`run_all.py`).

The base model. The paper's SFT starts from a pretrained model (Llama-3-8B, Mistral-7B),
and its arguments are about staying near that base; a randomly initialised model has no
prior worth keeping. So by default the examples first "pretrain" the tiny Llama: `irtrain
sft` (ce on every token) on a plain-text corpus of clean worked solutions of problems that
appear nowhere else, without the chat template (``Lab.base``, cached). The SFT stage then
teaches it the assistant format on the quickstart's demonstrations, half of them from the
sloppy demonstrator (`irtrain.tasks`), and DPO follows on the preference pairs.

Metrics (as in the quickstart's report):
- held-out task accuracy: greedy generation on the held-out problems, exact checker;
- held-out preference accuracy: the implicit reward beta*log(pi/pi_base) ranks the correct
  answer above the one with the planted error (FORMULAS.md `eval/pref_accuracy`, one fixed
  reference, the base, for every model), and the reference-free log-prob ranking.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from irtrain import dpo, prepare, rank, score, sft
from irtrain.config import (
    DPOConfig,
    PrepareConfig,
    QuickstartConfig,
    RankConfig,
    ScoreConfig,
    SFTConfig,
    TrainConfig,
    config_to_dict,
)
from irtrain.evaluation import model_segment_logps
from irtrain.models import model_hash
from irtrain.quickstart import (
    SHARD_SETS,
    Quickstart,
    quiet_transformers,
    stage_model,
    stage_prepare,
    stage_task,
    stage_tokenizer,
)
from irtrain.report import md_table, pair_index, preference_accuracy, read_metrics
from irtrain.shards import Segment, ShardSet, write_shard_set
from irtrain.tasks import generate_problems, make_task, read_jsonl, task_accuracy, write_jsonl
from irtrain.toy import tiny_llama

console = Console(highlight=False)


@dataclass
class Run:
    name: str
    out: Path
    final: Path  # the final checkpoint (from_pretrained-loadable)
    seconds: float

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.out)

    def checkpoint(self, step: int) -> Path:
        return self.out / f"checkpoint-{step:07d}"


class Lab:
    """The quickstart's data and model, and cached training runs on them."""

    def __init__(self, out: str | Path, *, scale: float = 1.0, seed: int = 0, demo_bug_rate: float | None = None,
                 threads: int = 1, pretrain: bool = True, base_from: Lab | None = None, init_seed: int | None = None,
                 pretrain_format: str = "text"):
        quiet_transformers()
        if threads:
            torch.set_num_threads(threads)
        self.root = Path(out)
        name = "base" if demo_bug_rate is None else f"base-bug{demo_bug_rate:g}"
        self.q = Quickstart(QuickstartConfig(out=str(self.root / name), scale=scale, seed=seed, threads=threads), console)
        if demo_bug_rate is not None:
            self.q.plan = dataclasses.replace(self.q.plan, demo_bug_rate=demo_bug_rate)
        self.plan = self.q.plan
        self.runs = self.root / "runs"
        self._logps: dict[str, Any] = {}
        self._eval: dict[str, dict[str, Any]] = {}
        self._build()
        self.untrained = self.q.p["model"]
        if pretrain_format not in ("text", "chat"):
            raise ValueError(f"pretrain_format must be text or chat, got {pretrain_format!r}")
        self.pretrain_format = pretrain_format
        self.tag = "" if pretrain_format == "text" else "-chat"
        if init_seed is not None and init_seed != seed:  # another prior: the same architecture, another init
            pl = self.plan
            self.untrained = self.q.out / f"model-init-seed{init_seed}"
            self.tag += f"-seed{init_seed}"
            if not (self.untrained / "config.json").is_file():
                tiny_llama(self.q.p["tokenizer"], self.untrained, hidden_size=pl.hidden_size, num_layers=pl.num_layers,
                           num_heads=pl.num_heads, num_kv_heads=pl.num_kv_heads, intermediate_size=pl.intermediate_size,
                           max_position_embeddings=pl.max_len, seed=init_seed)
        if base_from is not None:  # same task problems, tokenizer and untrained model: share the base
            self.base = base_from.base
        else:
            self.base = self._pretrain() if pretrain else self.untrained

    # ------------------------------------------------------------------ data and model
    def _build(self) -> None:
        """The quickstart's stages task -> tokenizer -> model -> prepare (reused when the plan is unchanged)."""
        q, pl = self.q, self.plan
        stamp = q.out / "lab.json"
        want = json.dumps(dataclasses.asdict(pl), sort_keys=True, default=str)
        if stamp.is_file() and stamp.read_text() == want:
            q.task = make_task(pl.n_sft, pl.n_pref, pl.n_heldout, seed=pl.seed, demo_bug_rate=pl.demo_bug_rate)
            q.data = {name: q.p["data"] / f"{name}.jsonl" for name in ("sft", "pref", "heldout", "heldout_pref")}
            q.shards = {name: q.p["shards"] / name for name, _, _ in SHARD_SETS}
            return
        console.rule(f"[bold]lab: task, tokenizer, model, shards → {q.out}")
        q.prepare_out()
        stage_task(q)
        stage_tokenizer(q)
        stage_model(q)
        stage_prepare(q)
        stamp.write_text(want)

    def _pretrain(self) -> Path:
        """The base model: the untrained tiny Llama after `irtrain sft` (ce, every token) on a
        plain-text corpus of clean worked solutions of fresh problems (no chat template: it
        learns arithmetic, not the assistant format), as many as the SFT set, same steps and lr.
        With ``pretrain_format="chat"`` the corpus is the same conversations rendered with the
        chat template (a base that already knows the assistant format, every token trained)."""
        pl, task = self.plan, self.q.task
        fresh = generate_problems(pl.n_sft, seed=pl.seed * 1000 + 7, spec=task.spec,
                                  exclude=task.sft + task.pref + task.heldout)
        shards = self.q.out / "extra-shards" / f"pretrain-{self.pretrain_format}"
        if not (shards / "manifest.json").is_file():
            from transformers import AutoTokenizer

            if self.pretrain_format == "chat":
                tok = AutoTokenizer.from_pretrained(str(self.q.p["tokenizer"]))
                texts = [tok.apply_chat_template(p.messages(), tokenize=False) for p in fresh]
            else:
                texts = [f"{p.prompt}\n{p.solution()}" for p in fresh]
            write_text_shards(shards, texts, self.q.p["model"], pl.max_len,
                              ShardSet(self.shards["sft"]).tokenizer_hash)  # same tokenizer as prepare's shards
        run = self._train(f"pretrain{self.tag}", self.sft_config(model=str(self.untrained), data=[str(shards)],
                                                                 eval_pairs=None), sft.run)
        return run.final

    @property
    def init(self) -> Path:
        """Where SFT starts: the pretrained base (or the untrained model with pretrain=False)."""
        return self.base

    @property
    def shards(self) -> dict[str, Path]:
        return self.q.shards

    def prepare(self, name: str, rows: list[dict[str, Any]], fmt: str) -> Path:
        """Write rows as JSONL and run `irtrain prepare` on them (cached by prepare itself)."""
        src = write_jsonl(self.q.out / "extra" / f"{name}.jsonl", rows)
        out = self.q.out / "extra-shards" / name
        prepare.run(PrepareConfig(inputs=[str(src)], out=str(out), tokenizer=str(self.q.p["tokenizer"]), format=fmt,
                                  max_len=self.plan.max_len))
        return out

    # ------------------------------------------------------------------ training runs
    def sft_config(self, **over: Any) -> SFTConfig:
        pl = self.plan
        base = dict(model=None, data=[str(self.shards["sft"])], loss="ce", lr=pl.sft_lr,
                    max_steps=pl.sft_steps, global_batch=pl.sft_batch, micro_batch=pl.sft_batch, warmup_ratio=0.1,
                    lr_schedule="cosine", eval_pairs=str(self.shards["heldout_pref"]), eval_steps=pl.eval_steps,
                    seed=pl.seed, tensorboard=False)
        base.update(over)
        base["model"] = str(base["model"] or self.init)
        return SFTConfig(**base)

    def dpo_config(self, model: str | Path, **over: Any) -> DPOConfig:
        pl = self.plan
        base = dict(model=str(model), data=[str(self.shards["pref"])], loss="sigmoid", beta=pl.dpo_beta, lr=pl.dpo_lr,
                    max_steps=pl.dpo_steps, global_batch=pl.dpo_batch, micro_batch=pl.dpo_batch, warmup_ratio=0.1,
                    lr_schedule="cosine", eval_pairs=str(self.shards["heldout_pref"]), eval_steps=max(1, pl.dpo_steps // 10),
                    seed=pl.seed, tensorboard=False)
        base.update(over)
        return DPOConfig(**base)

    def sft(self, name: str, **over: Any) -> Run:
        return self._train(name, self.sft_config(**over), sft.run)

    def dpo(self, name: str, model: str | Path, **over: Any) -> Run:
        return self._train(name, self.dpo_config(model, **over), dpo.run)

    def _train(self, name: str, cfg: TrainConfig, run_fn: Any) -> Run:
        """Run `run_fn(cfg)` into OUT/runs/<name>, or reuse the finished run made with the same config."""
        out = self.runs / name
        cfg = dataclasses.replace(cfg, out=str(out))
        key = json.dumps({"kind": type(cfg).__name__, **config_to_dict(cfg), "inputs": _fingerprints(cfg)},
                         sort_keys=True, default=str)
        stamp = out / "example-run.json"
        if stamp.is_file():
            saved = json.loads(stamp.read_text())
            if saved["key"] == key and Path(saved["final"]).is_dir():
                console.print(f"[dim]{name}: reusing the finished run in {out}[/]")
                return Run(name, out, Path(saved["final"]), saved["seconds"])
        if out.exists():
            shutil.rmtree(out)
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        result = run_fn(cfg)
        if isinstance(result, list):  # the alternating schedule returns every stage's result
            result = result[-1]
        seconds = round(time.perf_counter() - t0, 1)
        final = Path(result.last_checkpoint)
        stamp.write_text(json.dumps({"key": key, "final": str(final), "seconds": seconds}))
        return Run(name, out, final, seconds)

    # ------------------------------------------------------------------ evaluation
    def _segment_logps(self, model: Path) -> Any:
        k = str(model)
        if k not in self._logps:
            self._logps[k] = model_segment_logps(model, self.shards["heldout_pref"])
        return self._logps[k]

    def evaluate(self, model: str | Path) -> dict[str, float]:
        """Held-out task accuracy and held-out preference accuracy of a model."""
        model = Path(model)
        if str(model) in self._eval:
            return self._eval[str(model)]
        acc = task_accuracy(model, self.q.task.heldout, max_new_tokens=self.plan.max_new_tokens)
        errors = [r["error"] for r in read_jsonl(self.q.data["heldout_pref"])]
        pref = preference_accuracy(self._segment_logps(model), pair_index(self.shards["heldout_pref"]),
                                   reference=self._segment_logps(self.init), groups=errors)
        res = {"task": acc["accuracy"], "task_strict": acc["steps_accuracy"], "pref": pref["accuracy"],
               "logp_rank": pref["logp_accuracy"],
               **{f"pref_{k}": v["accuracy"] for k, v in pref["by_group"].items()}}
        self._eval[str(model)] = res
        return res

    def score_rank(self, name: str, models: dict[str, Path]) -> dict[str, Any]:
        """`irtrain score` every model on the held-out traces, then `irtrain rank` them."""
        root = self.root / "tau" / name
        if root.exists():
            shutil.rmtree(root)
        tables = []
        for label, path in models.items():
            out = root / "scores" / label
            score.run(ScoreConfig(data=str(self.shards["heldout"]), model=str(path), out=str(out)))
            tables.append(str(out))
        return rank.run(RankConfig(tables=tables, out=str(root / "rank"), bootstrap=200, seed=self.plan.seed))


def write_text_shards(out: Path, texts: list[str], model_dir: Path, max_len: int, tokenizer_hash: str) -> Path:
    """Plain-text documents (each ending with EOS, every token trained) packed greedily into
    rows of at most `max_len` tokens, written with `irtrain.shards.write_shard_set` (the
    reference writer of the shard format, meant for pre-tokenized data)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows: list[list[Segment]] = [[]]
    used = 0
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids or ids[-1] != tok.eos_token_id:
            ids.append(tok.eos_token_id)
        ids = ids[:max_len]
        if used + len(ids) > max_len:
            rows.append([])
            used = 0
        rows[-1].append(Segment(input_ids=ids, labels=list(ids), example=i))
        used += len(ids)
    write_shard_set(out, "prompt-completion", rows, max_len=max_len, tokenizer_hash=tokenizer_hash,
                    config={"what": "plain-text pretraining corpus (examples/seed_common.py)"})
    return out


def _fingerprints(cfg: TrainConfig) -> dict[str, str]:
    """What a run's result depends on besides its config: the starting model's weights and
    the data's content (so a cached run is reused only when its inputs are unchanged)."""
    fp = {"model": model_hash(cfg.model)}
    for d in [*cfg.data, cfg.eval_pairs, getattr(cfg, "joint_sft", None), getattr(cfg, "alternate_with", None)]:
        if d:
            fp[str(d)] = ShardSet(d).content_hash
    return fp


# --------------------------------------------------------------------------- reporting
def value_s0(run: Run, step: int, window: int = 5) -> float:
    """Mean `value/s0` of the SFT run's logged steps in (step - window, step]."""
    xs = [m["value/s0"] for m in run.metrics() if "value/s0" in m and step - window < m["step"] <= step
          and isinstance(m["value/s0"], (int, float))]
    return sum(xs) / len(xs) if xs else float("nan")


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """Print a rich table and return the same as markdown."""
    t = Table(title=title, title_justify="left")
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*[_cell(v) for v in r])
    console.print(t)
    return md_table(header, rows)


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def conclude(out: str | Path, example: str, *, claim: str, paper: str, measured: str, verdict: str,
             details_md: str, seconds: float) -> dict[str, Any]:
    """Print the paper's expected outcome next to the measured one; save both for run_all/README."""
    console.rule(f"[bold]{example}")
    console.print(f"[bold]claim:[/]    {claim}")
    console.print(f"[bold]paper:[/]    {paper}")
    console.print(f"[bold]measured:[/] {measured}")
    console.print(f"[bold]verdict:[/]  {verdict}   [dim]({seconds:.0f}s)[/]")
    res = {"example": example, "claim": claim, "paper": paper, "measured": measured, "verdict": verdict,
           "details_md": details_md, "seconds": round(seconds, 1)}
    path = Path(out) / "results" / f"{example}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, ensure_ascii=False), encoding="utf-8")
    return res


def parse_args(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--out", default="examples-out", help="Working directory (shared by the examples; runs are cached there).")
    p.add_argument("--scale", type=float, default=1.0, help="Scale of data and steps (as irtrain quickstart --scale).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="Torch CPU threads (0 = torch's default).")
    return p.parse_args()


def main_of(run_example: Any, doc: str) -> None:
    """`python examples/seed_X.py [--out DIR] [--scale S]`."""
    args = parse_args(doc)
    sys.exit(0 if run_example(args.out, scale=args.scale, seed=args.seed, threads=args.threads) else 1)
