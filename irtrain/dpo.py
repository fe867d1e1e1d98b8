"""`irtrain dpo`: preference optimisation with every loss of FORMULAS.md "Preference losses".

The loop is the shared one (`irtrain.train.loop.train`); this module is the preference
`Objective`. Per micro-batch:

1. ONE padding-free forward over the packed rows. A pair's chosen and rejected (or the K
   candidates of a ranked example) sit in the same packed row as separate segments, so
   both sides come out of the same forward (TRL disabled padding-free DPO, trl#2469).
2. Per-segment sequence log-probs `logpi(y|x)` (sums over response tokens) and lengths,
   grouped into examples: `PreferenceBatch` [B, K].
3. `log pi_ref(y|x)` from the reference cache (`irtrain.train.reference`): computed once
   with the reference model (the starting model, or `--ref-model`), stored beside the
   shards, refused on mismatch. No reference model is resident while training.
4. The loss is `PREFERENCE_LOSSES[cfg.loss]` (a pure tensor function, `irtrain.losses`),
   summed over the micro-batch's examples and divided by the examples of the whole step,
   so it is the mean over pairs whatever the accumulation or world size. `--sft-coef`
   adds `alpha * ce(y_w)` reduced by the chosen tokens of the step.

KTO (unpaired data) also needs `z`, from mismatched pairs (x_i, y_(i+1)) of the
micro-batch: those sequences are built from prompt i's tokens and response i+1's tokens,
their policy log-probs come from a no-grad forward, and their reference log-probs are
precomputed for every micro-batch of the run (the data order is a pure function of the
config, `batching.py`) and cached beside the shards like the others.

Joint SFT+DPO (`--joint-sft`) and the alternating schedule (`--alternate-with`) live in
`irtrain.preference`; `run(cfg)` dispatches to them.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from irtrain.errors import ConfigError, IrtrainError, ReferenceMismatchError, ShardError
from irtrain.losses import (IGNORE_INDEX, KL_ESTIMATORS, PREFERENCE_LOSSES, PreferenceBatch, first_token_mask, kto_z,
                            preference_metrics, segment_sums, sequence_ce)
from irtrain.preference import adapt_lambda
from irtrain.shards import Row, ShardSet
from irtrain.train.batching import Batch, PackedData, collate, plan_steps, split_step
from irtrain.train.objective import Stats, TrainContext
from irtrain.train.packed import packed_token_stats
from irtrain.train.reference import ReferenceKey, ReferenceLogps, batch_reference, segment_logps

#: shard formats each loss family trains on (plackett_luce with K = 2 is sigmoid, so pairs work too)
_FORMATS = {"preference": ("preference",), "unpaired": ("unpaired",), "ranked": ("ranked",)}
_EXTRA_FORMATS = {"plackett_luce": ("preference",)}
SFT_FORMATS = ("chat", "prompt-completion")


# ============================================================================ the config, checked
@dataclass(frozen=True)
class LossSetup:
    """The loss of a run as resolved from `DPOConfig`: table entry, beta and its params."""

    name: str
    beta: float
    params: dict[str, float]
    reference: bool  # whether reference log-probs are used at all (False with --reference-free)

    @property
    def spec(self) -> Any:
        return PREFERENCE_LOSSES[self.name]


def resolve_loss(cfg: Any) -> LossSetup:
    """Check the loss options of `cfg` (a `DPOConfig`) and resolve beta and params.
    `ConfigError` on anything that does not fit the loss."""
    spec = PREFERENCE_LOSSES[cfg.loss]
    if cfg.reference_free and spec.needs_ref:
        free = ", ".join(n for n, s in PREFERENCE_LOSSES.items() if not s.needs_ref)
        raise ConfigError(f"--reference-free: the {cfg.loss} loss needs a reference model (reference-free losses: {free})")
    if cfg.reference_free and cfg.ref_model:
        raise ConfigError("--reference-free and --ref-model contradict each other: give one")
    if cfg.loss == "orpo":
        if cfg.beta is not None:
            raise ConfigError("orpo has no beta: its weight lambda is --orpo-lambda")
        beta = cfg.orpo_lambda
    else:
        beta = spec.default_beta if cfg.beta is None else cfg.beta
    if not beta > 0:
        raise ConfigError(f"--{'orpo-lambda' if cfg.loss == 'orpo' else 'beta'} must be > 0, got {beta}")
    flags = {"label_smoothing": "--label-smoothing", "gamma": "--gamma", "alpha": "--infonca-alpha",
             "desirable_weight": "--desirable-weight", "undesirable_weight": "--undesirable-weight"}
    given = {"label_smoothing": cfg.label_smoothing, "gamma": cfg.gamma, "alpha": cfg.infonca_alpha,
             "desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight}
    try:
        params = spec.check_params(**given)
    except ValueError as e:
        key = str(e).split("=", 1)[0]
        raise ConfigError(f"{flags.get(key, key)}: {e} (loss {cfg.loss})") from None
    if "label_smoothing" in params:
        eps = params["label_smoothing"]
        if not (0.0 <= eps <= 0.5 if cfg.loss == "sigmoid" else 0.0 <= eps < 0.5):
            raise ConfigError(f"--label-smoothing {eps} must be in [0, 0.5{']' if cfg.loss == 'sigmoid' else ')'} for {cfg.loss}")
    if "alpha" in params and not params["alpha"] > 0:
        raise ConfigError(f"--infonca-alpha must be > 0, got {params['alpha']}")
    if cfg.loss == "kto" and (cfg.desirable_weight < 0 or cfg.undesirable_weight < 0):
        raise ConfigError("--desirable-weight and --undesirable-weight must be >= 0")
    if cfg.sft_coef < 0:
        raise ConfigError(f"--sft-coef must be >= 0, got {cfg.sft_coef}")
    return LossSetup(cfg.loss, float(beta), params, reference=not cfg.reference_free)


# ============================================================================ data checks
def segment_response_tokens(shard: Any) -> np.ndarray:
    """[S] response tokens (label != -100) of each segment of one shard."""
    labels = np.asarray(shard.arrays["labels"])
    so = np.asarray(shard.arrays["seg_offsets"], dtype=np.int64)
    if len(so) < 2:
        return np.zeros(0, dtype=np.int64)
    trained = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX, dtype=np.int64)])
    return trained[so[1:]] - trained[so[:-1]]


def example_groups(seg_part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start segment, K) of every example in a run of preference segments: an example starts
    at seg_part 0 and holds the following segments numbered 1, 2, ... (format rule)."""
    part = np.asarray(seg_part, dtype=np.int64)
    if len(part) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(part == 0)
    ends = np.append(starts[1:], len(part))
    return starts, ends - starts


def check_preference_shards(s: ShardSet, data_format: str, loss: str) -> None:
    """Every example of the shard set is whole: pairs have chosen (part 0) AND rejected (part 1),
    ranked examples K >= 2 candidates numbered 0..K-1, unpaired ones a 0/1 label; every
    response has at least one trained token; no example crosses a row."""
    for sh in s.shards:
        part = np.asarray(sh.arrays["seg_part"], dtype=np.int64)
        ex = np.asarray(sh.arrays["seg_example"], dtype=np.int64)
        score = np.asarray(sh.arrays["seg_score"], dtype=np.float64)
        n_resp = segment_response_tokens(sh)
        if len(part) and part[0] != 0:
            raise ShardError(f"{s.path}: the first segment of {sh.root.name} is part {part[0]} of example {ex[0]}, not its first response")
        if len(n_resp) and (n_resp == 0).any():
            j = int(np.flatnonzero(n_resp == 0)[0])
            raise ShardError(f"{s.path}: example {ex[j]} has a response with no trained tokens (all labels -100)")
        # examples never cross rows: every row starts with a part-0 segment
        ro = np.asarray(sh.arrays["row_offsets"], dtype=np.int64)[:-1]
        so = np.asarray(sh.arrays["seg_offsets"], dtype=np.int64)
        first_seg = np.searchsorted(so, ro, side="left")
        if len(first_seg) and (part[first_seg] != 0).any():
            j = int(first_seg[np.flatnonzero(part[first_seg] != 0)[0]])
            raise ShardError(f"{s.path}: example {ex[j]} is split across packed rows")
        starts, k = example_groups(part)
        if data_format == "unpaired":
            if (part != 0).any():
                raise ShardError(f"{s.path}: unpaired shards hold one response per example; found seg_part {int(part.max())}")
            bad = ~np.isin(score, (0.0, 1.0))
            if bad.any():
                raise ShardError(f"{s.path}: example {ex[np.flatnonzero(bad)[0]]} has label {score[bad][0]!r}; unpaired labels are 1.0 (desirable) or 0.0")
            continue
        idx = np.arange(len(part)) - np.repeat(starts, k)  # position inside its example
        if (part != idx).any() or (ex != np.repeat(ex[starts], k)).any():
            j = int(np.flatnonzero((part != idx) | (ex != np.repeat(ex[starts], k)))[0])
            raise ShardError(f"{s.path}: segment {j} (example {ex[j]}, part {part[j]}) is out of order: "
                             "an example's responses must be consecutive, numbered 0, 1, ...")
        if data_format == "preference" and (k != 2).any():
            j = int(np.flatnonzero(k != 2)[0])
            what = "no rejected response (seg_part 1)" if k[j] == 1 else f"{k[j]} responses"
            raise ShardError(f"{s.path}: preference example {ex[starts[j]]} has {what}; every pair needs a chosen and a rejected side")
        if data_format == "ranked":
            if (k < 2).any():
                j = int(np.flatnonzero(k < 2)[0])
                raise ShardError(f"{s.path}: ranked example {ex[starts[j]]} has {k[j]} candidate(s); {loss} needs at least 2")
            if loss == "infonca" and not np.isfinite(score).all():
                raise ShardError(f"{s.path}: infonca needs a score for every candidate; some are missing (NaN)")


# ============================================================================ examples of a micro-batch
@dataclass
class Examples:
    """The preference examples of one micro-batch, as indices into its segments.

    groups: K -> [B_K, K] long segment indices (column k = the k-th response: chosen,
            rejected; or rank k), examples in micro-batch order. Ranked data may mix K;
            every other format has one K.
    count:  number of examples B
    pref_segment: [S] bool, the segment belongs to a preference example (False: SFT row)
    """

    groups: dict[int, np.ndarray]
    count: int
    pref_segment: np.ndarray


def segment_rows(batch: Batch, row_lengths: list[np.ndarray]) -> np.ndarray:
    """[S] the position in `batch.rows` of each segment's row."""
    lens = np.asarray([int(row_lengths[k][i]) for k, i in batch.rows], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(lens)])
    seg_start = batch.cu_seqlens[:-1].cpu().numpy().astype(np.int64)
    return np.searchsorted(bounds, seg_start, side="right") - 1


def batch_examples(batch: Batch, pref_set: list[bool], row_lengths: list[np.ndarray]) -> Examples:
    """Group the segments of a micro-batch into examples (rows of preference shard sets only)."""
    part = batch.seg_part.cpu().numpy().astype(np.int64)
    if all(pref_set):
        is_pref = np.ones(len(part), dtype=bool)
    else:
        row_of_seg = segment_rows(batch, row_lengths)
        is_pref = np.asarray([pref_set[batch.rows[r][0]] for r in row_of_seg], dtype=bool)
    segs = np.flatnonzero(is_pref)
    starts, k = example_groups(part[segs])
    groups: dict[int, list[np.ndarray]] = {}
    for st, kk in zip(starts.tolist(), k.tolist()):
        groups.setdefault(kk, []).append(segs[st : st + kk])
    return Examples(groups={kk: np.stack(v) for kk, v in groups.items()}, count=len(starts), pref_segment=is_pref)


# ============================================================================ KTO: mismatched pairs
def response_start(labels: np.ndarray) -> int:
    """Index of the first trained token of a segment (where its response begins)."""
    hits = np.flatnonzero(labels != IGNORE_INDEX)
    return int(hits[0]) if len(hits) else len(labels)


def mismatched_rows(batch: Batch, segments: np.ndarray) -> list[Row]:
    """KTO's mismatched sequences of a micro-batch: for examples i = 0..B-1 (one segment each,
    in batch order), prompt tokens of i (everything before its response) followed by the
    response tokens of (i + 1) mod B. B >= 2."""
    ids = batch.input_ids[0].cpu().numpy()
    labels = batch.labels[0].cpu().numpy()
    cu = batch.cu_seqlens.cpu().numpy().astype(np.int64)
    parts = []
    for j in segments.tolist():
        a, b = int(cu[j]), int(cu[j + 1])
        r = a + response_start(labels[a:b])
        parts.append((ids[a:r], ids[r:b], labels[r:b]))
    rows = []
    n = len(parts)
    for i in range(n):
        prompt, (resp_ids, resp_labels) = parts[i][0], parts[(i + 1) % n][1:]
        input_ids = np.concatenate([prompt, resp_ids]).astype(np.uint32)
        lab = np.concatenate([np.full(len(prompt), IGNORE_INDEX, dtype=np.int32), resp_labels.astype(np.int32)])
        lab[0] = IGNORE_INDEX
        t = len(input_ids)
        rows.append(Row(input_ids=input_ids, labels=lab, position_ids=np.arange(t, dtype=np.int32),
                        cu_seqlens=np.asarray([0, t], dtype=np.int64), seg_example=np.asarray([i], dtype=np.int64),
                        seg_part=np.zeros(1, dtype=np.int32), seg_score=np.full(1, np.nan, dtype=np.float32)))
    return rows


@torch.no_grad()
def mismatched_logps(model: Any, batch: Batch, segments: np.ndarray, device: torch.device, autocast: Any = None) -> Tensor:
    """[B] float64 logpi(y_(i+1) | x_i) under `model` (one padding-free no-grad forward)."""
    import contextlib

    mb = collate(mismatched_rows(batch, segments)).to(device)
    with autocast() if autocast else contextlib.nullcontext():
        stats = packed_token_stats(model, mb)
    return segment_logps(mb, stats)[1]


class MismatchedReference:
    """log pi_ref of KTO's mismatched sequences for every micro-batch of the run, keyed by the
    micro-batch's rows (the data order is a pure function of the config). One safetensors
    file per rank beside the first shard set (or under --reference-dir), keyed like the
    reference cache plus the plan; refused on mismatch."""

    FORMAT = "1"

    def __init__(self, table: dict[tuple[tuple[int, int], ...], np.ndarray]):
        self.table = table

    def get(self, batch: Batch) -> np.ndarray:
        key = tuple(batch.rows)
        if key not in self.table:
            raise ReferenceMismatchError("KTO: no cached reference log-probs for this micro-batch's mismatched pairs "
                                         "(the data plan changed; delete the kto-mismatched-*.safetensors cache)")
        return self.table[key]

    @staticmethod
    def plan_key(cfg: Any, world_size: int, rank: int) -> dict[str, Any]:
        return {"seed": cfg.seed, "global_batch": cfg.global_batch, "global_batch_tokens": cfg.global_batch_tokens,
                "micro_batch": cfg.micro_batch, "micro_batch_tokens": cfg.micro_batch_tokens, "epochs": cfg.epochs,
                "max_steps": cfg.max_steps, "world_size": world_size, "rank": rank}

    @classmethod
    def path_for(cls, cfg: Any, sets: list[ShardSet], key: ReferenceKey, world_size: int, rank: int) -> tuple[Path, dict[str, str]]:
        plan = json.dumps(cls.plan_key(cfg, world_size, rank), sort_keys=True)
        ident = hashlib.sha256(f"{key.id}|{plan}".encode()).hexdigest()[:24]
        base = Path(cfg.reference_dir) if cfg.reference_dir else sets[0].path / "reference"
        meta = {"irtrain_kto_mismatched": cls.FORMAT, "model_hash": key.model_hash, "tokenizer_hash": key.tokenizer_hash,
                "data_hash": key.data_hash, "plan": plan}
        return base / f"kto-mismatched-{ident}.safetensors", meta

    @classmethod
    def load(cls, path: Path, meta: dict[str, str]) -> MismatchedReference:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            found = f.metadata() or {}
            if any(found.get(k) != v for k, v in meta.items()):
                bad = [k for k, v in meta.items() if found.get(k) != v]
                raise ReferenceMismatchError(f"{path}: KTO mismatched-pair reference log-probs made for another {', '.join(bad)}")
            rows, row_off = f.get_tensor("rows"), f.get_tensor("row_offsets")
            logps, logp_off = f.get_tensor("logps"), f.get_tensor("logp_offsets")
        table = {}
        rows = rows.reshape(-1, 2)  # (shard set, row) pairs; row_offsets count pairs
        for j in range(len(row_off) - 1):
            r = rows[row_off[j] : row_off[j + 1]]
            table[tuple((int(a), int(b)) for a, b in r)] = logps[logp_off[j] : logp_off[j + 1]]
        return cls(table)

    @staticmethod
    def save(path: Path, table: dict[tuple[tuple[int, int], ...], np.ndarray], meta: dict[str, str]) -> None:
        from safetensors.numpy import save_file

        keys = list(table)
        rows = np.asarray([x for k in keys for pair in k for x in pair], dtype=np.int64)
        row_off = np.concatenate([[0], np.cumsum([len(k) for k in keys])]).astype(np.int64)
        logps = np.concatenate([table[k] for k in keys]).astype(np.float64) if keys else np.zeros(0)
        logp_off = np.concatenate([[0], np.cumsum([len(table[k]) for k in keys])]).astype(np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        save_file({"rows": rows, "row_offsets": row_off, "logps": logps, "logp_offsets": logp_off}, str(tmp), metadata=meta)
        os.replace(tmp, path)


def plan_micro_batches(cfg: Any, data: PackedData, world_size: int, rank: int) -> list[tuple[list[int], float]]:
    """Every micro-batch (global rows, weight) of `rank` over the whole run, in order: the same
    plan the loop follows (`plan_steps` + `split_step`)."""
    plan = plan_steps(data.lengths, global_batch=cfg.global_batch, global_batch_tokens=cfg.global_batch_tokens,
                      seed=cfg.seed, epochs=cfg.epochs, max_steps=cfg.max_steps)
    out = []
    for rows in plan:
        out += split_step(rows, data.lengths, world_size=world_size, rank=rank, micro_batch=cfg.micro_batch,
                          micro_batch_tokens=cfg.micro_batch_tokens, by_tokens=cfg.global_batch_tokens > 0)
    return out


def check_kto_batches(cfg: Any, sets: list[ShardSet], pref_set: list[bool]) -> None:
    """KTO needs >= 2 examples in every (real) micro-batch: z comes from mismatched pairs."""
    from irtrain.train.strategy import world_from_env

    _, _, world = world_from_env()
    per_row = []
    for s, is_pref in zip(sets, pref_set):
        for sh in s.shards:
            ro = np.asarray(sh.arrays["row_offsets"], dtype=np.int64)
            so = np.asarray(sh.arrays["seg_offsets"], dtype=np.int64)
            n = np.diff(np.searchsorted(so, ro, side="left")) if is_pref else np.zeros(len(ro) - 1, dtype=np.int64)
            per_row.append(n)
    counts = np.concatenate(per_row)
    data = PackedData(sets)
    for rank in range(world):
        for j, (rows, weight) in enumerate(plan_micro_batches(cfg, data, world, rank)):
            n = int(counts[rows].sum())
            if weight and n < 2:
                raise ConfigError(
                    f"kto needs at least 2 examples per micro-batch (z comes from mismatched pairs (x_i, y_(i+1)) of the batch), "
                    f"but micro-batch {j + 1} of rank {rank} holds {n}: raise --micro-batch or --micro-batch-tokens, or pack the data")


def gather_reference(refs: list[ReferenceLogps | None], batch: Batch, row_lengths: list[np.ndarray],
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """(log q_t [N_resp] f32 in `response_token_stats` order, log pi_ref(y) [S] f64) of a
    micro-batch; NaN for rows of shard sets without a reference (joint mode's SFT rows)."""
    if all(r is not None for r in refs):
        tok, seg, _ = batch_reference(refs, batch, device=device)  # type: ignore[arg-type]
        return tok, seg
    labels = batch.labels[0].cpu().numpy()
    cu = batch.cu_seqlens.cpu().numpy().astype(np.int64)
    toks, segs, pos = [], [], 0
    for k, i in batch.rows:
        n = int(row_lengths[k][i])
        if refs[k] is not None:
            toks.append(np.asarray(refs[k].row_tokens(i), dtype=np.float32))
            segs.append(np.asarray(refs[k].row_segments(i)[0], dtype=np.float64))
        else:
            n_resp = int((labels[pos + 1 : pos + n] != IGNORE_INDEX).sum())  # the first token of a row is never trained
            n_seg = int(((cu[1:] > pos) & (cu[1:] <= pos + n)).sum())
            toks.append(np.full(n_resp, np.nan, dtype=np.float32))
            segs.append(np.full(n_seg, np.nan, dtype=np.float64))
        pos += n
    return (torch.from_numpy(np.concatenate(toks)).to(device), torch.from_numpy(np.concatenate(segs)).to(device))


# ============================================================================ the objective
class PreferenceObjective:
    """The DPO-family objective (see `irtrain.train.objective` for the protocol and this
    module's docstring for what a micro-step does).

    `joint=True` is joint SFT+DPO (FORMULAS.md "Multi-objective"): the data also holds SFT
    shard sets; the loss is `L_sft + lambda * L_pref` with lambda adapted every
    `--lambda-interval` steps by `irtrain.preference.adapt_lambda`.
    """

    name = "dpo"

    def __init__(self, cfg: Any, *, joint: bool = False, stage: int | None = None):
        self.cfg = cfg
        self.loss = resolve_loss(cfg)
        self.spec = self.loss.spec
        self.joint = joint
        self.stage = stage
        if joint:
            from irtrain.preference import check_joint_config

            check_joint_config(cfg)
        self.lam = float(cfg.lambda_init)
        self.step = 0
        self.window = [0.0, 0.0]  # (correct, pairs) of the preference accuracy since lambda last changed
        self.refs: list[ReferenceLogps] | None = None
        self.kto_refs: MismatchedReference | None = None
        self.eval_set: ShardSet | None = None
        self.eval_ref: ReferenceLogps | None = None
        self._step_tokens = [1.0, 1.0]  # (chosen tokens, SFT tokens) of the step, all ranks
        self._micro_left = 0

    # ------------------------------------------------------------------ before anything is written
    def check_data(self, sets: list[ShardSet]) -> None:
        cfg, fmt = self.cfg, self.spec.data_format
        allowed = _FORMATS[fmt] + _EXTRA_FORMATS.get(cfg.loss, ())
        self.pref_set = []
        for s in sets:
            if self.joint and s.format in SFT_FORMATS:
                self.pref_set.append(False)
                continue
            if s.format not in allowed:
                if cfg.loss == "kto":
                    hint = "kto trains on unpaired shards (one response with a desirable/undesirable label); prepare them with --format unpaired, or use a paired loss"
                elif fmt == "preference":
                    hint = f"{cfg.loss} trains on preference shards (chosen and rejected); prepare them with --format preference"
                else:
                    hint = f"{cfg.loss} trains on ranked shards (K scored candidates); prepare them with --format ranked"
                raise ShardError(f"{s.path}: these are `{s.format}` shards; {hint}")
            check_preference_shards(s, s.format, cfg.loss)
            self.pref_set.append(True)
        if not any(self.pref_set):
            raise ShardError("no preference data: give at least one preference shard directory")
        self.row_lengths = [np.concatenate([np.diff(np.asarray(sh.arrays["row_offsets"], dtype=np.int64)) for sh in s.shards])
                            for s in sets]
        if cfg.loss == "kto":
            check_kto_batches(cfg, sets, self.pref_set)
        self._check_reference_inputs(sets)

    def _check_reference_inputs(self, sets: list[ShardSet]) -> None:
        """--ref-model must exist and share the data's tokenizer; a cache file already at the
        place of this run's key must have been made for this key (else refused, now)."""
        from irtrain.train.loop import check_tokenizer, load_tokenizer, resolve_model
        from irtrain.train.reference import default_path, model_hash

        cfg = self.cfg
        if not self.loss.reference:
            return
        try:
            ref_path = resolve_model(cfg.ref_model or cfg.model)
        except ConfigError as e:  # the loop's message names --model
            raise ConfigError(str(e).replace("--model", "--ref-model", 1) if cfg.ref_model else str(e)) from None
        tok = load_tokenizer(ref_path)
        try:
            tok_hash = check_tokenizer(ref_path, tok, sets if cfg.ref_model else [])
        except IrtrainError as e:
            raise type(e)(f"--ref-model: {e}") from None
        from irtrain.train.strategy import world_from_env

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
                ReferenceLogps.load(path, expect=key, shards=s)

    # ------------------------------------------------------------------ once, before the first step
    def setup(self, ctx: TrainContext) -> None:
        cfg, strategy = self.cfg, ctx.strategy
        self.strategy = strategy
        self.device = strategy.device
        self.autocast = strategy.autocast
        self._pending = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.sets = ctx.data.sets
        self.pref_set = [s.format not in SFT_FORMATS for s in self.sets] if self.joint else [True] * len(self.sets)
        self.row_lengths = [np.concatenate([np.diff(np.asarray(sh.arrays["row_offsets"], dtype=np.int64)) for sh in s.shards])
                            for s in self.sets]
        if cfg.eval_pairs:
            self.eval_set = ShardSet(cfg.eval_pairs)
        if not self.loss.reference:
            return
        from irtrain.train.loop import check_tokenizer, eval_token_budget, resolve_model
        from irtrain.train.reference import ensure_reference, model_hash

        # the reference: the starting model (its caches come from the loop, computed with the
        # training model before its first step), or --ref-model (loaded here, used, freed)
        ref_path = resolve_model(cfg.ref_model) if cfg.ref_model else ctx.model_path
        holder: dict[str, Any] = {}

        def reference_model() -> Any:
            if "m" not in holder:
                m = strategy.load_model(ref_path, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
                m.config.use_cache = False
                holder["m"] = strategy.frozen(m)
            return holder["m"]

        mh = strategy.broadcast_object(model_hash(ref_path) if strategy.is_main else None)
        tok_hash = check_tokenizer(ctx.model_path, ctx.tokenizer, [])  # the hash of the model's tokenizer
        if cfg.ref_model:
            def cache(s: ShardSet) -> ReferenceLogps:
                key = ReferenceKey(mh, s.tokenizer_hash or tok_hash, s.content_hash)
                return ensure_reference(s, key, model_fn=reference_model, strategy=strategy,
                                        token_budget=eval_token_budget(cfg, PackedData([s])), reference_dir=cfg.reference_dir,
                                        meta={"model": str(cfg.ref_model)})
        else:
            cache = ctx.reference_logps_for
        self.refs = [cache(s) if pref else None for s, pref in zip(self.sets, self.pref_set)]  # none for joint SFT rows
        if self.eval_set is not None:
            self.eval_ref = cache(self.eval_set)
        if cfg.loss == "kto":
            self._setup_kto(ctx, mh, tok_hash, reference_model)
        holder.clear()  # no reference model stays resident during training
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _setup_kto(self, ctx: TrainContext, model_hash: str, tok_hash: str, model_fn: Any) -> None:
        """Reference log-probs of the mismatched sequences of every micro-batch of the run."""
        cfg, strategy = self.cfg, ctx.strategy
        data_hash = hashlib.sha256("|".join(s.content_hash for s in self.sets).encode()).hexdigest()
        key = ReferenceKey(model_hash, tok_hash, data_hash)
        path, meta = MismatchedReference.path_for(cfg, self.sets, key, strategy.world_size, strategy.rank)
        missing = strategy.all_reduce(torch.tensor([0.0 if path.is_file() else 1.0], device=strategy.device), op="max").item() > 0
        if missing:
            model = model_fn()
            table: dict[tuple[tuple[int, int], ...], np.ndarray] = {}
            todo = []
            for rows, _ in plan_micro_batches(cfg, ctx.data, strategy.world_size, strategy.rank):
                ids = tuple(ctx.data.locate(int(g)) for g in rows)
                if ids not in table:
                    table[ids] = np.zeros(0)
                    todo.append(rows)
            count = int(strategy.all_reduce(torch.tensor([float(len(todo))], device=strategy.device), op="max").item())
            for j in range(count):  # every rank runs the same number of forwards (ZeRO-3 lockstep)
                rows = todo[j] if j < len(todo) else todo[0]
                batch = ctx.data.batch(rows)
                ex = batch_examples(batch, self.pref_set, self.row_lengths)
                segs = ex.groups.get(1, np.zeros((0, 1), np.int64))[:, 0]
                if len(segs) == 1:  # a weight-0 filler (never trained on): run it anyway, for the forward count
                    segs = np.repeat(segs, 2)
                logps = mismatched_logps(model, batch, segs, strategy.device, strategy.autocast).cpu().numpy()
                if j < len(todo):
                    table[tuple(batch.rows)] = logps
            MismatchedReference.save(path, table, meta)
            strategy.barrier()
        self.kto_refs = MismatchedReference.load(path, meta)

    # ------------------------------------------------------------------ per step
    def step_denominator(self, batches: list[Batch]) -> float:
        """Examples (pairs) in this rank's micro-batches; also fetches the step-wide chosen and
        SFT token counts (for --sft-coef and the joint SFT term) and, in joint mode, adapts lambda."""
        if self.joint and self.step > 0 and self.step % self.cfg.lambda_interval == 0:
            correct, pairs = self.window
            if pairs > 0:
                self.lam = adapt_lambda(self.lam, correct / pairs, self.cfg)
            self.window = [0.0, 0.0]
        self.step += 1
        self._micro_left = len(batches)
        pairs, chosen, sft = 0, 0, 0
        for b in batches:
            if not b.weight:
                continue
            ex = batch_examples(b, self.pref_set, self.row_lengths)
            pairs += ex.count
            if self.cfg.sft_coef > 0 or self.joint:
                resp = self._segment_response_tokens(b)
                chosen += int(sum(resp[g[:, 0]].sum() for g in ex.groups.values()))
                sft += int(resp[~ex.pref_segment].sum())
        if self.cfg.sft_coef > 0 or self.joint:
            t = self.strategy.all_reduce(torch.tensor([float(chosen), float(sft)], dtype=torch.float64, device=self.device))
            self._step_tokens = [max(float(t[0]), 1.0), max(float(t[1]), 1.0)]
        return float(pairs)

    @staticmethod
    def _segment_response_tokens(b: Batch) -> np.ndarray:
        trained = np.concatenate([[0], np.cumsum(b.labels[0].cpu().numpy() != IGNORE_INDEX)])
        cu = b.cu_seqlens.cpu().numpy().astype(np.int64)
        return trained[cu[1:]] - trained[cu[:-1]]

    def micro_step(self, model: Any, batch: Batch, denominator: float) -> tuple[Tensor, Stats]:
        cfg, w = self.cfg, batch.weight
        self._train_model = model
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
            for K, idx in ex.groups.items():
                pb = self._preference_batch(batch, idx, seg_logps, seg_len, ref_seg)
                losses = self.spec(pb, beta=self.loss.beta, **self.loss.params)
                pair_losses.append(losses)
                pbs.append(pb)
            pref_sum = torch.cat(pair_losses).sum()
        elif cfg.loss == "kto" and ex.count:  # a weight-0 filler: the same forwards as other ranks (ZeRO-3 lockstep)
            mismatched_logps(model, batch, np.repeat(ex.groups[1][:1, 0], 2), self.device, self.autocast)
        pref_loss = pref_sum / denominator
        loss = pref_loss if not self.joint else self.lam * pref_loss
        if cfg.sft_coef > 0 and ex.count:
            chosen = torch.cat([seg_logps[torch.as_tensor(idx[:, 0], device=seg_logps.device)] for idx in ex.groups.values()])
            lens = torch.cat([seg_len[torch.as_tensor(idx[:, 0], device=seg_logps.device)] for idx in ex.groups.values()])
            sft_term = sequence_ce(chosen, lens, denom=self._step_tokens[0])
            loss = loss + cfg.sft_coef * sft_term
        sft_tok = None
        if self.joint:
            sft_tok = torch.as_tensor(~ex.pref_segment, device=seg_logps.device)[seg_of_tok]
            sft_sum = -(stats.logps.double() * sft_tok).sum()
            loss = loss + sft_sum / self._step_tokens[1]
        loss = (loss * w).float()

        with torch.no_grad():
            self._metrics(out, stats, pbs, pair_losses, ex, w, ref_tok, seg_of_tok)
            if self.joint:
                out["loss/sft"] = (sft_sum.detach() * w, sft_tok.sum() * w)
                out["joint/lambda"] = (self.lam, 1.0)
                correct, pairs = out.get("rewards/accuracies", (0.0, 0.0))
                self._pending += torch.stack([torch.as_tensor(correct, dtype=torch.float64, device=self.device),
                                              torch.as_tensor(pairs, dtype=torch.float64, device=self.device)])
            if self.stage is not None:
                out["stage"] = (float(self.stage), 1.0)
        self._micro_left -= 1
        if self.joint and self._micro_left == 0:  # the step's last micro-batch, on every rank alike: lockstep
            total = self.strategy.all_reduce(self._pending).tolist()
            self.window = [self.window[0] + total[0], self.window[1] + total[1]]
            self._pending.zero_()
        return loss, out

    def _preference_batch(self, batch: Batch, idx: np.ndarray, seg_logps: Tensor, seg_len: Tensor,
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
            kw["labels"] = batch.seg_score.to(dev)[t[:, 0]] > 0.5
            pol = mismatched_logps(self._train_model, batch, idx[:, 0], self.device, self.autocast).to(dev)
            ref = torch.from_numpy(self.kto_refs.get(batch)).to(dev)
            if ref.shape != pol.shape:
                raise ReferenceMismatchError("KTO: cached mismatched reference log-probs do not fit this micro-batch")
            kw["mismatched_policy_logps"], kw["mismatched_ref_logps"] = pol, ref
        return PreferenceBatch(**kw)

    def _metrics(self, out: Stats, stats: Any, pbs: list[PreferenceBatch], pair_losses: list[Tensor], ex: Examples,
                 w: float, ref_tok: Tensor | None, seg_of_tok: Tensor) -> None:
        """TRL-named preference metrics, loss, value/s0 and KL estimates as (sum, count); sums stay
        tensors on the device (no synchronisation per micro-batch; the loop reduces them once per step)."""
        cfg = self.cfg
        if pair_losses:
            out[f"loss/{cfg.loss}"] = (torch.cat(pair_losses).detach().sum() * w, sum(pb.batch_size for pb in pbs) * w)
        for pb in pbs:
            metrics = preference_metrics(pb, self.loss.beta)
            if pb.num_responses == 1:  # unpaired: chosen = desirable, rejected = undesirable examples
                n_d = int(pb.labels.sum())
                counts = {"chosen": n_d, "rejected": pb.batch_size - n_d}
            for name, v in metrics.items():
                c = counts[name.rsplit("/", 1)[1]] if pb.num_responses == 1 else pb.batch_size
                s, n = out.get(name, (0.0, 0.0))
                out[name] = (s + v * c * w, n + c * w)
            if pb.mismatched_policy_logps is not None:
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
    def evaluate(self, model: Any, ctx: TrainContext) -> dict[str, float]:
        """With --eval-pairs: the run's loss (paired losses) and TRL-named reward metrics on
        held-out pairs against the run's reference (`eval/loss`, `eval/rewards/...`)."""
        if self.eval_set is None:
            return {}
        from irtrain.train.loop import eval_token_budget, preference_pairs
        from irtrain.train.reference import sequence_logps

        strategy = ctx.strategy
        n_seg = self.eval_set.num_segments
        policy = torch.zeros(n_seg, dtype=torch.float64)
        lengths = torch.zeros(n_seg, dtype=torch.float64)
        offsets = np.concatenate([[0], np.cumsum(self._row_segments(self.eval_set))])
        for i, _, sums, counts in sequence_logps(model, self.eval_set, device=strategy.device,
                                                 token_budget=eval_token_budget(self.cfg, ctx.data),
                                                 world_size=strategy.world_size, rank=strategy.rank, autocast=strategy.autocast):
            a = int(offsets[i])
            policy[a : a + len(sums)] = torch.from_numpy(np.asarray(sums, dtype=np.float64))
            lengths[a : a + len(sums)] = torch.from_numpy(np.asarray(counts, dtype=np.float64))
        both = strategy.all_reduce(torch.stack([policy, lengths]).to(strategy.device)).cpu()
        policy, lengths = both[0], both[1]
        chosen, rejected = preference_pairs(self.eval_set)
        if len(chosen) == 0:
            return {}
        ref = None
        if self.eval_ref is not None:
            r = torch.from_numpy(np.array(self.eval_ref.seg_logps, dtype=np.float64))
            ref = (r[chosen], r[rejected])
        pb = PreferenceBatch.pairs(policy[chosen], policy[rejected], *(ref or (None, None)), lengths[chosen], lengths[rejected])
        out = {f"eval/{k}": float(v) for k, v in preference_metrics(pb, self.loss.beta).items()}
        if self.spec.data_format == "preference" or self.cfg.loss == "plackett_luce":
            out["eval/loss"] = float(self.spec(pb, beta=self.loss.beta, **self.loss.params).mean())
        return out

    @staticmethod
    def _row_segments(s: ShardSet) -> np.ndarray:
        per = []
        for sh in s.shards:
            ro = np.asarray(sh.arrays["row_offsets"], dtype=np.int64)
            so = np.asarray(sh.arrays["seg_offsets"], dtype=np.int64)
            per.append(np.diff(np.searchsorted(so, ro, side="left")))
        return np.concatenate(per)

    # ------------------------------------------------------------------ exact resume (joint lambda)
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "lambda": self.lam, "window": list(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.step, self.lam, self.window = int(state["step"]), float(state["lambda"]), list(state["window"])


def run(cfg: Any) -> Any:
    """`irtrain dpo`: train `cfg.model` on the preference shards `cfg.data` (see `DPOConfig`).

    Returns the loop's `TrainResult` (out, steps, last_checkpoint, metrics); for the
    alternating schedule, the list of every stage's result.
    """
    from irtrain.train.loop import train

    if cfg.alternate_with:
        from irtrain.preference import run_alternating

        return run_alternating(cfg)
    if cfg.joint_sft:
        from irtrain.preference import joint_config

        cfg = joint_config(cfg)
        return train(cfg, PreferenceObjective(cfg, joint=True))
    return train(cfg, PreferenceObjective(cfg))
