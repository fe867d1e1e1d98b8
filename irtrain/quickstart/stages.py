"""The quickstart's stages, task to rank: each calls the same `run(cfg)` a user calls."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from irtrain import dpo, prepare, rank, score, sft
from irtrain.config import DPOConfig, PrepareConfig, RankConfig, ScoreConfig, SFTConfig
from irtrain.evaluation import model_segment_logps
from irtrain.quickstart.plan import Quickstart
from irtrain.report import pair_index, preference_accuracy
from irtrain.tasks import make_task, read_jsonl, task_accuracy, write_task
from irtrain.toy import tiny_llama, train_tokenizer
from irtrain.train.checkpoint import list_checkpoints


def stage_task(q: Quickstart) -> None:
    pl = q.plan
    q.task = make_task(pl.n_sft, pl.n_pref, pl.n_heldout, seed=pl.seed, demo_bug_rate=pl.demo_bug_rate)
    q.data = write_task(q.task, q.p["data"])
    q.console.print(f"{pl.n_sft} SFT conversations, {pl.n_pref} preference pairs, {pl.n_heldout} held-out problems "
                    f"(+ {pl.n_heldout} held-out pairs) in {q.p['data']}")
    ex = q.task.pref_rows()[0]
    q.console.print(f"[dim]example prompt:[/] {ex['prompt']}\n[dim]chosen:[/] {ex['chosen'][1]['content']!r}\n"
                    f"[dim]rejected ({ex['error']} error):[/] {ex['rejected'][1]['content']!r}")


def stage_tokenizer(q: Quickstart) -> None:
    train_tokenizer(q.task.texts(), q.p["tokenizer"], template="chatml", vocab_size=q.plan.vocab_size)
    q.console.print(f"byte-level BPE, vocabulary {q.plan.vocab_size}, ChatML template → {q.p['tokenizer']}")


def stage_model(q: Quickstart) -> None:
    pl = q.plan
    tiny_llama(q.p["tokenizer"], q.p["model"], hidden_size=pl.hidden_size, num_layers=pl.num_layers,
               num_heads=pl.num_heads, num_kv_heads=pl.num_kv_heads, intermediate_size=pl.intermediate_size,
               max_position_embeddings=pl.max_len, seed=pl.seed)
    n_params = _count_params(q.p["model"])
    q.results["model_params"] = n_params
    q.console.print(f"Llama, {pl.num_layers} layers × {pl.hidden_size} hidden, {n_params / 1e6:.2f} M parameters → {q.p['model']}")


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


#: (name, JSONL written by stage_task, prepare --format)
SHARD_SETS = (("sft", "sft", "chat"), ("pref", "pref", "preference"),
              ("heldout_pref", "heldout_pref", "preference"), ("heldout", "heldout", "chat"))


def stage_prepare(q: Quickstart) -> None:
    q.shards = {}
    for name, data, fmt in SHARD_SETS:
        out = q.p["shards"] / name
        prepare.run(PrepareConfig(inputs=[str(q.data[data])], out=str(out), tokenizer=str(q.p["tokenizer"]),
                                  format=fmt, max_len=q.plan.max_len))
        q.shards[name] = out


def stage_sft(q: Quickstart) -> None:
    pl = q.plan
    cfg = SFTConfig(model=str(q.p["model"]), data=[str(q.shards["sft"])], out=str(q.p["sft"]), loss="ce",
                    lr=pl.sft_lr, max_steps=pl.sft_steps, global_batch=pl.sft_batch, micro_batch=pl.sft_batch,
                    warmup_ratio=0.1, lr_schedule="cosine", save_at=",".join(map(str, pl.sft_save_at)),
                    eval_pairs=str(q.shards["heldout_pref"]), eval_steps=pl.eval_steps, seed=pl.seed,
                    tensorboard=False)
    res = sft.run(cfg)
    q.results["sft"] = {"final": str(res.last_checkpoint), "steps": res.steps}


def stage_dpo(q: Quickstart) -> None:
    pl = q.plan
    cfg = DPOConfig(model=q.results["sft"]["final"], data=[str(q.shards["pref"])], out=str(q.p["dpo"]), loss="sigmoid",
                    beta=pl.dpo_beta, lr=pl.dpo_lr, max_steps=pl.dpo_steps, global_batch=pl.dpo_batch,
                    micro_batch=pl.dpo_batch, warmup_ratio=0.1, lr_schedule="cosine",
                    eval_pairs=str(q.shards["heldout_pref"]), eval_steps=max(1, pl.dpo_steps // 10), seed=pl.seed,
                    tensorboard=False)
    res = dpo.run(cfg)
    assert not isinstance(res, list)  # a list only for the alternating schedule
    q.results["dpo"] = {"final": str(res.last_checkpoint), "steps": res.steps}


def models(q: Quickstart) -> dict[str, Path]:
    """The models to evaluate and score, in order: untrained, early SFT checkpoints, SFT, DPO."""
    out: dict[str, Path] = {"untrained": q.p["model"]}
    if "sft" in q.results:
        for ck in list_checkpoints(q.p["sft"]):
            step = int(ck.name.split("-")[-1])
            out["sft" if str(ck) == q.results["sft"]["final"] else f"sft@{step}"] = ck
    if "dpo" in q.results:
        out["dpo"] = Path(q.results["dpo"]["final"])
    return out


def stage_evaluate(q: Quickstart) -> None:
    ms = models(q)
    errors = [r["error"] for r in read_jsonl(q.data["heldout_pref"])]
    pairs = pair_index(q.shards["heldout_pref"])
    logps = {name: model_segment_logps(path, q.shards["heldout_pref"]) for name, path in ms.items()}
    ev: dict[str, Any] = {}
    for name, path in ms.items():
        acc = task_accuracy(path, q.task.heldout, max_new_tokens=q.plan.max_new_tokens)
        pref = preference_accuracy(logps[name], pairs, reference=None if name == "untrained" else logps["untrained"],
                                   beta=0.01, groups=errors)
        if "dpo" in ms and name == "dpo":
            # DPO's own view: its implicit reward against its reference (the SFT model)
            pref["vs_sft"] = preference_accuracy(logps[name], pairs, reference=logps["sft"], beta=q.plan.dpo_beta)
        ev[name] = {"task": acc, "pref": pref}
        line = f"{name:>12}: task accuracy {acc['accuracy']:.3f} (strict {acc['steps_accuracy']:.3f})"
        if "accuracy" in pref:
            line += f"   held-out pref accuracy vs untrained {pref['accuracy']:.3f}"
        line += f"   log-prob ranking {pref['logp_accuracy']:.3f}"
        q.console.print(line)
    q.results["eval"] = ev


def stage_score(q: Quickstart) -> None:
    """`irtrain score` of every model on the held-out traces (one table per model)."""
    from rich.console import Console

    from irtrain.score.table import print_summary

    tables, scored, summary = {}, {}, None
    for name, path in models(q).items():
        out = q.p["scores"] / name.replace("@", "-")  # rank labels a one-table directory by its name
        summary = score.run(ScoreConfig(data=str(q.shards["heldout"]), model=str(path), out=str(out), labels=[name]),
                            console=Console(quiet=True))
        tables[name] = str(out)
        scored[name] = next(iter(summary["models"].values()))
    if summary is not None:  # one table of every model, not one per score run
        print_summary({**summary, "models": scored}, q.console)
    q.results["scores"] = tables


def stage_rank(q: Quickstart) -> None:
    """`irtrain rank`: Kendall tau between the models' value rankings of the held-out states."""
    summary = rank.run(RankConfig(tables=list(q.results["scores"].values()), out=str(q.p["rank"]),
                                  bootstrap=q.plan.bootstrap, seed=q.plan.seed))
    q.results["rank"] = {k: summary.get(k) for k in ("states", "traces", "tau_pooled", "tau_trace_mean",
                                                      "tau_trace_median", "tau_pooled_ci", "files")}
    q.results["rank"]["bootstrap"] = q.plan.bootstrap
