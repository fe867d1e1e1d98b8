"""The quickstart's report: plots and ``report.md`` from what the stages produced
(metrics.jsonl files, the evaluation, rank's summary), with `irtrain.report`'s helpers."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from irtrain import report as R
from irtrain.quickstart.plan import Quickstart


def stage_report(q: Quickstart) -> Path:
    """Plots and report.md from what the stages produced (metrics.jsonl files, evaluation, rank)."""
    d = q.p["report"]
    d.mkdir(parents=True, exist_ok=True)
    pl = q.plan
    sft_rows, dpo_rows = R.read_metrics(q.p["sft"]), R.read_metrics(q.p["dpo"])
    plots: dict[str, str] = {}
    win = max(1, pl.sft_steps // 25)

    # losses
    panels: list[dict[str, Any]] = []
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
    # each stage on its own axes (their references differ), without step 0 (the tie: see _curve)
    panels = []
    for title, rows, color in (("during SFT (implicit reward vs the untrained model)", sft_rows, R.COLORS["sft"]),
                               ("during DPO (implicit reward vs the SFT model)", dpo_rows, R.COLORS["dpo"])):
        x, y = _curve(rows)
        if x:
            panels.append({"title": title, "ylabel": "held-out pref accuracy",
                           "lines": [{"x": x, "y": y, "color": color, "style": "o-"}]})
    if panels:
        plots["pref_curve"] = R.plot_lines(d / "pref_accuracy_curve.png", panels).name
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
    (d / "results.json").write_text(json.dumps({"plan": asdict(pl), "results": q.results, "timings_s": q.timings},
                                               indent=2, default=str), encoding="utf-8")
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


def _curve(rows: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """eval/pref_accuracy during a stage, without step 0: there the model is its own reference,
    every implicit-reward margin is exactly 0 (a tie) and the accuracy (margin > 0) is 0 by
    definition, not by anything the model learned."""
    x, y = R.series(rows, "eval/pref_accuracy")
    keep = [i for i, s in enumerate(x) if s > 0]
    return [x[i] for i in keep], [y[i] for i in keep]


def _compare(what: str, a_name: str, a: dict[str, Any], b_name: str, b: dict[str, Any], key: str,
             value: str) -> tuple[str, dict[str, Any]]:
    """A sentence comparing model b with model a on the same items (exact paired test); bold only when significant."""
    t = R.paired_sign_test(a[key], b[key])
    verdict = R.compare_verdict(t)
    va, vb = a[value], b[value]
    text = (f"{what} {b_name} is {verdict} {a_name}'s: {vb:.3f} vs {va:.3f} "
            f"({t['b_only']} of {t['n']} right only for {b_name}, {t['a_only']} only for {a_name}; "
            f"exact McNemar p = {t['p_value']:.2g})")
    if verdict != "not distinguishable from":
        text = f"**{text}.**"
    else:
        text += f": no difference at the {R.ALPHA:g} level on {t['n']} items."
    return text, {**t, "verdict": verdict}


def _dpo_task_explanation(q: Quickstart, c: dict[str, Any]) -> str:
    """Why the DPO stage did not raise task accuracy, in this run's own numbers (dpo/metrics.jsonl
    and the evaluation)."""
    ev, pl = q.results["eval"], q.plan
    sft_task, vs = ev["sft"]["task"], ev["dpo"]["pref"]["vs_sft"]
    n, solved = len(sft_task["correct"]), sum(sft_task["correct"])
    rows = R.read_metrics(q.p["dpo"])
    _, loss = R.series(rows, "loss")
    evals = [m for m in rows if "eval/logps/chosen" in m]
    moved = {"below": "lowered it", "not distinguishable from": "did not move it measurably"}[c["verdict"]]
    L = [f"Why DPO {moved}: DPO optimizes the implicit-reward margin β·(log π/π_ref(chosen) − log π/π_ref(rejected)) on "
         "pairs whose rejected answer carries a planted error; greedy decoding is not in its objective."]
    if loss:
        L.append(f"Its training loss went from {loss[0]:.3f} to {loss[-1]:.3f} over {len(loss)} steps, and its implicit reward "
                 f"against the SFT model ranks {vs['accuracy']:.3f} of the held-out pairs correctly.")
    if len(evals) >= 2:
        a, z = evals[0], evals[-1]
        L.append(f"On the held-out pairs, from step {a['step']} to step {z['step']}, log π(chosen) went from "
                 f"{a['eval/logps/chosen']:.3f} to {z['eval/logps/chosen']:.3f} and log π(rejected) from "
                 f"{a['eval/logps/rejected']:.3f} to {z['eval/logps/rejected']:.3f} (`eval/logps/*` in dpo/metrics.jsonl): "
                 + ("the margin grew by pushing the rejected answers down while the chosen ones also became less likely."
                    if z["eval/logps/chosen"] < a["eval/logps/chosen"] else
                    "the margin grew with the chosen answers more likely."))
    last = rows[-1] if rows else {}
    if "kl/k2" in last:
        L.append(f"At the end the policy's KL from the SFT model on the training responses is {last['kl/k2']:.3f} per token "
                 "(k2 estimate, FORMULAS.md).")
    L.append(f"On the task the SFT model solved {solved} of {n} problems; of its {n - solved} failures DPO fixed {c['b_only']}, "
             f"and it broke {c['a_only']} it had solved (β {pl.dpo_beta:g}, lr {pl.dpo_lr:g}, {pl.dpo_steps} steps).")
    return " ".join(L)


def _fmt(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _report_markdown(q: Quickstart, plots: dict[str, str], tau: dict[str, Any], sft_rows: list, dpo_rows: list) -> str:
    pl = q.plan
    ev = q.results.get("eval", {})
    L = ["# irtrain quickstart report", ""]
    L.append(f"Scale {pl.scale:g}, seed {pl.seed}. Total time {q.timings.get('total', float('nan')):.0f} s "
             f"(stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in q.timings.items() if k != "total") + ").")
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
        L.append(R.md_table(["model", "task accuracy [95% CI]", "strict (every step) [95% CI]"],
                          [[n, R.with_interval(sum(t["correct"]), t["n"]), R.with_interval(sum(t["steps_correct"]), t["n"])]
                           for n, t in ((n, ev[n]["task"]) for n in ev)]))
        L += ["", "Intervals are 95% Wilson intervals; a claim that one model is above another is made only when "
              f"an exact McNemar test on the same problems rejects equality at {R.ALPHA:g} (two-sided).", ""]
        claims = q.results.setdefault("claims", {})
        if "sft" in ev:
            text, claims["task_sft_vs_untrained"] = _compare("After SFT the task accuracy of", "the untrained model",
                                                             ev["untrained"]["task"], "sft", ev["sft"]["task"], "correct", "accuracy")
            L += [text, ""]
        if "dpo" in ev and "sft" in ev:
            text, c = _compare("After DPO the task accuracy of", "the SFT model", ev["sft"]["task"], "dpo", ev["dpo"]["task"],
                               "correct", "accuracy")
            claims["task_dpo_vs_sft"] = c
            L += [text, ""]
            if c["verdict"] != "above":
                L += [_dpo_task_explanation(q, c), ""]
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
            acc = R.with_interval(sum(p["correct"]), p["n"]) if "correct" in p else None  # the untrained model has no reference
            rows.append([n, acc, p.get("loss"), p["logp_accuracy"]]
                        + [p.get("by_group", {}).get(k, {}).get("accuracy") for k in kinds])
        group_n = {k: max(ev[n]["pref"].get("by_group", {}).get(k, {}).get("n", 0) for n in ev) for k in kinds}
        L.append(R.md_table(["model", "pref accuracy (vs untrained) [95% CI]", "pref loss (β=0.01)", "log-prob ranking"]
                          + [f"accuracy, `{k}` errors (n={group_n[k]})" for k in kinds], rows))
        L.append("")
        n_pairs = ev[next(iter(ev))]["pref"]["n"]
        L += [f"On {n_pairs} pairs a 95% interval is about ±{1.96 * math.sqrt(0.25 / max(n_pairs, 1)):.2f} around 0.5; "
              "the per-error-kind columns rest on the n in their header and are descriptive only.", ""]
        if "dpo" in ev and "sft" in ev:
            text, claims["pref_dpo_vs_sft"] = _compare("After DPO the held-out preference accuracy of", "the SFT model",
                                                       ev["sft"]["pref"], "dpo", ev["dpo"]["pref"], "correct", "accuracy")
            vs = ev["dpo"]["pref"]["vs_sft"]
            L += [text, "", f"DPO's own implicit reward (against the SFT model, β {pl.dpo_beta:g}) ranks "
                  f"{R.with_interval(sum(vs['correct']), vs['n'])} of the held-out pairs correctly.", ""]
        x, y = _curve(sft_rows)
        if x:
            L.append("During SFT (`eval/pref_accuracy` in sft/metrics.jsonl, against the untrained model): "
                     + ", ".join(f"step {s}: {v:.3f}" for s, v in zip(x, y)) + ".")
        x, y = _curve(dpo_rows)
        if x:
            L.append("During DPO (in dpo/metrics.jsonl, against the SFT model): "
                     + ", ".join(f"step {s}: {v:.3f}" for s, v in zip(x, y)) + ".")
        L += ["", "Step 0 is left out of these curves and plots: there each model is its own reference, every "
              "implicit-reward margin is exactly 0 (a tie), and the accuracy (margin > 0) is 0 by definition.", ""]

    x, y = R.series(sft_rows, "value/s0")
    if x:
        L += ["## value/s0 during SFT", "",
              "V(s0) = logsumexp of the logits at the last prompt position (seed 001 §4.5: rises fast, then plateaus).",
              "", R.md_table(["step"] + [str(s) for s in _pick(x, 8)], [["value/s0"] + [y[x.index(s)] for s in _pick(x, 8)]]), ""]

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
    pooled, trace = tau["tau_pooled"], tau.get("tau_trace_mean") or {}
    labels = list(pooled)
    L = ["## Value rankings across checkpoints (Kendall τ)", "",
         f"`irtrain score` read V(s) = logsumexp of the logits at s0 and after every worked step of the "
         f"{tau.get('traces')} held-out traces ({tau.get('states')} states); `irtrain rank` computed Kendall τ-b between "
         "every two models' values, pooled over all states (below) and within each trace (mean, second table). "
         "Seed 001 §4.4: models trained on the same domain rank states alike (τ > 0).", ""]
    L.append(R.md_table(["pooled τ"] + labels, [[a] + [pooled[a][b] for b in labels] for a in labels]))
    L.append("")
    if trace:
        L.append(R.md_table(["per-trace mean τ"] + labels, [[a] + [trace[a][b] for b in labels] for a in labels]))
        L.append("")
    trained = [x for x in labels if x != "untrained"]
    offdiag = [pooled[a][b] for i, a in enumerate(trained) for b in trained[i + 1:]
               if isinstance(pooled[a][b], float) and math.isfinite(pooled[a][b])]
    if offdiag:
        ci = tau.get("tau_pooled_ci") or {}
        lows = [ci[a][b][0] for i, a in enumerate(trained) for b in trained[i + 1:]
                if a in ci and b in ci[a] and isinstance(ci[a][b][0], float) and math.isfinite(pooled[a][b])]
        line = (f"Between trained checkpoints, pooled τ ranges from {min(offdiag):.3f} to {max(offdiag):.3f} "
                f"({sum(t > 0 for t in offdiag)} of {len(offdiag)} pairs > 0")
        if len(lows) == len(offdiag):
            line += (f"; {sum(lo > 0 for lo in lows)} of {len(offdiag)} with a 95% bootstrap interval "
                     f"(over traces, {tau.get('bootstrap') or 'rank --bootstrap'} resamples) above 0")
        L += [line + ").", ""]
    return L


def _pick(xs: list[int], k: int) -> list[int]:
    """About k values of xs, evenly spread, always with the first and last."""
    if len(xs) <= k:
        return list(xs)
    idx = sorted({round(i * (len(xs) - 1) / (k - 1)) for i in range(k)})
    return [xs[i] for i in idx]
