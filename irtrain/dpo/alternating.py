"""The alternating SFT/DPO schedule (FORMULAS.md "Multi-objective and alternating SFT/DPO",
seed 001 App. D; the paper found it hurts, the tool exists to reproduce and study that).

`irtrain dpo --alternate-with SFT_DIR --rounds K`: both datasets are split into K parts
(rows, a seeded permutation) and the stages SFT_1 -> DPO_1 -> ... -> SFT_K -> DPO_K run one
after the other, each starting from the previous stage's final checkpoint, each with its
starting model as reference. Stage k writes `OUT/stage-kk-sft` or `OUT/stage-kk-dpo` (its
own metrics.jsonl, with a `stage` column) and a line to `OUT/stages.jsonl`; `--resume`
skips finished stages and resumes the unfinished one.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from irtrain.config import DPOConfig, SFTConfig, TrainConfig
from irtrain.dpo.data import check_preference_shards
from irtrain.dpo.objective import PreferenceObjective
from irtrain.dpo.options import allowed_formats, resolve_loss
from irtrain.errors import ConfigError, ShardError
from irtrain.models import check_tokenizer, load_tokenizer, resolve_model
from irtrain.paths import check_out_dir
from irtrain.sft import SFTObjective
from irtrain.shards import ARRAYS, MANIFEST, SFT_FORMATS, ShardSet, write_shard_arrays
from irtrain.train.batching import Batch
from irtrain.train.loop import TrainResult, train
from irtrain.train.objective import Stats
from irtrain.train.strategy import world_from_env


# ============================================================================ splitting shard sets
def split_rows(sets: list[ShardSet], parts: int, seed: int) -> list[list[tuple[int, int]]]:
    """The rows (set, row) of `sets`, permuted by `seed`, dealt into `parts` near-equal parts."""
    ids = [(k, i) for k, s in enumerate(sets) for i in range(len(s))]
    perm = np.random.default_rng([seed, 7]).permutation(len(ids))
    return [sorted(ids[j] for j in perm[p::parts]) for p in range(parts)]


def write_rows(sets: list[ShardSet], rows: list[tuple[int, int]], out: Path, note: dict[str, Any]) -> ShardSet:
    """Write the given packed rows of `sets` (same format and tokenizer) as a new shard set
    (one shard, through the format's Python writer). Example ids of later sets are offset so
    they stay unique."""
    offsets, base = [], 0
    for s in sets:
        offsets.append(base)
        ex = [np.asarray(sh.arrays["seg_example"]) for sh in s.shards]
        base += int(max((e.max() for e in ex if len(e)), default=-1)) + 1
    cols: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
    row_off, seg_off, n = [0], [0], 0
    for k, i in rows:
        r = sets[k].row(i)
        cols["input_ids"].append(np.asarray(r.input_ids))
        cols["labels"].append(np.asarray(r.labels))
        cols["position_ids"].append(np.asarray(r.position_ids))
        cols["seg_example"].append(np.asarray(r.seg_example, dtype=np.int64) + offsets[k])
        cols["seg_part"].append(np.asarray(r.seg_part))
        cols["seg_score"].append(np.asarray(r.seg_score))
        seg_off.extend((np.asarray(r.cu_seqlens[1:], dtype=np.int64) + n).tolist())
        n += r.num_tokens
        row_off.append(n)
    arrays = {name: np.concatenate(cols[name]).astype(dtype) if cols[name] else np.zeros(0, dtype=dtype)
              for name, (dtype, _) in ARRAYS.items() if name not in ("row_offsets", "seg_offsets")}
    arrays["row_offsets"] = np.asarray(row_off, dtype=np.int64)
    arrays["seg_offsets"] = np.asarray(seg_off, dtype=np.int64)
    first = sets[0].manifest
    write_shard_arrays(out, first["format"], [arrays], max_len=max(int(s.manifest.get("max_len", 0)) for s in sets),
                       packed=first.get("packed", True), tokenizer_hash=first["tokenizer_hash"],
                       chat_template_hash=first.get("chat_template_hash", ""),
                       sources=[{"path": str(s.path), "content_hash": s.content_hash} for s in sets], config=note)
    return ShardSet(out)


def split_data(dirs: list[str], parts: int, seed: int, out_dir: Path, name: str) -> list[Path]:
    """`dirs` split into `parts` shard sets under out_dir/<name>-part-<k>; an existing split of
    the same sources (same content hashes, parts and seed) is reused."""
    sets = [ShardSet(d) for d in dirs]
    note = {"split_of": [s.content_hash for s in sets], "parts": parts, "seed": seed}
    paths = [out_dir / f"{name}-part-{p + 1}" for p in range(parts)]
    if all((p / MANIFEST).is_file() for p in paths):
        if all({k: v for k, v in ShardSet(p).manifest["config"].items() if k != "part"} == note for p in paths):
            return paths
        raise ConfigError(f"{out_dir} holds a split of other data; use another --out")
    for p, rows in enumerate(split_rows(sets, parts, seed)):
        if not rows:
            raise ConfigError(f"{', '.join(dirs)}: {sum(len(s) for s in sets)} packed rows cannot be split into {parts} parts")
        if paths[p].exists():
            shutil.rmtree(paths[p])
        write_rows(sets, rows, paths[p], {**note, "part": p + 1})
    return paths


# ============================================================================ the schedule
class StageSFT(SFTObjective):
    """The SFT objective of one stage, logging its stage number."""

    def __init__(self, cfg: SFTConfig, stage: int):
        super().__init__(cfg)
        self.stage = stage

    def micro_step(self, model: Any, batch: Batch, denominator: float) -> tuple[Tensor, Stats]:
        loss, stats = super().micro_step(model, batch, denominator)
        stats["stage"] = (float(self.stage), 1.0)
        return loss, stats


def check_alternating(cfg: DPOConfig) -> tuple[list[ShardSet], ShardSet]:
    """Everything checkable before the first stage writes anything."""
    if cfg.joint_sft:
        raise ConfigError("--joint-sft and --alternate-with are two different schedules: give one")
    if cfg.ref_model:
        raise ConfigError("--alternate-with: each stage's reference is its starting model; --ref-model does not apply")
    if cfg.weights:
        raise ConfigError("--alternate-with splits its data into --rounds parts of the concatenated directories; --weights "
                          "does not apply")
    if cfg.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {cfg.rounds}")
    if cfg.sft_lr is not None and not cfg.sft_lr > 0:
        raise ConfigError(f"--sft-lr must be > 0, got {cfg.sft_lr}")
    resolve_loss(cfg)
    out = check_out_dir(Path(cfg.out))
    if not cfg.resume and (out / "stages.jsonl").is_file():
        raise ConfigError(f"--out {out} already holds an alternating run: pass --resume to continue it, or pick another --out")
    model_path = resolve_model(cfg.model)
    tok = load_tokenizer(model_path)
    if not cfg.data:
        raise ConfigError("no preference data: give one or more shard directories made by `irtrain prepare`")
    assert cfg.alternate_with is not None
    pref = [ShardSet(d) for d in cfg.data]
    sft = ShardSet(cfg.alternate_with)
    if sft.format not in SFT_FORMATS:
        raise ShardError(f"--alternate-with {cfg.alternate_with}: needs chat or prompt-completion shards, got `{sft.format}`")
    allowed = allowed_formats(cfg.loss)
    for s in pref:
        if s.format not in allowed:
            raise ShardError(f"{s.path}: these are `{s.format}` shards; {cfg.loss} needs `{allowed[0]}` shards")
        check_preference_shards(s, s.format, cfg.loss)
    if len({s.format for s in pref}) > 1 or len({s.tokenizer_hash for s in pref}) > 1:
        raise ShardError("the preference shard directories differ in format or tokenizer; they are split together")
    check_tokenizer(model_path, tok, pref + [sft])
    if cfg.max_steps <= 0:
        for what, sets in (("--alternate-with", [sft]), ("preference data", pref)):
            rows = sum(len(s) for s in sets)
            if cfg.global_batch_tokens <= 0 and int(cfg.epochs * (rows // cfg.rounds)) < cfg.global_batch:
                raise ConfigError(f"{what}: {rows} packed rows split into {cfg.rounds} parts leave fewer rows per part than "
                                  f"--global-batch {cfg.global_batch}; lower --rounds or --global-batch, or set --max-steps")
    return pref, sft


def run_alternating(cfg: DPOConfig) -> list[TrainResult]:
    """SFT_1 -> DPO_1 -> ... -> SFT_K -> DPO_K (see the module docstring). Returns each stage's
    `TrainResult`, in order."""
    check_alternating(cfg)
    assert cfg.alternate_with is not None
    out = Path(cfg.out)
    K = cfg.rounds
    main = world_from_env()[0] == 0
    if main:  # under a multi-process launch the main rank splits the data, the others wait for it
        out.mkdir(parents=True, exist_ok=True)
        sft_parts = split_data([cfg.alternate_with], K, cfg.seed, out / "data", "sft")
        pref_parts = split_data(list(cfg.data), K, cfg.seed, out / "data", "pref")
    else:
        sft_parts = [out / "data" / f"sft-part-{p + 1}" for p in range(K)]
        pref_parts = [out / "data" / f"pref-part-{p + 1}" for p in range(K)]
        deadline = time.monotonic() + 3600
        while not all((p / MANIFEST).is_file() for p in sft_parts + pref_parts):
            if time.monotonic() > deadline:
                raise ShardError(f"{out / 'data'}: the main rank did not write the data split within an hour")
            time.sleep(0.5)
    log_path = out / "stages.jsonl"
    done = {}
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["stage"]] = rec
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    model = str(cfg.model)
    results = []
    for r in range(K):
        for kind in ("sft", "dpo"):
            stage = 2 * r + (1 if kind == "sft" else 2)
            stage_out = out / f"stage-{stage:02d}-{kind}"
            if stage in done:
                model = done[stage]["checkpoint"]
                continue
            resume = cfg.resume and stage_out.is_dir() and any(stage_out.glob("checkpoint-*"))
            if kind == "sft":
                scfg = SFTConfig(**{**shared, "model": model, "data": [str(sft_parts[r])], "out": str(stage_out),
                                    "lr": cfg.sft_lr if cfg.sft_lr is not None else cfg.lr, "resume": resume})
                result = train(scfg, StageSFT(scfg, stage))
            else:
                dcfg = dataclasses.replace(cfg, model=model, data=[str(pref_parts[r])], out=str(stage_out),
                                           alternate_with=None, resume=resume)
                result = train(dcfg, PreferenceObjective(dcfg, stage=stage))
            model = str(result.last_checkpoint)
            rec = {"stage": stage, "round": r + 1, "kind": kind, "out": str(stage_out), "checkpoint": model,
                   "steps": result.steps, "data": str((sft_parts if kind == "sft" else pref_parts)[r])}
            if main:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            results.append(result)
    return results
