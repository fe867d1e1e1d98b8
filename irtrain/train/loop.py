"""`train(cfg, objective)`: the loop shared by `irtrain sft` and `irtrain dpo`.

Reads top to bottom (nanoGPT's train.py): check everything, build, then per optimizer step
set the lr, run the micro-batches, clip and step, log, evaluate, checkpoint. What is
specific to a command lives in its `Objective` (objective.py); where the model runs lives
in the `Strategy` (strategy.py, the only place DeepSpeed appears).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irtrain.config import config_to_dict, config_to_toml
from irtrain.errors import ConfigError, IrtrainIOError, ShardError, TokenizerError, TrainingError
from irtrain.shards import ShardSet
from irtrain.train.batching import PackedData, plan_steps, split_step
from irtrain.train.checkpoint import (StopSignal, TrainState, latest_checkpoint, list_checkpoints, load_checkpoint,
                                      prune_checkpoints, read_state, save_checkpoint)
from irtrain.train.metrics import MetricsLog, Progress
from irtrain.train.objective import Objective, TrainContext
from irtrain.train.reference import ReferenceKey, ReferenceLogps, ensure_reference, model_hash
from irtrain.train.schedule import lr_at, warmup_steps
from irtrain.train.strategy import Strategy, make_strategy


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
_RESUME_FIXED = ("model", "data", "seed", "global_batch", "global_batch_tokens")


def train(cfg: Any, objective: Objective) -> TrainResult:
    """Train `cfg.model` on `cfg.data` with `objective`; see the module docstring."""
    strategy = make_strategy(cfg)

    # ---------------------------------------------------------------- 1. check, write nothing
    out = check_out_dir(Path(cfg.out)) if strategy.is_main else Path(cfg.out)
    model_path = resolve_model(cfg.model)
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
    plan = plan_steps(data.lengths, global_batch=cfg.global_batch, global_batch_tokens=cfg.global_batch_tokens,
                      seed=cfg.seed, epochs=cfg.epochs, max_steps=cfg.max_steps)
    total = len(plan)
    save_at = parse_save_at(cfg.save_at, total)
    resume_from = find_resume(out, cfg) if cfg.resume else None
    if not cfg.resume and list_checkpoints(out):
        raise ConfigError(f"--out {out} already holds checkpoints of a run: pass --resume to continue it, or pick another --out")
    warmup = warmup_steps(total, cfg.warmup_ratio)

    # ---------------------------------------------------------------- 2. build
    if strategy.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
        except OSError as e:
            raise IrtrainIOError(f"--out {out}: cannot write: {e.strerror or e}") from None
    strategy.barrier()
    torch.manual_seed(cfg.seed)
    model = strategy.load_model(resume_from or model_path, attn_implementation=cfg.attn_implementation,
                                trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = strategy.setup(model)
    state = load_checkpoint(resume_from, strategy=strategy) if resume_from else TrainState()
    if resume_from and hasattr(objective, "load_state_dict"):  # optional: an objective's own state (dpo's joint lambda)
        objective.load_state_dict(state.extra.get("objective", {}))
    refs = References(cfg, strategy, model, model_path, tok_hash, fresh=resume_from is None)
    ctx = TrainContext(cfg=cfg, strategy=strategy, data=data, model_path=model_path, out=out, tokenizer=tokenizer,
                       reference_logps_for=refs.logps, reference_model=refs.model)
    objective.setup(ctx)
    eval_ref = refs.logps(eval_set) if eval_set is not None else None
    refs.release()
    model.train()
    log = MetricsLog(out, enabled=strategy.is_main, resume_step=state.step if resume_from else None, tensorboard=cfg.tensorboard)
    progress = Progress(total, state.step, enabled=strategy.is_main, description=objective.name)
    config_dict = config_to_dict(cfg)
    last_ckpt: Path | None = resume_from
    metrics: dict[str, Any] = {}

    def evaluate(step: int) -> dict[str, float]:
        ev: dict[str, float] = {}
        if eval_set is not None:
            ev.update(evaluate_preferences(model, eval_set, eval_ref, beta=cfg.eval_beta, strategy=strategy,
                                           token_budget=eval_token_budget(cfg, data)))
        ev.update(objective.evaluate(model, ctx) or {})
        return ev

    def checkpoint(step_state: TrainState, keep: bool) -> Path:
        if hasattr(objective, "state_dict"):  # optional, JSON-serialisable; restored on --resume
            step_state.extra["objective"] = objective.state_dict()
        path = save_checkpoint(out, step_state, model=model, tokenizer=tokenizer, strategy=strategy,
                               config=config_dict, keep=keep)
        if strategy.is_main:
            prune_checkpoints(out, cfg.save_total_limit, protected=set(save_at))
        return path

    # ---------------------------------------------------------------- 3. the loop
    if state.step == 0 and (eval_set is not None):
        log.log(0, evaluate(0))
    t_start = time.perf_counter() - state.elapsed
    try:
        with StopSignal() as stop:
            for step in range(state.step, total):
                t0 = time.perf_counter()
                lr = lr_at(step, total_steps=total, peak=cfg.lr, warmup=warmup, schedule=cfg.lr_schedule)
                strategy.set_lr(lr)

                # this rank's micro-batches of the step, and the step-wide denominator
                micro = split_step(plan[step], data.lengths, world_size=strategy.world_size, rank=strategy.rank,
                                   micro_batch=cfg.micro_batch, micro_batch_tokens=cfg.micro_batch_tokens,
                                   by_tokens=cfg.global_batch_tokens > 0)
                batches = [data.batch(rows, weight) for rows, weight in micro]
                local = [objective.step_denominator(batches),
                         sum(int((b.labels != -100).sum()) for b in batches if b.weight),
                         sum(b.num_tokens for b in batches if b.weight)]
                denominator, trained_tokens, tokens = strategy.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
                denominator = max(denominator, 1.0)  # a step with nothing to train on has loss 0

                # forward / backward over the micro-batches (gradients accumulate)
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
                flat = torch.stack([loss_sum] + [t for n in names for t in sums[n]])
                flat = strategy.all_reduce(flat).tolist()
                step_loss = flat[0]

                # clip and step; a non-finite loss or gradient norm skips the step
                grad_norm, applied = strategy.step(cfg.max_grad_norm, math.isfinite(step_loss))
                state.step = step + 1
                state.rows_consumed += len(plan[step])
                state.tokens += int(tokens)
                if applied:
                    state.trained_tokens += int(trained_tokens)
                    state.bad_in_row = 0
                else:
                    state.bad_steps += 1
                    state.bad_in_row += 1
                dt = time.perf_counter() - t0
                state.elapsed = time.perf_counter() - t_start

                # log
                metrics = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                           "tokens": state.tokens, "trained_tokens": state.trained_tokens, "step_time_s": dt, "elapsed_s": state.elapsed,
                           "bad_steps": state.bad_steps, "epoch": state.rows_consumed / len(data)}
                for j, n in enumerate(names):
                    s, c = flat[1 + 2 * j], flat[2 + 2 * j]
                    metrics[n] = s / c if c else float("nan")
                if not applied:
                    metrics["skipped"] = True
                if state.bad_in_row >= cfg.max_bad_steps:
                    log.log(state.step, metrics)
                    kept = latest_checkpoint(out)
                    raise TrainingError(
                        f"{state.bad_in_row} non-finite steps in a row (loss {step_loss}, grad norm {grad_norm}) at step {state.step}; "
                        f"stopped (--max-bad-steps {cfg.max_bad_steps}). Last good checkpoint: {kept if kept else 'none'}")
                if cfg.eval_steps > 0 and state.step % cfg.eval_steps == 0 and state.step < total:
                    metrics.update(evaluate(state.step))
                if state.step == total:
                    metrics.update(evaluate(state.step))
                if state.step % max(1, cfg.log_steps) == 0 or state.step == total or metrics.get("skipped"):
                    log.log(state.step, metrics)
                progress.update(state.step, metrics)

                # checkpoint: periodic, --save-at, the end; and on SIGTERM/SIGINT
                periodic = cfg.save_steps > 0 and state.step % cfg.save_steps == 0 and state.bad_in_row == 0
                if periodic or state.step in save_at or state.step == total:
                    last_ckpt = checkpoint(state, keep=state.step in save_at)
                stop_now = strategy.all_reduce(torch.tensor([1.0 if stop.requested else 0.0]), op="max").item() > 0
                if stop_now and state.step < total:
                    last_ckpt = checkpoint(state, keep=True)
                    raise Interrupted(
                        f"interrupted by signal at step {state.step}/{total}; checkpoint written to {last_ckpt}; "
                        f"rerun with --resume to continue")
    finally:
        progress.close()
        log.close()
    strategy.teardown()
    return TrainResult(out=out, steps=state.step, last_checkpoint=last_ckpt, metrics=metrics)


# ============================================================================ references
class References:
    """Reference log-probs for `TrainContext`: cached beside the shards, computed with the
    starting model (the training model before its first step, or loaded again on resume)."""

    def __init__(self, cfg: Any, strategy: Strategy, model: Any, model_path: Path, tok_hash: str, *, fresh: bool):
        self.cfg, self.strategy, self.train_model, self.model_path, self.tok_hash = cfg, strategy, model, model_path, tok_hash
        self.fresh = fresh
        self._hash: str | None = None
        self._start: Any = None
        self._resident: Any = None

    def key(self, shards: ShardSet) -> ReferenceKey:
        if self._hash is None:
            self._hash = self.strategy.broadcast_object(model_hash(self.model_path) if self.strategy.is_main else None)
        return ReferenceKey(self._hash, shards.tokenizer_hash or self.tok_hash, shards.content_hash)

    def _starting_model(self) -> Any:
        if self.fresh:
            return self.train_model
        if self._start is None:
            self._start = self.model()
        return self._start

    def logps(self, shards: ShardSet) -> ReferenceLogps:
        # at most a training micro-batch of these shards per forward (not micro_batch x 2048 tokens): the
        # reference pass then never needs more memory than a training step
        return ensure_reference(shards, self.key(shards), model_fn=self._starting_model, strategy=self.strategy,
                                token_budget=eval_token_budget(self.cfg, PackedData([shards])), reference_dir=self.cfg.reference_dir,
                                meta={"model": str(self.cfg.model)})

    def model(self) -> Any:
        """A frozen copy of the starting model, resident on the device."""
        if self._resident is None:
            m = self.strategy.load_model(self.model_path, attn_implementation=self.cfg.attn_implementation,
                                         trust_remote_code=self.cfg.trust_remote_code)
            m.config.use_cache = False
            self._resident = self.strategy.frozen(m)
        return self._resident

    def release(self) -> None:
        self._start = None  # a resident model handed out by model() stays with its user


def eval_token_budget(cfg: Any, data: PackedData | None) -> int:
    """Tokens per no-grad forward (reference pass, eval): the micro-batch size, or 4 rows."""
    if cfg.micro_batch_tokens > 0:
        return cfg.micro_batch_tokens
    longest = int(data.lengths.max()) if data is not None and len(data.lengths) else 2048
    return max(1, cfg.micro_batch) * longest


# ============================================================================ held-out preference eval
def preference_pairs(shards: ShardSet) -> tuple[np.ndarray, np.ndarray]:
    """Global segment indices (chosen, rejected) of every pair in preference shards."""
    ex = np.concatenate([np.asarray(sh.arrays["seg_example"], dtype=np.int64) for sh in shards.shards])
    part = np.concatenate([np.asarray(sh.arrays["seg_part"], dtype=np.int64) for sh in shards.shards])
    chosen = {int(e): i for i, (e, p) in enumerate(zip(ex, part)) if p == 0}
    rejected = {int(e): i for i, (e, p) in enumerate(zip(ex, part)) if p == 1}
    common = sorted(set(chosen) & set(rejected))
    return np.asarray([chosen[e] for e in common], dtype=np.int64), np.asarray([rejected[e] for e in common], dtype=np.int64)


@torch.no_grad()
def evaluate_preferences(model: Any, shards: ShardSet, ref: ReferenceLogps, *, beta: float, strategy: Strategy,
                         token_budget: int) -> dict[str, float]:
    """`eval/pref_loss` (the sigmoid DPO loss) and `eval/pref_accuracy` of the current model
    against the starting model on held-out pairs (FORMULAS.md "Implicit-reward metrics")."""
    from irtrain.losses import PREFERENCE_LOSSES, PreferenceBatch
    from irtrain.train.reference import sequence_logps

    n_seg = len(ref.seg_logps)
    policy = torch.zeros(n_seg, dtype=torch.float64)
    for i, _, sums, _ in sequence_logps(model, shards, device=strategy.device, token_budget=token_budget,
                                        world_size=strategy.world_size, rank=strategy.rank, autocast=strategy.autocast):
        a = int(ref.row_seg_offsets[i])
        policy[a : a + len(sums)] = torch.from_numpy(np.asarray(sums, dtype=np.float64))
    policy = strategy.all_reduce(policy.to(strategy.device)).cpu()
    chosen, rejected = preference_pairs(shards)
    if len(chosen) == 0:
        return {}
    refs = torch.from_numpy(np.array(ref.seg_logps, dtype=np.float64))
    pb = PreferenceBatch.pairs(policy[chosen], policy[rejected], refs[chosen], refs[rejected])
    losses = PREFERENCE_LOSSES["sigmoid"](pb, beta=beta)
    margin = beta * ((policy[chosen] - refs[chosen]) - (policy[rejected] - refs[rejected]))
    return {"eval/pref_loss": float(losses.mean()), "eval/pref_accuracy": float((margin > 0).double().mean())}


# ============================================================================ checks (before writing anything)
def check_out_dir(out: Path) -> Path:
    """`--out` must be given and writable (or creatable)."""
    if not str(out) or str(out) == ".":
        raise ConfigError("--out is required (the output directory)")
    if out.exists() and not out.is_dir():
        raise IrtrainIOError(f"--out {out} exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise IrtrainIOError(f"--out {out}: {parent} is not a directory")
    try:  # os.access is not enough (root, read-only mounts): try it, leaving nothing behind
        import tempfile

        os.rmdir(tempfile.mkdtemp(prefix=".irtrain-probe-", dir=parent))
    except OSError as e:
        raise IrtrainIOError(f"--out {out} is not writable ({parent}: {e.strerror or e})") from None
    return out


def resolve_model(name: str) -> Path:
    """A local model directory, or a hub name resolved to its local snapshot."""
    if not name:
        raise ConfigError("--model is required (a local directory or hub name)")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {name}: {path} has no config.json (not a transformers model directory)")
        return path
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_local:
        raise ConfigError(f"--model {name}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, no permission
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model {name}: not a local directory and not loadable from the hub ({first})") from None
    return Path(local)


def load_tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path))
    except Exception as e:
        raise TokenizerError(f"{model_path}: cannot load the model's tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def open_shards(path: str, what: str) -> ShardSet:
    s = ShardSet(path)
    if len(s) == 0:
        raise ShardError(f"{what} {path}: the shard directory holds no rows")
    return s


def tokenizer_hash_of(tokenizer: Any) -> str:
    """The `tokenizer_hash` that `irtrain prepare` writes into manifests, for the model's
    tokenizer: sha256 of the canonical serialization of its `tokenizers` backend."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError("the model's tokenizer is not a fast (tokenizers) tokenizer; irtrain needs tokenizer.json")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def check_tokenizer(model_path: Path, tokenizer: Any, sets: list[ShardSet]) -> str:
    """Shards must have been made with the model's tokenizer. Returns its hash."""
    h = tokenizer_hash_of(tokenizer)
    for s in sets:
        if s.tokenizer_hash and h and s.tokenizer_hash != h:
            raise TokenizerError(
                f"{s.path} was made with another tokenizer than the model's ({s.tokenizer_hash[:12]} vs {h[:12]} for {model_path}); "
                "run `irtrain prepare` with the model's tokenizer")
        vocab = len(tokenizer)
        for sh in s.shards:
            ids = sh.arrays["input_ids"]
            if len(ids) and int(np.max(ids)) >= vocab:
                raise TokenizerError(f"{s.path}: token id {int(np.max(ids))} is outside the model tokenizer's vocabulary ({vocab})")
    return h


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


def find_resume(out: Path, cfg: Any) -> Path | None:
    """The latest complete checkpoint, after checking the run it belongs to is this one."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    _, payload = read_state(ckpt)
    saved = payload.get("config", {})
    now = config_to_dict(cfg)
    changed = [k for k in _RESUME_FIXED if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(f"--resume: {ckpt} was made with a different {', '.join(changed)}; these must match to resume exactly")
    if payload.get("world_size") not in (None, 1) and cfg.deepspeed is None:
        raise ConfigError(f"--resume: {ckpt} was written by a {payload.get('world_size')}-process DeepSpeed run; resume it with --deepspeed")
    return ckpt
