"""The DPO-family objective: one padding-free forward per micro-batch, the loss from
`PREFERENCE_LOSSES` (see `irtrain.dpo` for what a micro-step does)."""
from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from irtrain.config import DPOConfig
from irtrain.dpo.data import Examples, batch_examples, check_preference_shards, gather_reference
from irtrain.dpo.joint import AdaptiveLambda, check_joint_config
from irtrain.dpo.kto import MismatchedReference, check_kto_batches, kto_reference, mismatched_logps
from irtrain.dpo.options import allowed_formats, format_hint, resolve_loss
from irtrain.errors import ConfigError, CorruptCacheError, IrtrainError, ReferenceMismatchError, ShardError
from irtrain.evaluation import SegmentLogps, preference_pairs
from irtrain.losses import KL_ESTIMATORS, PreferenceBatch, TokenStats, first_token_mask, kto_z, preference_metrics, segment_sums, sequence_ce
from irtrain.models import check_tokenizer, load_tokenizer, model_hash, resolve_model, tokenizer_hash
from irtrain.shards import SFT_FORMATS, ShardSet
from irtrain.train.batching import Batch, PackedData
from irtrain.train.objective import Objective, Stats, TrainContext
from irtrain.train.packed import packed_token_stats
from irtrain.train.reference import ReferenceKey, ReferenceLogps, default_path, ensure_reference, eval_token_budget
from irtrain.train.strategy import world_from_env


class PreferenceObjective(Objective):
    """The DPO-family objective (see `irtrain.train.objective` for the protocol).

    `joint=True` is joint SFT+DPO (FORMULAS.md "Multi-objective and alternating SFT/DPO"):
    the data also holds SFT shard sets; the loss is `L_sft + lambda * L_pref` with lambda
    adapted every `--lambda-interval` steps (`irtrain.dpo.joint.AdaptiveLambda`).
    `stage` is the stage number of the alternating schedule, logged as `stage`.
    """

    name = "dpo"
    headline = ("loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies", "lr", "grad_norm", "eval/loss",
                "eval/rewards/margins")

    def __init__(self, cfg: DPOConfig, *, joint: bool = False, stage: int | None = None):
        self.cfg = cfg
        self.loss = resolve_loss(cfg)
        self.spec = self.loss.spec
        self.joint = joint
        self.stage = stage
        if joint:
            check_joint_config(cfg)
        self.lam = AdaptiveLambda(cfg)
        self.steps_done = 0
        self.refs: list[ReferenceLogps | None] | None = None
        self.kto_refs: MismatchedReference | None = None
        self.eval_ref: ReferenceLogps | None = None
        self.eval_pairs: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self._step_tokens = [1.0, 1.0]  # (chosen tokens, SFT tokens) of the step, all ranks

    # ------------------------------------------------------------------ before anything is written
    def check_data(self, sets: list[ShardSet]) -> None:
        cfg = self.cfg
        allowed = allowed_formats(cfg.loss)
        self.pref_set = []
        for s in sets:
            if self.joint and s.format in SFT_FORMATS:
                self.pref_set.append(False)
                continue
            if s.format not in allowed:
                raise ShardError(f"{s.path}: these are `{s.format}` shards; {format_hint(cfg.loss)}")
            check_preference_shards(s, s.format, cfg.loss)
            self.pref_set.append(True)
        if not any(self.pref_set):
            raise ShardError("no preference data: give at least one preference shard directory")
        if cfg.loss == "kto":
            check_kto_batches(cfg, sets, self.pref_set)
        self._check_reference_inputs(sets)

    def _check_reference_inputs(self, sets: list[ShardSet]) -> None:
        """--ref-model must exist and share the data's tokenizer; a cache file already at the
        place of this run's key must have been made for this key (else refused, now)."""
        cfg = self.cfg
        if not self.loss.reference:
            return
        ref_path = resolve_model(cfg.ref_model, flag="--ref-model") if cfg.ref_model else resolve_model(cfg.model)
        tok = load_tokenizer(ref_path)
        try:
            tok_hash = check_tokenizer(ref_path, tok, sets if cfg.ref_model else [])
        except IrtrainError as e:
            raise type(e)(f"--ref-model: {e}") from None
        if world_from_env()[0] != 0:  # the main rank checks the caches; a failure there ends the launch
            return
        shard_sets = list(sets) + ([ShardSet(cfg.eval_pairs)] if cfg.eval_pairs and Path(cfg.eval_pairs).is_dir() else [])
        existing = [s for s in shard_sets if any(default_path(s, ReferenceKey("", "", ""), cfg.reference_dir).parent.glob("*.safetensors"))]
        if not existing:  # nothing cached yet: nothing to refuse (and no need to hash the model now)
            return
        mh = model_hash(ref_path)
        for s in existing:
            key = ReferenceKey(mh, s.tokenizer_hash or tok_hash, s.content_hash)
            path = default_path(s, key, cfg.reference_dir)
            if path.is_file():
                try:
                    ReferenceLogps.load(path, expect=key, shards=s)
                except CorruptCacheError:
                    pass  # damaged, not another key's: recomputed with a warning when the run gets there

    # ------------------------------------------------------------------ once, before the first step
    def setup(self, ctx: TrainContext) -> None:
        cfg, strategy = self.cfg, ctx.strategy
        self.strategy = strategy
        self.device = strategy.device
        self.autocast = strategy.autocast
        self.pref_set = [s.format not in SFT_FORMATS for s in ctx.data.sets] if self.joint else [True] * len(ctx.data.sets)
        self.row_lengths = [s.row_lengths for s in ctx.data.sets]
        if cfg.eval_pairs:
            self.eval_pairs = preference_pairs(ShardSet(cfg.eval_pairs))
        if not self.loss.reference:
            return
        # the reference: the starting model (its caches come from the loop, computed with the
        # training model before its first step), or --ref-model (loaded here, used, freed)
        ref_path = resolve_model(cfg.ref_model, flag="--ref-model") if cfg.ref_model else ctx.model_path
        holder: dict[str, Any] = {}

        def reference_model() -> Any:
            if not cfg.ref_model and cfg.lora_r > 0:
                return ctx.reference_model()  # the base: the training model with its adapters disabled
            if "m" not in holder:
                m = strategy.load_model(ref_path, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
                m.config.use_cache = False
                holder["m"] = strategy.frozen(m)
            return holder["m"]

        mh = strategy.broadcast_object(model_hash(ref_path) if strategy.is_main else None)
        tok_hash = tokenizer_hash(ctx.tokenizer)
        cache: Callable[[ShardSet], ReferenceLogps]
        if cfg.ref_model:
            def cache(s: ShardSet) -> ReferenceLogps:
                key = ReferenceKey(mh, s.tokenizer_hash or tok_hash, s.content_hash)
                return ensure_reference(s, key, model_fn=reference_model, strategy=strategy,
                                        token_budget=eval_token_budget(cfg, PackedData([s])), reference_dir=cfg.reference_dir,
                                        meta={"model": str(cfg.ref_model)})
        else:
            cache = ctx.reference_logps_for
        self.refs = [cache(s) if pref else None for s, pref in zip(ctx.data.sets, self.pref_set)]  # none for joint SFT rows
        if cfg.eval_pairs:
            self.eval_ref = cache(ShardSet(cfg.eval_pairs))
        if cfg.loss == "kto":
            data_hash = hashlib.sha256("|".join(s.content_hash for s in ctx.data.sets).encode()).hexdigest()
            self.kto_refs = kto_reference(cfg, ctx.data, strategy, ReferenceKey(mh, tok_hash, data_hash), reference_model,
                                          self._unpaired_segments)
        holder.clear()  # no reference model stays resident during training
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _unpaired_segments(self, batch: Batch) -> np.ndarray:
        ex = batch_examples(batch, self.pref_set, self.row_lengths)
        return ex.groups.get(1, np.zeros((0, 1), np.int64))[:, 0]

    # ------------------------------------------------------------------ per step
    def begin_step(self, step: int, batches: list[Batch]) -> None:
        """Adapt lambda (joint mode) and fetch the step-wide chosen and SFT token counts (the
        denominators of --sft-coef and of the joint SFT term), all ranks."""
        if self.joint:
            self.lam.begin_step(step)
        self.steps_done = step
        if self.cfg.sft_coef > 0 or self.joint:
            chosen, sft = 0, 0
            for b in batches:
                if not b.weight:
                    continue
                ex = batch_examples(b, self.pref_set, self.row_lengths)
                resp = b.segment_response_tokens()
                chosen += int(sum(resp[g[:, 0]].sum() for g in ex.groups.values()))
                sft += int(resp[~ex.pref_segment].sum())
            t = self.strategy.all_reduce(torch.tensor([float(chosen), float(sft)], dtype=torch.float64, device=self.device))
            self._step_tokens = [max(float(t[0]), 1.0), max(float(t[1]), 1.0)]

    def step_denominator(self, batches: list[Batch]) -> float:
        """Examples (pairs) in this rank's micro-batches."""
        return float(sum(batch_examples(b, self.pref_set, self.row_lengths).count for b in batches if b.weight))

    def micro_step(self, model: Any, batch: Batch, denominator: float) -> tuple[Tensor, Stats]:
        cfg, w = self.cfg, batch.weight
        stats = packed_token_stats(model, batch, tau=cfg.value_temperature)
        seg_of_tok = batch.seg_id[stats.index]
        S = batch.num_segments
        seg_logps = segment_sums(stats.logps.double(), seg_of_tok, S)  # [S] logpi(y|x)
        seg_len = torch.zeros(S, dtype=torch.long, device=seg_logps.device).index_add_(0, seg_of_tok, torch.ones_like(seg_of_tok))
        ex = batch_examples(batch, self.pref_set, self.row_lengths)
        ref_tok = ref_seg = None
        if self.refs is not None:
            ref_tok, ref_seg = gather_reference(self.refs, batch, self.row_lengths, device=seg_logps.device)

        out: Stats = {}
        zero = seg_logps.sum() * 0.0  # keeps the graph connected when a micro-batch has nothing to train
        pref_sum, pair_losses = zero, []
        pbs: list[PreferenceBatch] = []
        if w and ex.count:
            if cfg.loss == "kto" and ex.count < 2:
                raise ConfigError("kto needs at least 2 examples per micro-batch (z comes from mismatched pairs)")
            for idx in ex.groups.values():
                pb = self._preference_batch(model, batch, idx, seg_logps, seg_len, ref_seg)
                pair_losses.append(self.spec(pb, beta=self.loss.beta, **self.loss.params))
                pbs.append(pb)
            pref_sum = torch.cat(pair_losses).sum()
        elif cfg.loss == "kto" and ex.count:  # a weight-0 filler: the same forwards as other ranks (ZeRO-3 lockstep)
            mismatched_logps(model, batch, np.repeat(ex.groups[1][:1, 0], 2), self.device, self.autocast)
        pref_loss = pref_sum / denominator
        loss = pref_loss if not self.joint else self.lam.lam * pref_loss
        if cfg.sft_coef > 0 and ex.count:
            chosen = torch.cat([seg_logps[torch.as_tensor(idx[:, 0], device=seg_logps.device)] for idx in ex.groups.values()])
            lens = torch.cat([seg_len[torch.as_tensor(idx[:, 0], device=seg_logps.device)] for idx in ex.groups.values()])
            loss = loss + cfg.sft_coef * sequence_ce(chosen, lens, denom=self._step_tokens[0])
        if self.joint:
            sft_tok = torch.as_tensor(~ex.pref_segment, device=seg_logps.device)[seg_of_tok]
            sft_sum = -(stats.logps.double() * sft_tok).sum()
            loss = loss + sft_sum / self._step_tokens[1]
        loss = (loss * w).float()

        with torch.no_grad():
            self._metrics(out, stats, pbs, pair_losses, ex, w, ref_tok, seg_of_tok)
            if self.joint:
                out["loss/sft"] = (sft_sum.detach() * w, sft_tok.sum() * w)
                out["joint/lambda"] = (self.lam.lam, 1.0)
            if self.stage is not None:
                out["stage"] = (float(self.stage), 1.0)
        return loss, out

    def end_step(self, step: int, stats: dict[str, tuple[float, float]]) -> None:
        if self.joint:
            self.lam.end_step(*stats.get("rewards/accuracies", (0.0, 0.0)))
        self.steps_done = step + 1

    def _preference_batch(self, model: Any, batch: Batch, idx: np.ndarray, seg_logps: Tensor, seg_len: Tensor,
                          ref_seg: Tensor | None) -> PreferenceBatch:
        """The [B_K, K] tensors of one group of examples (plus KTO's mismatched log-probs)."""
        dev = seg_logps.device
        t = torch.as_tensor(idx, device=dev)
        kw: dict[str, Any] = {"policy_logps": seg_logps[t], "lengths": seg_len[t]}
        if ref_seg is not None:
            kw["ref_logps"] = ref_seg[t]
        if self.spec.needs_scores:
            kw["scores"] = batch.seg_score.to(dev)[t].double()
        if self.spec.data_format == "unpaired":
            assert self.kto_refs is not None
            kw["labels"] = batch.seg_score.to(dev)[t[:, 0]] > 0.5
            pol = mismatched_logps(model, batch, idx[:, 0], self.device, self.autocast).to(dev)
            ref = torch.from_numpy(self.kto_refs.get(batch)).to(dev)
            if ref.shape != pol.shape:
                raise ReferenceMismatchError("KTO: cached mismatched reference log-probs do not fit this micro-batch")
            kw["mismatched_policy_logps"], kw["mismatched_ref_logps"] = pol, ref
        return PreferenceBatch(**kw)

    def _metrics(self, out: Stats, stats: TokenStats, pbs: list[PreferenceBatch], pair_losses: list[Tensor], ex: Examples,
                 w: float, ref_tok: Tensor | None, seg_of_tok: Tensor) -> None:
        """TRL-named preference metrics, loss, value/s0 and KL estimates as (sum, count); sums stay
        tensors on the device (no synchronisation per micro-batch; the loop reduces them once per step)."""
        cfg = self.cfg
        if pair_losses:
            out[f"loss/{cfg.loss}"] = (torch.cat(pair_losses).detach().sum() * w, sum(pb.batch_size for pb in pbs) * w)
        for pb in pbs:
            metrics = preference_metrics(pb, self.loss.beta)
            counts: dict[str, int] = {}
            if pb.num_responses == 1:  # unpaired: chosen = desirable, rejected = undesirable examples
                assert pb.labels is not None
                n_d = int(pb.labels.sum())
                counts = {"chosen": n_d, "rejected": pb.batch_size - n_d}
            for name, v in metrics.items():
                c = counts[name.rsplit("/", 1)[1]] if pb.num_responses == 1 else pb.batch_size
                s, n = out.get(name, (0.0, 0.0))
                out[name] = (s + v * c * w, n + c * w)
            if pb.mismatched_policy_logps is not None:
                assert pb.mismatched_ref_logps is not None
                out["kto/z"] = (kto_z(pb.mismatched_policy_logps, pb.mismatched_ref_logps) * w, w)
        # value/s0 and KL over the preference responses' tokens (a count of 0 logs NaN)
        pref_tok = torch.as_tensor(ex.pref_segment, device=seg_of_tok.device)[seg_of_tok]
        first = first_token_mask(stats.is_last) & pref_tok
        out["value/s0"] = (stats.values.detach()[first].sum() * w, first.sum() * w)
        if ref_tok is not None:
            lp, lq = stats.logps.detach()[pref_tok], ref_tok[pref_tok]
            for name in ("k1", "k2", "k3"):
                out[f"kl/{name}"] = (KL_ESTIMATORS[name].fn(lp, lq).sum() * w, pref_tok.sum() * w)

    # ------------------------------------------------------------------ held-out pairs
    def evaluate(self, policy: SegmentLogps, ctx: TrainContext) -> dict[str, float]:
        """With --eval-pairs: the run's loss (paired losses) and TRL-named reward metrics on
        held-out pairs against the run's reference (`eval/loss`, `eval/rewards/...`), from the
        loop's one pass over them."""
        if not self.cfg.eval_pairs:
            return {}
        chosen, rejected = self.eval_pairs
        if len(chosen) == 0:
            return {}
        logps, lengths = policy.logps, policy.lengths
        ref: tuple[Tensor | None, Tensor | None] = (None, None)
        if self.eval_ref is not None:
            r = torch.from_numpy(np.array(self.eval_ref.seg_logps, dtype=np.float64))
            ref = (r[chosen], r[rejected])
        pb = PreferenceBatch.pairs(logps[chosen], logps[rejected], *ref, lengths[chosen], lengths[rejected])
        out = {f"eval/{k}": float(v) for k, v in preference_metrics(pb, self.loss.beta).items()}
        if self.spec.data_format == "preference" or self.cfg.loss == "plackett_luce":
            out["eval/loss"] = float(self.spec(pb, beta=self.loss.beta, **self.loss.params).mean())
        return out

    # ------------------------------------------------------------------ exact resume (joint lambda)
    def state_dict(self) -> dict[str, Any]:
        return self.lam.state_dict(self.steps_done)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam.load_state_dict(state)
        if state:
            self.steps_done = int(state["step"])
