"""`train(cfg, objective)`: the loop shared by `irtrain sft` and `irtrain dpo`.

Reads top to bottom (nanoGPT's train.py): check everything, build, then per optimizer step
set the lr, run the micro-batches, clip and step, log, evaluate, checkpoint. What is
specific to a command lives in its `Objective` (objective.py); where the model runs lives
in the `Strategy` (strategy.py, the only place DeepSpeed appears); what is checked before
anything is written lives in `check_run` below.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irtrain.adapters import LoraSpec, apply_lora, lora_spec, merge_to, quantization_config
from irtrain.config import TrainConfig, config_to_dict, config_to_toml
from irtrain.display import Progress
from irtrain.durable import io_error, publish, sweep_temps
from irtrain.errors import ConfigError, ShardError, TrainingError
from irtrain.evaluation import held_out_metrics, segment_logps_of
from irtrain.models import check_tokenizer, load_tokenizer, model_hash, resolve_model
from irtrain.paths import OutLock, check_out_dir
from irtrain.shards import IGNORE_INDEX, ShardSet, open_shards
from irtrain.train.batching import Batch, DataUse, PackedData, plan_run, split_micro
from irtrain.train.checkpoint import (
    StopSignal,
    TrainState,
    agreed_checkpoint,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_state,
    same_layout,
    save_checkpoint,
    saved_layout,
)
from irtrain.train.memory import strategy_estimate
from irtrain.train.metrics import MetricsLog
from irtrain.train.objective import Objective, TrainContext
from irtrain.train.portable import has_portable
from irtrain.train.reference import ReferenceLogps, References, eval_token_budget
from irtrain.train.schedule import lr_at, warmup_steps
from irtrain.train.strategy import Strategy, make_strategy
from irtrain.train.trackers import RunInfo, Trackers, resolve_report_to


class Interrupted(TrainingError):
    """SIGTERM/SIGINT: a checkpoint was written and the run stopped; `--resume` continues it."""


@dataclass
class TrainResult:
    out: Path
    steps: int                   # optimizer steps completed
    last_checkpoint: Path | None
    metrics: dict[str, Any]      # the last logged metrics


# Fields that must not change when a run is resumed (they define the data order and the model).
# (--max-steps / --epochs may change: the plan's prefix is the same, the lr schedule follows the new length.)
_RESUME_FIXED = ("model", "data", "weights", "seed", "global_batch", "global_batch_tokens", "global_batch_docs", "lora_r",
                 "lora_target", "lora_modules_to_save", "use_dora")


def train(cfg: TrainConfig, objective: Objective) -> TrainResult:
    """Train `cfg.model` on `cfg.data` with `objective`; see the module docstring."""
    strategy = make_strategy(cfg)

    # ---------------------------------------------------------------- 1. check, write nothing
    run = check_run(cfg, objective, strategy)
    data, plan, out, total = run.data, run.plan, run.out, len(run.plan)

    # ---------------------------------------------------------------- 2. build, holding --out
    lock = OutLock(out, objective.name).acquire() if strategy.is_main else None
    stop = StopSignal().__enter__()  # from here: a signal while loading stops the run after its first step, checkpointed
    try:
        write_config(cfg, out, strategy)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, strategy, run)
        state = restore(run.resume_from, strategy, objective)
        refs = References(cfg, strategy, model, run.model_path, run.tok_hash, fresh=run.resume_from is None)
        ctx = TrainContext(cfg=cfg, strategy=strategy, data=data, model_path=run.model_path, out=out, tokenizer=run.tokenizer,
                           reference_logps_for=refs.logps, reference_model=refs.model)
        objective.setup(ctx)
        eval_ref = refs.logps(run.eval_set) if run.eval_set is not None else None
        refs.release()
        model.train()
        log = open_log(cfg, strategy, run, state)
        progress = Progress(total, state.step, enabled=strategy.is_main, description=objective.name, headline=objective.headline)
        used = DataUse(cfg, data, plan, state.step)
        last_ckpt, metrics = run.resume_from, {}
        evaluate = functools.partial(evaluate_held_out, model, objective, ctx, run.eval_set, eval_ref)

        def checkpoint(keep: bool) -> Path:
            own = objective.state_dict()
            if own:
                state.extra["objective"] = own
            with progress.saving(checkpoint_dir(out, state.step).name):
                path = save_checkpoint(out, state, model=model, tokenizer=run.tokenizer, strategy=strategy,
                                       config=config_to_dict(cfg), keep=keep, base_identity=run.base_identity)
            if strategy.is_main:
                prune_checkpoints(out, cfg.save_total_limit, protected=set(run.save_at))
            return path

        # ---------------------------------------------------------------- 3. the loop
        if state.step == 0 and run.eval_set is not None:
            log.log(0, progress.note(0, evaluate()))
        t_start = time.perf_counter() - state.elapsed
        try:
            with stop, progress:
                for step in range(state.step, total):
                    t0 = time.perf_counter()
                    lr = lr_at(step, total_steps=total, peak=cfg.lr, warmup=run.warmup, schedule=cfg.lr_schedule)
                    strategy.set_lr(lr)

                    # this rank's micro-batches; forward / backward over them (gradients accumulate)
                    micro = split_micro(cfg, plan[step], data.lengths, world_size=strategy.world_size, rank=strategy.rank)
                    batches = [data.batch(rows, weight) for rows, weight in micro]
                    objective.begin_step(step, batches)
                    done = run_micro_batches(model, objective, strategy, batches)

                    # clip and step; a non-finite loss or gradient norm skips the step
                    grad_norm, applied = strategy.step(cfg.max_grad_norm, math.isfinite(done.loss))
                    objective.end_step(step, done.stats)
                    advance(state, rows=len(plan[step]), tokens=done.tokens, trained_tokens=done.trained_tokens, applied=applied)
                    dt = time.perf_counter() - t0
                    state.elapsed = time.perf_counter() - t_start

                    # log; stop on too many non-finite steps in a row; evaluate
                    metrics = step_metrics(state, done, lr=lr, grad_norm=grad_norm, applied=applied, dt=dt, rows=len(data))
                    metrics.update(used.step_metrics(step))
                    if state.bad_in_row >= cfg.max_bad_steps:
                        log.log(state.step, metrics)
                        kept = latest_checkpoint(out)
                        raise TrainingError(
                            f"{state.bad_in_row} non-finite steps in a row (loss {done.loss}, grad norm {grad_norm}) at step {state.step}; "
                            f"stopped (--max-bad-steps {cfg.max_bad_steps}). Last good checkpoint: {kept if kept else 'none'}")
                    if (cfg.eval_steps > 0 and state.step % cfg.eval_steps == 0) or state.step == total:
                        metrics.update(evaluate())
                    if logged := state.step % max(1, cfg.log_steps) == 0 or state.step == total or bool(metrics.get("skipped")):
                        log.log(state.step, metrics)
                    progress.update(state.step, metrics, line=logged)

                    # checkpoint: periodic, --save-at, the end; and on SIGTERM/SIGINT
                    periodic = cfg.save_steps > 0 and state.step % cfg.save_steps == 0 and state.bad_in_row == 0
                    saved = periodic or state.step in run.save_at or state.step == total
                    if saved:
                        last_ckpt = checkpoint(keep=state.step in run.save_at)
                    stop_now = strategy.all_reduce(torch.tensor([1.0 if stop.requested else 0.0]), op="max").item() > 0
                    if stop_now and state.step < total:
                        last_ckpt = last_ckpt if saved else checkpoint(keep=True)  # a save step's checkpoint is not written twice
                        progress.summary(out, last_ckpt, stopped="interrupted")
                        raise Interrupted(f"interrupted by signal at step {state.step}/{total}; checkpoint written to {last_ckpt}; "
                                          "rerun with --resume to continue")
        finally:
            # how the run ended, for the trackers (in a finally block, exc_info is the exception on its way out)
            log.close("FINISHED" if sys.exc_info()[0] is None else "KILLED" if stop.requested else "FAILED")
        finish(cfg, strategy, run, last_ckpt, progress)
    finally:
        stop.__exit__()
        if lock is not None:
            lock.release()
    return TrainResult(out=out, steps=state.step, last_checkpoint=last_ckpt, metrics=metrics)


# ============================================================================ one step
@dataclass
class StepDone:
    """What the micro-batches of one optimizer step gave, summed over ranks."""

    loss: float                                # the step loss
    stats: dict[str, tuple[float, float]]      # metric name -> (sum, count)
    trained_tokens: float                      # response tokens of the step
    tokens: float                              # tokens of the step


def run_micro_batches(model: Any, objective: Objective, strategy: Strategy, batches: list[Batch]) -> StepDone:
    """Forward and backward over this rank's micro-batches of a step (gradients accumulate);
    the step-wide denominator and the metrics are all-reduced over ranks."""
    local = [objective.step_denominator(batches),
             sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches if b.weight),
             sum(b.num_tokens for b in batches if b.weight)]
    denominator, trained_tokens, tokens = strategy.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
    denominator = max(denominator, 1.0)  # a step with nothing to train on has loss 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=strategy.device)
    sums: dict[str, list[torch.Tensor]] = {}
    for i, batch in enumerate(batches):
        strategy.begin_micro_step(last=i == len(batches) - 1)
        batch = batch.to(strategy.device)
        with strategy.autocast():
            loss, stats = objective.micro_step(model, batch, denominator)
        strategy.backward(loss)
        loss_sum += loss.detach().double()
        for name, (s, c) in stats.items():
            acc = sums.setdefault(name, [torch.zeros((), dtype=torch.float64, device=strategy.device)] * 2)
            sums[name] = [acc[0] + torch.as_tensor(s, dtype=torch.float64, device=strategy.device).detach(),
                          acc[1] + torch.as_tensor(c, dtype=torch.float64, device=strategy.device)]
    names = sorted(sums)
    flat = strategy.all_reduce(torch.stack([loss_sum] + [t for n in names for t in sums[n]])).tolist()
    reduced = {n: (flat[1 + 2 * j], flat[2 + 2 * j]) for j, n in enumerate(names)}
    return StepDone(loss=flat[0], stats=reduced, trained_tokens=trained_tokens, tokens=tokens)


def advance(state: TrainState, *, rows: int, tokens: float, trained_tokens: float, applied: bool) -> None:
    """Count a finished step into `state` (a skipped step trains no tokens)."""
    state.step += 1
    state.rows_consumed += rows
    state.tokens += int(tokens)
    if applied:
        state.trained_tokens += int(trained_tokens)
        state.bad_in_row = 0
    else:
        state.bad_steps += 1
        state.bad_in_row += 1


def step_metrics(state: TrainState, done: StepDone, *, lr: float, grad_norm: float, applied: bool, dt: float,
                 rows: int) -> dict[str, Any]:
    """The logged metrics of a step: the loop's own, then the objective's as sum / count."""
    metrics: dict[str, Any] = {
        "loss": done.loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": done.tokens / dt if dt > 0 else 0.0,
        "tokens": state.tokens, "trained_tokens": state.trained_tokens, "step_time_s": dt, "elapsed_s": state.elapsed,
        "bad_steps": state.bad_steps, "epoch": state.rows_consumed / rows}
    for name, (s, c) in done.stats.items():
        metrics[name] = s / c if c else float("nan")
    if not applied:
        metrics["skipped"] = True
    return metrics


def evaluate_held_out(model: Any, objective: Objective, ctx: TrainContext, eval_set: ShardSet | None,
                      eval_ref: ReferenceLogps | None) -> dict[str, float]:
    """With --eval-pairs: ONE pass of the policy over the held-out pairs, then the loop's
    `eval/pref_loss` / `eval/pref_accuracy` against the starting model and the objective's
    own metrics, all from those log-probs (FORMULAS.md "Implicit-reward metrics")."""
    if eval_set is None or eval_ref is None:
        return {}
    policy = segment_logps_of(model, eval_set, token_budget=eval_token_budget(ctx.cfg, ctx.data), strategy=ctx.strategy)
    out = held_out_metrics(policy, eval_set, np.array(eval_ref.seg_logps, dtype=np.float64), beta=ctx.cfg.eval_beta)
    out.update(objective.evaluate(policy, ctx))
    return out


# ============================================================================ checks and building
@dataclass
class RunPlan:
    """A run, checked: nothing has been written yet."""

    out: Path
    model_path: Path
    tokenizer: Any
    tok_hash: str
    data: PackedData
    plan: list[np.ndarray]       # the global rows of every optimizer step
    save_at: list[int]
    resume_from: Path | None
    warmup: int
    eval_set: ShardSet | None
    lora: LoraSpec | None            # None: a full fine-tune
    base_identity: dict[str, str] | None  # LoRA: the base the adapter trains on (saved with it)
    trackers: list[str]              # --report-to, resolved (installed: checked)


def check_run(cfg: TrainConfig, objective: Objective, strategy: Strategy) -> RunPlan:
    """Everything that can be checked before anything is written: --out, the model and its
    tokenizer, the data (the objective's checks too), the plan, --save-at, --resume."""
    out = check_out_dir(Path(cfg.out)) if strategy.is_main else Path(cfg.out)
    trackers = resolve_report_to(cfg, note=strategy.is_main)
    model_path = resolve_model(cfg.model)
    lora = lora_spec(cfg, model_path)
    tokenizer = load_tokenizer(model_path)
    sets = [open_shards(d, "training data") for d in cfg.data] if cfg.data else []
    if not sets:
        raise ConfigError("no training data: give one or more shard directories made by `irtrain prepare`")
    objective.check_data(sets)
    tok_hash = check_tokenizer(model_path, tokenizer, sets)
    eval_set = None
    if cfg.eval_pairs:
        eval_set = open_shards(cfg.eval_pairs, "--eval-pairs")
        if eval_set.format != "preference":
            raise ShardError(f"--eval-pairs {cfg.eval_pairs}: needs `preference` shards, got `{eval_set.format}`")
        check_tokenizer(model_path, tokenizer, [eval_set])
    data = PackedData(sets)
    plan = plan_run(cfg, data)
    save_at = parse_save_at(cfg.save_at, len(plan))
    resume_from = find_resume(out, cfg, strategy) if cfg.resume else None
    if not cfg.resume and list_checkpoints(out):
        raise ConfigError(f"--out {out} already holds checkpoints of a run: pass --resume to continue it, or pick another --out")
    base_identity = {"base_model": lora.base_name, "model_hash": model_hash(model_path)} if lora and strategy.is_main else None
    return RunPlan(out=out, model_path=model_path, tokenizer=tokenizer, tok_hash=tok_hash, data=data, plan=plan,
                   save_at=save_at, resume_from=resume_from, warmup=warmup_steps(len(plan), cfg.warmup_ratio), eval_set=eval_set,
                   lora=lora, base_identity=base_identity, trackers=trackers)


def write_config(cfg: TrainConfig, out: Path, strategy: Strategy) -> None:
    """The first thing a run writes: OUT/config.toml, the resolved config (after removing the
    checkpoint temporaries a killed run of this --out left half-written)."""
    if strategy.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            sweep_temps(out, r"checkpoint-\d+|config\.toml", regex=True)
            tmp = out / ".config.toml.tmp"
            tmp.write_text(config_to_toml(cfg), encoding="utf-8")
            publish(tmp, out / "config.toml")
        except OSError as e:
            raise io_error(e, out / "config.toml") from None
    strategy.barrier()


def build_model(cfg: TrainConfig, strategy: Strategy, run: RunPlan) -> Any:
    """The model to train: the start, or the checkpoint to resume (with LoRA: the base, with fresh
    adapters or the resumed ones), handed to the strategy (device, optimizer, DeepSpeed engine).
    Prints the memory line (parameters, bytes per device) on the main rank."""
    path = run.resume_from if run.resume_from and run.lora is None else run.model_path
    model = strategy.load_model(path, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
                                quantization=quantization_config(run.lora))
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if run.lora is not None:
        model = apply_lora(model, run.lora, resume_from=run.resume_from, gradient_checkpointing=cfg.gradient_checkpointing)
    model = strategy.setup(model)
    if strategy.is_main:
        print(strategy_estimate(model, strategy, run.lora.describe() if run.lora else "full fine-tune").line(), file=sys.stderr)
    return model


def open_log(cfg: TrainConfig, strategy: Strategy, run: RunPlan, state: TrainState) -> MetricsLog:
    """metrics.jsonl and the --report-to trackers (main rank; on --resume, from the checkpoint's step)."""
    resume_step = state.step if run.resume_from else None
    trackers = Trackers(run.trackers, RunInfo(out=run.out, project=cfg.project, name=cfg.run_name or run.out.resolve().name,
                                              config=config_to_dict(cfg), resume_step=resume_step)) if strategy.is_main else None
    return MetricsLog(run.out, enabled=strategy.is_main, resume_step=resume_step, trackers=trackers)


def restore(resume_from: Path | None, strategy: Strategy, objective: Objective) -> TrainState:
    """The state to start from: a fresh one, or the checkpoint's (optimizer, RNG, objective) on --resume."""
    if resume_from is None:
        return TrainState()
    state = load_checkpoint(resume_from, strategy=strategy)
    objective.load_state_dict(state.extra.get("objective", {}))
    return state


def finish(cfg: TrainConfig, strategy: Strategy, run: RunPlan, last_ckpt: Path | None, progress: Progress) -> None:
    """After the last step: with --merge-at-end, base + adapter written to OUT/merged/ (main rank);
    then the run's summary."""
    if cfg.merge_at_end and last_ckpt is not None and strategy.is_main:
        with progress.saving("merged/"):
            merge_to(run.model_path, last_ckpt, run.out / "merged", tokenizer=run.tokenizer, trust_remote_code=cfg.trust_remote_code)
    strategy.teardown()
    progress.summary(run.out, last_ckpt)


def parse_save_at(spec: str, total: int) -> list[int]:
    """`--save-at 50,100,150` -> [50, 100, 150]; each within 1..total."""
    steps = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) <= 0:
            raise ConfigError(f"--save-at {spec!r}: {part!r} is not a positive step number")
        if int(part) > total:
            raise ConfigError(f"--save-at step {part} is beyond the run, which has {total} steps")
        steps.append(int(part))
    return sorted(set(steps))


def find_resume(out: Path, cfg: TrainConfig, strategy: Strategy) -> Path | None:
    """The newest checkpoint that is complete and verifies on every rank (a damaged newer one is
    skipped by all ranks, with a note saying why), after checking the run it belongs to is this
    one. A checkpoint of another layout (world size, ZeRO stage, DeepSpeed or not) resumes from
    its world-size-free optimizer state; one without it is refused, saying what to do."""
    ckpt, skipped = agreed_checkpoint(out, strategy)
    for bad, why in skipped if strategy.is_main else ():
        print(f"note: --resume skips {bad}: {why}", file=sys.stderr)
    if ckpt is None:
        if skipped:
            raise ConfigError(f"--resume: no usable checkpoint in {out} (" + "; ".join(f"{p.name}: {w}" for p, w in skipped) + ")")
        return None
    _, payload = read_state(ckpt)
    saved = payload.get("config", {})
    now = config_to_dict(cfg)
    changed = [k for k in _RESUME_FIXED if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(f"--resume: {ckpt} was made with a different {', '.join(changed)}; these must match to resume exactly")
    was, now = saved_layout(payload), strategy.layout
    if not same_layout(was, now) and not has_portable(ckpt):
        def say(layout: dict[str, int]) -> str:
            if not layout["zero_stage"]:
                return "a single process without DeepSpeed"
            return f"{layout['world_size']} DeepSpeed process(es)" + (f" (ZeRO-{layout['zero_stage']})" if layout["zero_stage"] > 0 else "")
        raise ConfigError(f"--resume: {ckpt} was written by {say(was)}, this run is {say(now)}, and it holds no world-size-free "
                          f"optimizer state (written before irtrain saved one): resume it as it was written, or start a new run "
                          f"from its weights (--model {ckpt}, fresh optimizer)")
    return ckpt
