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
the data and the steps (the tests run a small scale through this same code).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from irtrain.errors import ConfigError, NotBuiltError

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
    """The run's state: paths, stage timings, results, what is not built yet."""

    def __init__(self, cfg: Any, console: Any):
        self.cfg = cfg
        self.console = console
        self.plan = Plan.at(cfg.scale, cfg.seed)
        self.out = Path(cfg.out)
        self.timings: dict[str, float] = {}
        self.missing: dict[str, str] = {}  # stage -> why it did not run
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
            "plan": asdict(self.plan), "timings_s": self.timings, "not_built": self.missing,
            "results": self.results,
        }, indent=2, default=str), encoding="utf-8")

    def stage(self, name: str, fn: Callable[[], Any], *, needs: tuple[str, ...] = ()) -> Any:
        """Run one stage with a header and its wall time; skip it when a stage it needs did not run."""
        i = STAGES.index(name) + 1
        blocked = [s for s in needs if s in self.missing]
        if blocked:
            self.missing[name] = f"needs `{blocked[0]}`"
            self.console.rule(f"[dim][{i}/{len(STAGES)}] {name}: skipped (needs {blocked[0]})")
            return None
        self.console.rule(f"[bold][{i}/{len(STAGES)}] {name}")
        t0 = time.perf_counter()
        try:
            result = fn()
        except NotBuiltError as e:
            self.missing[name] = str(e)
            self.console.print(f"[yellow]not built yet:[/] {e}")
            return None
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 2)
            self.write_marker()
        self.console.print(f"[dim]{name} took {self.timings[name]:.1f}s[/]")
        return result


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging knobs moved
        pass


def run(cfg: Any, *, console: Any = None) -> Path:
    """Run the quickstart as `cfg` (`QuickstartConfig`) says; return the report directory.

    Raises `NotBuiltError` at the end (after writing a partial report) when a command the
    chain needs has not landed yet, naming it."""
    from rich.console import Console

    console = console or Console(highlight=False)
    _quiet_transformers()
    if cfg.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {cfg.threads}")
    q = Quickstart(cfg, console)
    q.prepare_out()
    t_start = time.perf_counter()
    import torch

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
    if q.missing:
        first = next(iter(q.missing.items()))
        raise NotBuiltError(
            f"quickstart stopped short: {', '.join(f'{k} ({v})' for k, v in q.missing.items())}. "
            f"The partial report is at {report}. First missing: {first[0]}")
    return q.p["report"]


def _run_stages(q: Quickstart, t_start: float) -> None:
    console, cfg = q.console, q.cfg
    import torch

    console.print(f"[bold]irtrain quickstart[/] → {q.out}  (scale {cfg.scale:g}, seed {cfg.seed}, "
                  f"{torch.get_num_threads()} torch thread(s))")

    q.stage("task", lambda: stage_task(q))
    q.stage("tokenizer", lambda: stage_tokenizer(q))
    q.stage("model", lambda: stage_model(q))
    q.stage("prepare", lambda: stage_prepare(q))
    q.stage("sft", lambda: stage_sft(q), needs=("prepare",))
    q.stage("dpo", lambda: stage_dpo(q), needs=("sft",))
    q.stage("evaluate", lambda: stage_evaluate(q), needs=("prepare",))
    q.stage("score", lambda: stage_score(q), needs=("prepare",))
    q.stage("rank", lambda: stage_rank(q), needs=("score",))
    q.timings["total"] = round(time.perf_counter() - t_start, 2)
    q.stage("report", lambda: stage_report(q))
    q.timings["total"] = round(time.perf_counter() - t_start, 2)
    q.write_marker()


# =========================================================================== stages
def stage_task(q: Quickstart) -> None:
    from irtrain.tasks import make_task, write_task

    pl = q.plan
    q.task = make_task(pl.n_sft, pl.n_pref, pl.n_heldout, seed=pl.seed, demo_bug_rate=pl.demo_bug_rate)
    q.data = write_task(q.task, q.p["data"])
    q.console.print(f"{pl.n_sft} SFT conversations, {pl.n_pref} preference pairs, {pl.n_heldout} held-out problems "
                    f"(+ {pl.n_heldout} held-out pairs) in {q.p['data']}")
    ex = q.task.pref_rows()[0]
    q.console.print(f"[dim]example prompt:[/] {ex['prompt']}\n[dim]chosen:[/] {ex['chosen'][1]['content']!r}\n"
                    f"[dim]rejected ({ex['error']} error):[/] {ex['rejected'][1]['content']!r}")


def stage_tokenizer(q: Quickstart) -> None:
    from irtrain.toy import train_tokenizer

    train_tokenizer(q.task.texts(), q.p["tokenizer"], template="chatml", vocab_size=q.plan.vocab_size)
    q.console.print(f"byte-level BPE, vocabulary {q.plan.vocab_size}, ChatML template → {q.p['tokenizer']}")


def stage_model(q: Quickstart) -> None:
    from irtrain.toy import tiny_llama

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
    from irtrain import prepare
    from irtrain.config import PrepareConfig

    q.shards = {}
    for name, data, fmt in SHARD_SETS:
        out = q.p["shards"] / name
        prepare.run(PrepareConfig(inputs=[str(q.data[data])], out=str(out), tokenizer=str(q.p["tokenizer"]),
                                  format=fmt, max_len=q.plan.max_len))
        q.shards[name] = out


def stage_sft(q: Quickstart) -> None:
    from irtrain import sft
    from irtrain.config import SFTConfig

    pl = q.plan
    cfg = SFTConfig(model=str(q.p["model"]), data=[str(q.shards["sft"])], out=str(q.p["sft"]), loss="ce",
                    lr=pl.sft_lr, max_steps=pl.sft_steps, global_batch=pl.sft_batch, micro_batch=pl.sft_batch,
                    warmup_ratio=0.1, lr_schedule="cosine", save_at=",".join(map(str, pl.sft_save_at)),
                    eval_pairs=str(q.shards["heldout_pref"]), eval_steps=pl.eval_steps, seed=pl.seed,
                    tensorboard=False)
    res = sft.run(cfg)
    q.results["sft"] = {"final": str(res.last_checkpoint), "steps": res.steps}


def stage_dpo(q: Quickstart) -> None:
    from irtrain import dpo
    from irtrain.config import DPOConfig

    pl = q.plan
    cfg = DPOConfig(model=q.results["sft"]["final"], data=[str(q.shards["pref"])], out=str(q.p["dpo"]), loss="sigmoid",
                    beta=pl.dpo_beta, lr=pl.dpo_lr, max_steps=pl.dpo_steps, global_batch=pl.dpo_batch,
                    micro_batch=pl.dpo_batch, warmup_ratio=0.1, lr_schedule="cosine",
                    eval_pairs=str(q.shards["heldout_pref"]), eval_steps=max(1, pl.dpo_steps // 10), seed=pl.seed,
                    tensorboard=False)
    res = dpo.run(cfg)
    q.results["dpo"] = {"final": str(res.last_checkpoint), "steps": res.steps}


def models(q: Quickstart) -> dict[str, Path]:
    """The models to evaluate and score, in order: untrained, early SFT checkpoints, SFT, DPO."""
    from irtrain.train.checkpoint import list_checkpoints

    out: dict[str, Path] = {"untrained": q.p["model"]}
    if "sft" in q.results:
        for ck in list_checkpoints(q.p["sft"]):
            step = int(ck.name.split("-")[-1])
            out["sft" if str(ck) == q.results["sft"]["final"] else f"sft@{step}"] = ck
    if "dpo" in q.results:
        out["dpo"] = Path(q.results["dpo"]["final"])
    return out


def stage_evaluate(q: Quickstart) -> None:
    from irtrain.report import pair_index, preference_accuracy, segment_logps
    from irtrain.tasks import read_jsonl, task_accuracy

    ms = models(q)
    errors = [r["error"] for r in read_jsonl(q.data["heldout_pref"])]
    pairs = pair_index(q.shards["heldout_pref"])
    logps = {name: segment_logps(path, q.shards["heldout_pref"]) for name, path in ms.items()}
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
    from irtrain import score
    from irtrain.config import ScoreConfig

    tables = {}
    for name, path in models(q).items():
        out = q.p["scores"] / name.replace("@", "-")  # rank labels a one-table directory by its name
        score.run(ScoreConfig(data=str(q.shards["heldout"]), model=str(path), out=str(out)))
        tables[name] = str(out)
    q.results["scores"] = tables


def stage_rank(q: Quickstart) -> None:
    """`irtrain rank`: Kendall tau between the models' value rankings of the held-out states."""
    from irtrain import rank
    from irtrain.config import RankConfig

    summary = rank.run(RankConfig(tables=list(q.results["scores"].values()), out=str(q.p["rank"]),
                                  bootstrap=q.plan.bootstrap, seed=q.plan.seed))
    q.results["rank"] = {k: summary.get(k) for k in ("states", "traces", "tau_pooled", "tau_trace_mean",
                                                      "tau_trace_median", "tau_pooled_ci", "files")}


def stage_report(q: Quickstart) -> Path:
    """Plots and report.md from what the stages produced (metrics.jsonl files, evaluation, rank)."""
    from irtrain import report as R

    d = q.p["report"]
    d.mkdir(parents=True, exist_ok=True)
    pl = q.plan
    sft_rows, dpo_rows = R.read_metrics(q.p["sft"]), R.read_metrics(q.p["dpo"])
    plots: dict[str, str] = {}
    win = max(1, pl.sft_steps // 25)

    # losses
    panels = []
    for title, rows, color in (("SFT loss (ce)", sft_rows, R.COLORS["sft"]), ("DPO loss (sigmoid)", dpo_rows, R.COLORS["dpo"])):
        x, y = R.series(rows, "loss")
        if x:
            panels.append({"title": title, "ylabel": "loss", "lines": [
                {"x": x, "y": y, "color": color, "label": "per step", "style": "-"},
                {"x": x, "y": R.smooth(y, win), "color": "black", "label": f"mean of {win}"}]})
    if panels:
        plots["loss"] = R.plot_lines(d / "loss.png", panels).name

    # value/s0
    panels = []
    for title, rows, color, marks in (("SFT: value/s0 = V(s0)", sft_rows, R.COLORS["sft"], pl.sft_save_at),
                                      ("DPO: value/s0", dpo_rows, R.COLORS["dpo"], [])):
        x, y = R.series(rows, "value/s0")
        if x:
            panels.append({"title": title, "ylabel": "V(s0)", "lines": [{"x": x, "y": y, "color": color}],
                           "vlines": [(s, f"ckpt {s}") for s in marks]})
    if panels:
        plots["value_s0"] = R.plot_lines(d / "value_s0.png", panels).name

    ev = q.results.get("eval", {})
    names = list(ev)
    # held-out preference accuracy: during training (each stage against its start) and per model
    lines = []
    for label, rows, color in (("during SFT (vs untrained)", sft_rows, R.COLORS["sft"]),
                               ("during DPO (vs SFT model)", dpo_rows, R.COLORS["dpo"])):
        x, y = R.series(rows, "eval/pref_accuracy")
        if x:
            lines.append({"x": x, "y": y, "label": label, "color": color, "style": "o-"})
    if lines:
        plots["pref_curve"] = R.plot_lines(d / "pref_accuracy_curve.png", [
            {"title": "held-out eval/pref_accuracy during training", "ylabel": "accuracy", "lines": lines}]).name
    if names:
        plots["pref"] = R.plot_bars(d / "pref_accuracy.png", names, {
            "implicit reward vs untrained": [ev[n]["pref"].get("accuracy", float("nan")) for n in names],
            "log-prob ranking": [ev[n]["pref"]["logp_accuracy"] for n in names]},
            ylabel="held-out preference accuracy", title="held-out preference accuracy, before and after DPO").name
        plots["task"] = R.plot_bars(d / "task_accuracy.png", names, {
            "final answer exact": [ev[n]["task"]["accuracy"] for n in names],
            "every step right": [ev[n]["task"]["steps_accuracy"] for n in names]},
            ylabel="held-out task accuracy", title=f"held-out task accuracy (greedy, {pl.n_heldout} problems)").name

    # tau heatmap: the one `irtrain rank` drew
    tau = _rank_summary(q)
    if tau.get("heatmap"):
        shutil.copy(tau["heatmap"], d / "kendall_tau.png")
        plots["tau"] = "kendall_tau.png"

    md = _report_markdown(q, plots, tau, sft_rows, dpo_rows)
    (d / "report.md").write_text(md, encoding="utf-8")
    (d / "results.json").write_text(json.dumps({"plan": asdict(pl), "results": q.results, "timings_s": q.timings,
                                                "not_built": q.missing}, indent=2, default=str), encoding="utf-8")
    q.console.print(f"report → {d / 'report.md'}")
    return d


def _rank_summary(q: Quickstart) -> dict[str, Any]:
    """What `irtrain rank` wrote: its summary and the heatmap (empty when rank did not run)."""
    if "rank" not in q.results:
        return {}
    out = dict(q.results["rank"])
    png = q.p["rank"] / (out.get("files") or {}).get("heatmap", "tau_heatmap.png")
    if png.is_file():
        out["heatmap"] = png
    return out


def _fmt(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _report_markdown(q: Quickstart, plots: dict[str, str], tau: dict[str, Any], sft_rows: list, dpo_rows: list) -> str:
    from irtrain.report import md_table, series

    pl = q.plan
    ev = q.results.get("eval", {})
    L = ["# irtrain quickstart report", ""]
    L.append(f"Scale {pl.scale:g}, seed {pl.seed}. Total time {q.timings.get('total', float('nan')):.0f} s "
             f"(stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in q.timings.items() if k != "total") + ").")
    L.append("")
    if q.missing:
        L += ["**Not everything ran.** Stages that did not run and why:", ""]
        L += [f"- `{k}`: {v}" for k, v in q.missing.items()]
        L.append("")
    L += ["## The task", "",
          f"Multi-step arithmetic generated by `irtrain.tasks` (seed {pl.seed}): {pl.n_sft} SFT conversations, "
          f"{pl.n_pref} preference pairs, {pl.n_heldout} held-out problems (and one held-out pair per held-out "
          "problem); no problem appears in two sets. Like real SFT corpora, the demonstrations are imperfect: "
          f"{pl.demo_bug_rate:.0%} of them come from a sloppy demonstrator who gets every subtraction that needs a "
          "borrow wrong the same way (13 - 5 = 12). The rejected answer of a pair is that demonstrator's where it "
          "applies (`bug`), otherwise a planted error: a wrong step carried through (`step`), a wrong step the chain "
          "ignores (`slip`) or a wrong final answer (`final`). So the chosen answer is always verifiably better.", ""]
    if getattr(q, "task", None) is not None:
        ex = q.task.pref_rows()[0]
        L += ["```", f"user:     {ex['prompt']}", "chosen:   " + ex["chosen"][1]["content"].replace("\n", "\n          "),
              f"rejected ({ex['error']} error):", "          " + ex["rejected"][1]["content"].replace("\n", "\n          "), "```", ""]
    L += ["## The model and the runs", "",
          f"A Llama built from a config ({pl.num_layers} layers, hidden {pl.hidden_size}, "
          f"{q.results.get('model_params', 0) / 1e6:.2f} M parameters), random init, byte-level BPE of {pl.vocab_size} "
          "trained on the task text.", "",
          f"- `irtrain sft`: loss ce, lr {pl.sft_lr:g} (cosine, 10% warmup), {pl.sft_steps} steps of {pl.sft_batch} packed rows "
          f"(max_len {pl.max_len}), early-exit checkpoints at steps {', '.join(map(str, pl.sft_save_at))}.",
          f"- `irtrain dpo`: loss sigmoid, β {pl.dpo_beta:g}, lr {pl.dpo_lr:g}, {pl.dpo_steps} steps of {pl.dpo_batch} packed rows, "
          "from the final SFT checkpoint (its reference).", ""]

    if ev:
        L += ["## Held-out task accuracy", "",
              f"Greedy generation on the {pl.n_heldout} held-out problems, checked exactly (`irtrain.tasks.check_answer`: "
              "the final answer; strict: every step right as well).", ""]
        L.append(md_table(["model", "task accuracy", "strict (every step)"],
                          [[n, ev[n]["task"]["accuracy"], ev[n]["task"]["steps_accuracy"]] for n in ev]))
        L.append("")
        if "sft" in ev:
            u, s = ev["untrained"]["task"]["accuracy"], ev["sft"]["task"]["accuracy"]
            verdict = "above" if s > u else "NOT above"
            L.append(f"**After SFT the task accuracy is {verdict} the untrained model's: {s:.3f} vs {u:.3f}.**")
        if "dpo" in ev:
            L.append(f"After DPO: {ev['dpo']['task']['accuracy']:.3f}.")
        L.append("")
        samples = ev.get("dpo", ev.get("sft", ev["untrained"]))["task"]["samples"]
        if samples:
            L += ["A sample generation of the last model:", "", "```", samples[0]["prompt"],
                  samples[0]["response"], "```", ""]

        L += ["## Held-out preference accuracy", "",
              "On one held-out pair per held-out problem: the fraction of pairs whose implicit reward "
              "`β·log π/π_ref` ranks the correct answer above the one with the planted error, with the untrained model "
              "as π_ref for every model (FORMULAS.md, `eval/pref_accuracy`); and the reference-free ranking "
              "`log π(chosen) > log π(rejected)`.", ""]
        kinds = sorted({k for n in ev for k in ev[n]["pref"].get("by_group", {})})
        rows = []
        for n in ev:
            p = ev[n]["pref"]
            rows.append([n, p.get("accuracy"), p.get("loss"), p["logp_accuracy"]]
                        + [p.get("by_group", {}).get(k, {}).get("accuracy") for k in kinds])
        L.append(md_table(["model", "pref accuracy (vs untrained)", "pref loss (β=0.01)", "log-prob ranking"]
                          + [f"accuracy, `{k}` errors" for k in kinds], rows))
        L.append("")
        if "dpo" in ev and "sft" in ev:
            a, b = ev["sft"]["pref"]["accuracy"], ev["dpo"]["pref"]["accuracy"]
            verdict = "above" if b > a else "NOT above"
            L.append(f"**After DPO the held-out preference accuracy is {verdict} the SFT model's: {b:.3f} vs {a:.3f}.** "
                     f"DPO's own implicit reward (against the SFT model, β {pl.dpo_beta:g}) ranks "
                     f"{ev['dpo']['pref']['vs_sft']['accuracy']:.3f} of the held-out pairs correctly.")
            L.append("")
        x, y = series(sft_rows, "eval/pref_accuracy")
        if x:
            L.append("During SFT (`eval/pref_accuracy` in sft/metrics.jsonl, against the untrained model): "
                     + ", ".join(f"step {s}: {v:.3f}" for s, v in zip(x, y)) + ".")
        x, y = series(dpo_rows, "eval/pref_accuracy")
        if x:
            L.append("During DPO (in dpo/metrics.jsonl, against the SFT model): "
                     + ", ".join(f"step {s}: {v:.3f}" for s, v in zip(x, y)) + ".")
        L.append("")

    x, y = series(sft_rows, "value/s0")
    if x:
        L += ["## value/s0 during SFT", "",
              "V(s0) = logsumexp of the logits at the last prompt position (seed 001 §4.5: rises fast, then plateaus).",
              "", md_table(["step"] + [str(s) for s in _pick(x, 8)], [["value/s0"] + [y[x.index(s)] for s in _pick(x, 8)]]), ""]

    if tau.get("tau_pooled"):
        L += _tau_section(tau)

    if plots:
        L += ["## Plots", ""]
        for key, title in (("loss", "SFT and DPO loss"), ("value_s0", "value/s0"), ("pref_curve", "held-out preference accuracy during training"),
                           ("pref", "held-out preference accuracy per model"), ("task", "held-out task accuracy"),
                           ("tau", "Kendall τ between checkpoints' value rankings")):
            if key in plots:
                L += [f"### {title}", "", f"![{title}]({plots[key]})", ""]
    return "\n".join(L) + "\n"


def _tau_section(tau: dict[str, Any]) -> list[str]:
    """The Kendall tau matrix (pooled over states) and per-trace means, as markdown."""
    from irtrain.report import md_table

    pooled, trace = tau["tau_pooled"], tau.get("tau_trace_mean") or {}
    labels = list(pooled)
    L = ["## Value rankings across checkpoints (Kendall τ)", "",
         f"`irtrain score` read V(s) = logsumexp of the logits at s0 and after every worked step of the "
         f"{tau.get('traces')} held-out traces ({tau.get('states')} states); `irtrain rank` computed Kendall τ-b between "
         "every two models' values, pooled over all states (below) and within each trace (mean, second table). "
         "Seed 001 §4.4: models trained on the same domain rank states alike (τ > 0).", ""]
    L.append(md_table(["pooled τ"] + labels, [[a] + [pooled[a][b] for b in labels] for a in labels]))
    L.append("")
    if trace:
        L.append(md_table(["per-trace mean τ"] + labels, [[a] + [trace[a][b] for b in labels] for a in labels]))
        L.append("")
    trained = [x for x in labels if x != "untrained"]
    offdiag = [pooled[a][b] for i, a in enumerate(trained) for b in trained[i + 1:]
               if isinstance(pooled[a][b], float) and math.isfinite(pooled[a][b])]
    if offdiag:
        L.append(f"Between trained checkpoints, pooled τ ranges from {min(offdiag):.3f} to {max(offdiag):.3f} "
                 f"({sum(t > 0 for t in offdiag)} of {len(offdiag)} pairs > 0).")
        L.append("")
    return L


def _pick(xs: list[int], k: int) -> list[int]:
    """About k values of xs, evenly spread, always with the first and last."""
    if len(xs) <= k:
        return list(xs)
    idx = sorted({round(i * (len(xs) - 1) / (k - 1)) for i in range(k)})
    return [xs[i] for i in idx]
