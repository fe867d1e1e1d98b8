"""Preference shards as examples: checks before training, and the grouping of a micro-batch's
segments into examples (pairs, K ranked candidates, unpaired responses)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from irtrain.errors import ShardError
from irtrain.shards import IGNORE_INDEX, ShardSet
from irtrain.train.batching import Batch
from irtrain.train.reference import ReferenceLogps, batch_reference


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
        n_resp = sh.segment_response_tokens
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
    """Group the segments of a micro-batch into examples (rows of preference shard sets only;
    `pref_set[k]` says whether shard set k holds preference data, `row_lengths[k]` its rows'
    tokens)."""
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
        ref = refs[k]
        if ref is not None:
            toks.append(np.asarray(ref.row_tokens(i), dtype=np.float32))
            segs.append(np.asarray(ref.row_segments(i)[0], dtype=np.float64))
        else:
            n_resp = int((labels[pos + 1 : pos + n] != IGNORE_INDEX).sum())  # the first token of a row is never trained
            n_seg = int(((cu[1:] > pos) & (cu[1:] <= pos + n)).sum())
            toks.append(np.full(n_resp, np.nan, dtype=np.float32))
            segs.append(np.full(n_seg, np.nan, dtype=np.float64))
        pos += n
    return (torch.from_numpy(np.concatenate(toks)).to(device), torch.from_numpy(np.concatenate(segs)).to(device))
