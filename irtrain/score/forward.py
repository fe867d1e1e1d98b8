"""The model pass of `irtrain score`: padding-free forwards over the scored segments, the
LM head only at the response tokens and the scored states (`irtrain.train.packed.packed_scores`).

Models load with irtrain's packed attention (`irtrain.train.packed.default_attn_implementation`:
per-document causal SDPA, `irtrain_varlen`, on CPU; flash-attn's varlen kernel, or SDPA, on
GPU), so no [N, N] mask is built over a packed batch; on a GPU straight onto the device in
the compute dtype."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irtrain.adapters import load_causal_lm
from irtrain.config import ScoreConfig
from irtrain.errors import ConfigError, TokenizerError
from irtrain.score.inputs import ScoredSegment
from irtrain.score.parallel import ALL, Share
from irtrain.shards import ShardSet
from irtrain.train.batching import collate
from irtrain.train.packed import default_attn_implementation, packed_scores
from irtrain.train.reference import batch_sequence_logps


@dataclass
class ModelScores:
    """Per segment (in `segments` order): log π(y|x) [S] f64, |y| [S], and the values of its
    states (a list of [K_s + 1] f64 arrays); `done` [S] marks the segments scored (all, but
    for a `Share` of several processes)."""

    logp: np.ndarray
    num_tokens: np.ndarray
    values: list[np.ndarray]
    tokens: int  # tokens run through the model
    done: np.ndarray


def load_model(path: Path, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool,
               attn_implementation: str | None = None) -> Any:
    """A model directory, or an adapter checkpoint (its base with the adapter merged), for
    inference: `attn_implementation` (default: irtrain's packed attention for `device`), on
    a GPU loaded straight there (no copy in host memory first)."""
    from safetensors import SafetensorError

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code,
                              "attn_implementation": attn_implementation or default_attn_implementation(device)}
    if device.type == "cuda":
        kwargs["device_map"] = {"": device}
    try:
        model = load_causal_lm(path, **kwargs)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{path}: cannot load the model ({type(e).__name__}: {first})") from None
    if device.type != "cuda":
        model = model.to(device)
    return model.eval().requires_grad_(False)


def _batches(segments: list[ScoredSegment], shards: ShardSet, budget: int) -> Iterator[tuple[list[int], list[int]]]:
    """(rows, their segment indices) per forward: whole rows, at most `budget` tokens (or one row)."""
    by_row: dict[int, list[int]] = {}
    for k, s in enumerate(segments):
        by_row.setdefault(s.row, []).append(k)
    rows: list[int] = []
    segs: list[int] = []
    tokens = 0
    for r in sorted(by_row):
        n = shards.row(r).num_tokens
        if rows and tokens + n > budget:
            yield rows, segs
            rows, segs, tokens = [], [], 0
        rows.append(r)
        segs += by_row[r]
        tokens += n
    if rows:
        yield rows, segs


@torch.no_grad()
def score_model(path: Path, shards: ShardSet, segments: list[ScoredSegment], *, cfg: ScoreConfig, device: torch.device,
                dtype: torch.dtype, console: Any, label: str, attn_implementation: str | None = None,
                share: Share = ALL) -> ModelScores:
    """Run one model over every segment (or, for `share`, over its forwards): sequence
    log-probs and state values."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    model = load_model(path, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                       attn_implementation=attn_implementation)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    logp = np.zeros(len(segments), dtype=np.float64)
    num_tokens = np.zeros(len(segments), dtype=np.int64)
    values: list[np.ndarray] = [np.empty(0)] * len(segments)
    done = np.zeros(len(segments), dtype=bool)
    batches = [b for i, b in enumerate(_batches(segments, shards, cfg.batch_tokens)) if share.mine(i)]
    total = int(sum(int(shards.row_lengths[r]) for rows, _ in batches for r in rows))
    seen = 0
    with Progress(TextColumn(f"[bold]score[/] {escape(label)}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=total)
        for rows, segs in batches:
            batch = collate([shards.row(r) for r in rows])
            if int(batch.input_ids.max()) >= vocab:
                raise TokenizerError(f"{shards.path}: token id {int(batch.input_ids.max())} is outside {path}'s vocabulary ({vocab})")
            batch = batch.to(device)
            # map (row, segment start) to the batch's segment index and token offset
            row_off = dict(zip(rows, np.cumsum([0] + [shards.row(r).num_tokens for r in rows]).tolist()))
            where = {int(x): i for i, x in enumerate(batch.cu_seqlens[:-1].cpu().numpy())}
            seg_index = [where[row_off[segments[k].row] + segments[k].start] for k in segs]
            flat = torch.from_numpy(np.concatenate([segments[k].states + row_off[segments[k].row] + segments[k].start
                                                    for k in segs])).to(device)
            # the head at the response tokens and the scored states only
            stats, v_t = packed_scores(model, batch, flat, tau=cfg.value_temperature)
            _, sums_t, counts_t = batch_sequence_logps(batch, stats)
            sums, counts = sums_t.cpu().numpy(), counts_t.cpu().numpy()  # one device sync per forward
            for k, j in zip(segs, seg_index):
                logp[k] = float(sums[j])
                num_tokens[k] = int(counts[j])
            v = v_t.double().cpu().numpy()
            off = 0
            for k in segs:
                n = segments[k].num_states
                values[k] = v[off:off + n]
                off += n
            done[segs] = True
            seen += batch.num_tokens
            progress.update(task, completed=seen)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ModelScores(logp=logp, num_tokens=num_tokens, values=values, tokens=seen, done=done)
