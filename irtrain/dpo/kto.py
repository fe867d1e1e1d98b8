"""KTO's mismatched pairs: z = clamp(mean(logπ(y_(i+1)|x_i) − logπ_ref(y_(i+1)|x_i)), 0) over the
micro-batch (FORMULAS.md "Preference losses").

The mismatched sequences of a micro-batch are built from prompt i's tokens and response
i+1's tokens; their policy log-probs come from a no-grad forward, and their reference
log-probs are precomputed for every micro-batch of the run (the data order is a pure
function of the config, `irtrain.train.batching`) and cached beside the shards, keyed like
the reference cache plus the plan, refused on mismatch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from irtrain.config import DPOConfig
from irtrain.durable import publish, sweep_temps
from irtrain.errors import ConfigError, CorruptCacheError, ReferenceMismatchError
from irtrain.shards import IGNORE_INDEX, Row, ShardSet
from irtrain.train.batching import Batch, PackedData, collate, plan_micro_batches
from irtrain.train.packed import packed_token_stats
from irtrain.train.reference import ReferenceKey, array_checksums, batch_sequence_logps, verify_arrays
from irtrain.train.strategy import Strategy, world_from_env

RowsKey = tuple[tuple[int, int], ...]


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
def mismatched_logps(model: Any, batch: Batch, segments: np.ndarray, device: torch.device,
                     autocast: Callable[[], Any] | None = None) -> Tensor:
    """[B] float64 logpi(y_(i+1) | x_i) under `model` (one padding-free no-grad forward)."""
    mb = collate(mismatched_rows(batch, segments)).to(device)
    with autocast() if autocast else contextlib.nullcontext():
        stats = packed_token_stats(model, mb)
    return batch_sequence_logps(mb, stats)[1]


class MismatchedReference:
    """log pi_ref of KTO's mismatched sequences for every micro-batch of the run, keyed by the
    micro-batch's rows. One safetensors file per rank beside the first shard set (or under
    --reference-dir)."""

    FORMAT = "2"

    def __init__(self, table: dict[RowsKey, np.ndarray]):
        self.table = table

    def get(self, batch: Batch) -> np.ndarray:
        key = tuple(batch.rows)
        if key not in self.table:
            raise ReferenceMismatchError("KTO: no cached reference log-probs for this micro-batch's mismatched pairs "
                                         "(the data plan changed; delete the kto-mismatched-*.safetensors cache)")
        return self.table[key]

    @staticmethod
    def plan_key(cfg: DPOConfig, world_size: int, rank: int) -> dict[str, Any]:
        return {"seed": cfg.seed, "global_batch": cfg.global_batch, "global_batch_tokens": cfg.global_batch_tokens,
                "micro_batch": cfg.micro_batch, "micro_batch_tokens": cfg.micro_batch_tokens, "epochs": cfg.epochs,
                "max_steps": cfg.max_steps, "world_size": world_size, "rank": rank,
                **({"weights": list(cfg.weights)} if cfg.weights else {}),
                **({"global_batch_docs": cfg.global_batch_docs} if cfg.global_batch_docs else {})}

    @classmethod
    def path_for(cls, cfg: DPOConfig, sets: list[ShardSet], key: ReferenceKey, world_size: int, rank: int) -> tuple[Path, dict[str, str]]:
        plan = json.dumps(cls.plan_key(cfg, world_size, rank), sort_keys=True)
        ident = hashlib.sha256(f"{key.id}|{plan}".encode()).hexdigest()[:24]
        base = Path(cfg.reference_dir) if cfg.reference_dir else sets[0].path / "reference"
        meta = {"irtrain_kto_mismatched": cls.FORMAT, "model_hash": key.model_hash, "tokenizer_hash": key.tokenizer_hash,
                "data_hash": key.data_hash, "plan": plan}
        return base / f"kto-mismatched-{ident}.safetensors", meta

    @classmethod
    def load(cls, path: Path, meta: dict[str, str]) -> MismatchedReference:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                found = f.metadata() or {}
                if any(found.get(k) != v for k, v in meta.items()):
                    bad = [k for k, v in meta.items() if found.get(k) != v]
                    raise ReferenceMismatchError(f"{path}: KTO mismatched-pair reference log-probs made for another {', '.join(bad)}")
                arrays = {k: f.get_tensor(k) for k in ("rows", "row_offsets", "logps", "logp_offsets")}
        except (OSError, ValueError) as e:  # safetensors: a truncated or garbled file
            raise CorruptCacheError(f"{path}: unreadable ({str(e).splitlines()[0][:100]})") from None
        verify_arrays(path, arrays, found)
        rows, row_off, logps, logp_off = arrays["rows"], arrays["row_offsets"], arrays["logps"], arrays["logp_offsets"]
        table = {}
        rows = rows.reshape(-1, 2)  # (shard set, row) pairs; row_offsets count pairs
        for j in range(len(row_off) - 1):
            r = rows[row_off[j] : row_off[j + 1]]
            table[tuple((int(a), int(b)) for a, b in r)] = logps[logp_off[j] : logp_off[j + 1]]
        return cls(table)

    @staticmethod
    def save(path: Path, table: dict[RowsKey, np.ndarray], meta: dict[str, str]) -> None:
        from safetensors.numpy import save_file

        keys = list(table)
        rows = np.asarray([x for k in keys for pair in k for x in pair], dtype=np.int64)
        row_off = np.concatenate([[0], np.cumsum([len(k) for k in keys])]).astype(np.int64)
        logps = np.concatenate([table[k] for k in keys]).astype(np.float64) if keys else np.zeros(0)
        logp_off = np.concatenate([[0], np.cumsum([len(table[k]) for k in keys])]).astype(np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        arrays = {"rows": rows, "row_offsets": row_off, "logps": logps, "logp_offsets": logp_off}
        save_file(arrays, str(tmp), metadata={**meta, **array_checksums(arrays)})
        publish(tmp, path)


def check_kto_batches(cfg: DPOConfig, sets: list[ShardSet], pref_set: list[bool]) -> None:
    """KTO needs >= 2 examples in every (real) micro-batch: z comes from mismatched pairs."""
    _, _, world = world_from_env()
    counts = np.concatenate([s.row_segments if is_pref else np.zeros(len(s), dtype=np.int64)
                             for s, is_pref in zip(sets, pref_set)])
    data = PackedData(sets)
    for rank in range(world):
        for j, (rows, weight) in enumerate(plan_micro_batches(cfg, data, world, rank)):
            n = int(counts[rows].sum())
            if weight and n < 2:
                raise ConfigError(
                    f"kto needs at least 2 examples per micro-batch (z comes from mismatched pairs (x_i, y_(i+1)) of the batch), "
                    f"but micro-batch {j + 1} of rank {rank} holds {n}: raise --micro-batch or --micro-batch-tokens, or pack the data")


def _usable(path: Path, meta: dict[str, str]) -> bool:
    """This rank's cache file exists and verifies; a damaged one is removed with a warning."""
    sweep_temps(path.parent, re.escape(path.name), regex=True)
    if not path.is_file():
        return False
    try:
        MismatchedReference.load(path, meta)
        return True
    except CorruptCacheError as e:
        print(f"warning: {e}; recomputing it", file=sys.stderr)
        path.unlink()
        return False


def kto_reference(cfg: DPOConfig, data: PackedData, strategy: Strategy, key: ReferenceKey, model_fn: Callable[[], Any],
                  unpaired_segments: Callable[[Batch], np.ndarray]) -> MismatchedReference:
    """The reference log-probs of the mismatched sequences of every micro-batch of this rank's
    run: loaded from the cache, or computed with `model_fn()` and cached first.
    `unpaired_segments(batch)` gives a micro-batch's example segments."""
    path, meta = MismatchedReference.path_for(cfg, data.sets, key, strategy.world_size, strategy.rank)
    ok = _usable(path, meta)
    missing = strategy.all_reduce(torch.tensor([0.0 if ok else 1.0], device=strategy.device), op="max").item() > 0
    if missing:
        model = model_fn()
        table: dict[RowsKey, np.ndarray] = {}
        todo = []
        for rows, _ in plan_micro_batches(cfg, data, strategy.world_size, strategy.rank):
            ids = tuple(data.locate(int(g)) for g in rows)
            if ids not in table:
                table[ids] = np.zeros(0)
                todo.append(rows)
        count = int(strategy.all_reduce(torch.tensor([float(len(todo))], device=strategy.device), op="max").item())
        for j in range(count):  # every rank runs the same number of forwards (ZeRO-3 lockstep)
            rows = todo[j] if j < len(todo) else todo[0]
            batch = data.batch(rows)
            segs = unpaired_segments(batch)
            if len(segs) == 1:  # a weight-0 filler (never trained on): run it anyway, for the forward count
                segs = np.repeat(segs, 2)
            logps = mismatched_logps(model, batch, segs, strategy.device, strategy.autocast).cpu().numpy()
            if j < len(todo):
                table[tuple(batch.rows)] = logps
        MismatchedReference.save(path, table, meta)
        strategy.barrier()
    return MismatchedReference.load(path, meta)
