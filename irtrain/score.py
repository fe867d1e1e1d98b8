"""`irtrain score`: what a model's logits say about the value of each reasoning state.

For every response (the tokens whose label is not -100) the response is split into
steps at `--step-delimiter` (FORMULAS.md, "Value ranking"), and the soft value
``V(s) = τ·logsumexp(l(s)/τ)`` (`--value-temperature` τ) is read at

- step 0: ``s_0``, the last prompt position (its logits predict the first response token);
- step k ≥ 1: the position of step k's last token (the state after step k).

A step ends where its delimiter ends (the delimiter belongs to the step it closes; a run
of delimiters counts as one; a delimiter at the very start opens no step), and the last
step ends at the response's last token. "Last token" is exact at the byte level: each
token's bytes are known (byte-level BPE: its byte alphabet; otherwise incremental
decoding), and the token holding a step's last byte ends that step. When two steps end
in the same token (a token holding a delimiter run and more), the later one is kept.

Output, in ``--out``: one Parquet table per model, ``<name>.parquet``, one row per state:

=================  =========================================================================
example_id, part   the source example (0-based over the inputs) and its segment: 0 = the
                   response or `chosen`, 1 = `rejected` (k = k-th candidate of ranked data)
step, position     step index (0 = s_0) and token position inside the tokenized sequence
value              V(s)
num_steps          steps of this response
logp, logp_mean    log π(y|x) = Σ_t log p_t and its mean over the response tokens
num_tokens         |y|
value_s0           V(s_0) of this response
ref_logp, reward   with ``--ref-model``: log π_ref(y|x) and β·(log π − log π_ref)
margin, dpo_loss,  with ``--ref-model`` on preference data, for the pair (both rows):
dpo_accuracy       m = reward(chosen) − reward(rejected), −logσ(m), 1.0 if m > 0
=================  =========================================================================

The table's Parquet metadata (key ``irtrain``) and ``summary.json`` beside the tables record
the data's content hash, the step delimiter and the settings, so that `irtrain rank`
can refuse tables of different data.

Inference is padding-free: rows of ``--batch-tokens`` tokens are concatenated into one
sequence whose position ids restart at every document, and no attention crosses a
document (`irtrain.train.packed.packed_scores`), and the LM head runs only at the response
tokens and the scored states, in chunks (`irtrain.train.head`). Parameters are bf16 on GPU
(``--dtype auto``), fp32 on CPU; values and log-probs are computed in fp32.

Raw input files (chat, preference, prompt+completion JSONL/JSON/Parquet) go through
`irtrain prepare` first (unpacked, into ``OUT/prepared``, reused when unchanged); the
response is the last assistant turn (``--mask last``), or the completion.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from irtrain.config import ScoreConfig, config_to_dict
from irtrain.errors import ConfigError, DataError, IrtrainIOError, TokenizerError
from irtrain.losses import IGNORE_INDEX, PREFERENCE_LOSSES, PreferenceBatch
from irtrain.shards import MANIFEST, ShardSet

#: Parquet metadata key of a score table, and the version of its layout.
META_KEY = b"irtrain"
TABLE_VERSION = 1
SUMMARY = "summary.json"
#: the columns every table has, in order
BASE_COLUMNS = ("example_id", "part", "step", "position", "value", "num_steps",
                "logp", "logp_mean", "num_tokens", "value_s0")
REF_COLUMNS = ("ref_logp", "reward")
PAIR_COLUMNS = ("margin", "dpo_loss", "dpo_accuracy")
_MASK_FOR_FORMAT = {"chat": "last", "preference": "last", "prompt-completion": "completion",
                    "unpaired": "completion", "ranked": "completion"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# =========================================================================== entry point
def run(cfg: ScoreConfig, *, console: Any = None) -> dict[str, Any]:
    """Score the data with every model `cfg` names; write the tables and `summary.json`
    into `cfg.out`; return the summary (also printed as a table)."""
    from rich.console import Console

    console = console or Console(highlight=False)
    _check(cfg)
    models = resolve_models(cfg)
    out = _out_dir(cfg.out)
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else models[0][1]
    shards = resolve_data(cfg, tok_dir, out, console)
    tokenizer = _load_hf_tokenizer(tok_dir)
    _check_tokenizer(shards, tok_dir, tokenizer)
    delimiter = unescape(cfg.step_delimiter)
    segments = read_segments(shards, tokenizer, delimiter, max_len=cfg.max_len)
    if not segments:
        raise DataError(f"{shards.path}: no response to score (every segment's labels are -100)")
    device = _device(cfg.device)
    dtype = _dtype(cfg.dtype, device)

    ref_logps = None
    if cfg.ref_model:
        from irtrain.train.loop import resolve_model

        ref_path = resolve_model(cfg.ref_model)
        ref_logps = score_model(ref_path, shards, segments, cfg=cfg, device=device, dtype=dtype,
                                console=console, label=f"reference {ref_path.name}").logp

    summary: dict[str, Any] = {
        "irtrain_score": TABLE_VERSION,
        "data": {"path": str(shards.path), "format": shards.format, "content_hash": shards.content_hash,
                 "tokenizer_hash": shards.tokenizer_hash, "segments": len(segments),
                 "examples": len({s.example for s in segments}), "states": int(sum(s.num_states for s in segments))},
        "step_delimiter": delimiter, "value_temperature": cfg.value_temperature, "beta": cfg.beta,
        "ref_model": cfg.ref_model, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "config": config_to_dict(cfg), "tables": {}, "models": {},
    }
    for name, path in models:
        started = time.perf_counter()
        res = score_model(path, shards, segments, cfg=cfg, device=device, dtype=dtype, console=console, label=name)
        frame = build_table(segments, res, ref_logps=ref_logps, beta=cfg.beta,
                            preference=shards.format == "preference")
        meta = {"kind": "irtrain-score", "version": TABLE_VERSION, "model": name, "model_path": str(path),
                "data_hash": shards.content_hash, "data_format": shards.format, "data_path": str(shards.path),
                "step_delimiter": delimiter, "value_temperature": cfg.value_temperature, "beta": cfg.beta,
                "ref_model": cfg.ref_model}
        table_path = out / f"{name}.parquet"
        write_table(frame, table_path, meta)
        seconds = time.perf_counter() - started
        summary["tables"][name] = table_path.name
        summary["models"][name] = _model_summary(frame, path, seconds, res.tokens)
        _write_json(out / SUMMARY, summary)  # after every model: a crash keeps what is done
    _print_summary(summary, console)
    return summary


# =========================================================================== inputs
def _check(cfg: ScoreConfig) -> None:
    if not cfg.data:
        raise ConfigError("no data: give shards from `irtrain prepare` or a raw data file")
    if not cfg.out:
        raise ConfigError("no output directory: give --out")
    if not cfg.model and not cfg.checkpoints:
        raise ConfigError("no model: give --model or --checkpoints")
    if not cfg.value_temperature > 0:
        raise ConfigError(f"value_temperature = {cfg.value_temperature} must be > 0")
    if cfg.batch_tokens < 1 or cfg.max_len < 2:
        raise ConfigError("batch_tokens must be >= 1 and max_len >= 2")
    if not cfg.step_delimiter:
        raise ConfigError("step_delimiter must not be empty")


def unescape(s: str) -> str:
    r"""`\n`, `\t`, `\r` and `\\` typed on a command line become the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], s)


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._") or "model"


def _checkpoint_order(p: Path) -> tuple[int, int, str]:
    m = re.fullmatch(r"checkpoint-(\d+)", p.name)
    return (0, int(m.group(1)), p.name) if m else (1, 0, p.name)


def resolve_models(cfg: ScoreConfig) -> list[tuple[str, Path]]:
    """(table name, model directory) for `--model` and every checkpoint of `--checkpoints`
    (each subdirectory with a config.json, `checkpoint-<step>` by step; the directory itself
    too when it holds a model)."""
    from irtrain.train.loop import resolve_model

    found: list[tuple[str, Path]] = []
    if cfg.model:
        path = resolve_model(cfg.model)
        found.append((_safe_name(Path(cfg.model.rstrip("/")).name), path))
    if cfg.checkpoints:
        root = Path(cfg.checkpoints)
        if not root.is_dir():
            raise ConfigError(f"--checkpoints {root}: no such directory")
        subs = sorted((p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file()), key=_checkpoint_order)
        if (root / "config.json").is_file():
            subs.append(root)
        if not subs:
            raise ConfigError(f"--checkpoints {root}: no model in it (no subdirectory with a config.json)")
        found += [(_safe_name(p.name), p) for p in subs]
    names: dict[str, int] = {}
    unique = []
    for name, path in found:
        k = names.get(name, 0)
        names[name] = k + 1
        unique.append((name if k == 0 else f"{name}-{k + 1}", path))
    return unique


def _out_dir(out: str) -> Path:
    from irtrain.train.loop import check_out_dir

    path = check_out_dir(Path(out))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_data(cfg: ScoreConfig, tok_dir: Path, out: Path, console: Any) -> ShardSet:
    """`cfg.data` as shards: a shard directory as is; raw files through `irtrain prepare`
    (unpacked, cached in ``OUT/prepared``)."""
    data = Path(cfg.data)
    if data.is_dir() and (data / MANIFEST).is_file():
        return ShardSet(data)
    if not data.exists():
        raise DataError("no such file or directory", path=str(data))
    from irtrain.config import PrepareConfig
    from irtrain.data import detect_format, first_row, resolve_inputs
    from irtrain.prepare import run as prepare

    fmt = cfg.format
    if fmt == "auto":
        sources = resolve_inputs([str(data)])
        line = first_row(sources[0])
        if line is None:
            raise DataError("file is empty (no rows)", path=sources[0].name)
        fmt = detect_format(line)
    manifest = prepare(PrepareConfig(
        inputs=[str(data)], out=str(out / "prepared"), tokenizer=str(tok_dir), format=fmt,
        mask=_MASK_FOR_FORMAT.get(fmt, "last"), max_len=cfg.max_len, truncation="drop", pack=False,
    ), console=console)
    too_long = int(manifest["report"].get("dropped_too_long", 0))
    if too_long:
        raise DataError(f"{too_long} example(s) are longer than --max-len {cfg.max_len} tokens; raise --max-len "
                        "(score never truncates)", path=str(data))
    return ShardSet(out / "prepared")


def _load_hf_tokenizer(path: Path) -> Any:
    from irtrain.train.loop import load_tokenizer

    return load_tokenizer(path)


def _check_tokenizer(shards: ShardSet, tok_dir: Path, tokenizer: Any) -> None:
    """Shards that record a tokenizer must have been made with this one (the training
    loop's check: one definition of the tokenizer hash)."""
    from irtrain.train.loop import check_tokenizer

    check_tokenizer(tok_dir, tokenizer, [shards])


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


# =========================================================================== steps
def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """The exact bytes each token contributes to the decoded text.

    Byte-level BPE (GPT-2, Llama-3, Qwen, ...): through the byte alphabet, added tokens
    as their content. Otherwise: incremental decoding (each token gets the text its
    decoding adds, so a character split over several tokens belongs to the last one).
    """
    table = _byte_decoder(tokenizer)
    if table is not None:
        added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        pieces = []
        for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
            if i in added:
                pieces.append(added[i].encode("utf-8"))
            elif t is not None and all(c in table for c in t):
                pieces.append(bytes(table[c] for c in t))
            else:
                return incremental_token_bytes(tokenizer, ids)
        return pieces
    return incremental_token_bytes(tokenizer, ids)


def incremental_token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """Per-token bytes by incremental decoding (any tokenizer). Two decodes of a small window
    that start at the same token (so decoders that strip a leading space agree) give each
    token the text it adds; a trailing incomplete character (U+FFFD) waits for the token
    that completes it, so every character belongs to the token holding its last byte."""
    dec = lambda a, b: tokenizer.decode(ids[a:b], skip_special_tokens=False,  # noqa: E731
                                        clean_up_tokenization_spaces=False)
    pieces: list[bytes] = []
    prefix, read, extra = 0, 0, 0  # window start; tokens before `read` are all emitted; chars emitted past them
    for k in range(len(ids)):
        before = dec(prefix, read)
        now = dec(prefix, k + 1)
        stable = len(now)
        if k < len(ids) - 1:
            while stable > 0 and now[stable - 1] == "\ufffd":
                stable -= 1
        start = len(before) + extra
        pieces.append(now[start:stable].encode("utf-8") if stable > start else b"")
        extra += max(0, stable - start)
        if stable == len(now):  # nothing pending: slide the window
            prefix, read, extra = read, k + 1, 0
    return pieces


_BYTE_DECODERS: dict[int, dict[str, int] | None] = {}


def _byte_decoder(tokenizer: Any) -> dict[str, int] | None:
    """The char -> byte table of a byte-level BPE tokenizer, or None."""
    key = id(tokenizer)
    if key not in _BYTE_DECODERS:
        table = None
        try:
            spec = json.loads(tokenizer.backend_tokenizer.to_str())
            dec = spec.get("decoder") or {}
            types = [dec.get("type")] + [d.get("type") for d in dec.get("decoders", []) or []]
            if "ByteLevel" in types:
                table = {c: b for b, c in _bytes_to_unicode().items()}
        except (AttributeError, ValueError):
            table = None
        _BYTE_DECODERS[key] = table
    return _BYTE_DECODERS[key]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by every ByteLevel BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def step_ends(pieces: list[bytes], delimiter: bytes) -> list[int]:
    """Index (into `pieces`) of the token that ends each step; see the module docstring.
    Never empty for a non-empty response; strictly increasing; the last is len(pieces) - 1."""
    if not pieces:
        return []
    text = b"".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])  # byte end of each token
    boundaries = []
    i = 0
    while (j := text.find(delimiter, i)) != -1:
        e = j + len(delimiter)
        while text.startswith(delimiter, e):  # a run of delimiters is one boundary
            e += len(delimiter)
        if j > 0:  # a delimiter at the very start opens no step
            boundaries.append(e)
        i = e
    tokens = [min(int(np.searchsorted(ends, b, side="left")), len(pieces) - 1) for b in boundaries if b < len(text)]
    tokens.append(len(pieces) - 1)
    out: list[int] = []
    for t in tokens:  # two steps ending in one token: keep one
        if out and out[-1] == t:
            continue
        out.append(t)
    return out


# =========================================================================== segments
@dataclass
class Segment:
    """One scored sequence: where it is, its response and its states."""

    example: int
    part: int
    row: int  # row index in the shard set
    start: int  # token offset of the segment in its row
    length: int
    states: np.ndarray  # [K+1] token positions in the segment: s_0, then the end of each step

    @property
    def num_states(self) -> int:
        return int(len(self.states))


def read_segments(shards: ShardSet, tokenizer: Any, delimiter: str, *, max_len: int) -> list[Segment]:
    """Every segment with a response, in row order, with its step-end positions."""
    delim = delimiter.encode("utf-8")
    segments = []
    for r in range(len(shards)):
        row = shards.row(r)
        labels = np.asarray(row.labels)
        ids = np.asarray(row.input_ids)
        for s in range(len(row.cu_seqlens) - 1):
            a, b = int(row.cu_seqlens[s]), int(row.cu_seqlens[s + 1])
            if b - a > max_len:
                raise DataError(f"{shards.path}: example {int(row.seg_example[s])} has {b - a} tokens, more than "
                                f"--max-len {max_len}; raise --max-len (score never truncates)")
            resp = np.flatnonzero(labels[a:b] != IGNORE_INDEX)
            if len(resp) == 0:
                continue
            # the first token of a segment is never trained (shard format), so resp[0] >= 1
            ends = step_ends(token_bytes(tokenizer, ids[a:b][resp].tolist()), delim)
            states = np.concatenate([[resp[0] - 1], resp[ends]]).astype(np.int64)
            segments.append(Segment(example=int(row.seg_example[s]), part=int(row.seg_part[s]), row=r,
                                    start=a, length=b - a, states=states))
    return segments


# =========================================================================== the model pass
@dataclass
class ModelScores:
    """Per segment (in `segments` order): log π(y|x) [S] f64, |y| [S], and the values of its
    states (a list of [K_s + 1] f64 arrays)."""

    logp: np.ndarray
    num_tokens: np.ndarray
    values: list[np.ndarray]
    tokens: int  # tokens run through the model


def load_model(path: Path, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    model = model.to(device)  # type: ignore[arg-type]  # transformers' stubs: to(device) is fine
    return model.eval().requires_grad_(False)


def _batches(segments: list[Segment], shards: ShardSet, budget: int) -> Iterator[tuple[list[int], list[int]]]:
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
def score_model(path: Path, shards: ShardSet, segments: list[Segment], *, cfg: ScoreConfig, device: torch.device,
                dtype: torch.dtype, console: Any, label: str) -> ModelScores:
    """Run one model over every segment: sequence log-probs and state values."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from irtrain.train.batching import collate
    from irtrain.train.packed import packed_scores
    from irtrain.train.reference import segment_logps

    model = load_model(path, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    logp = np.zeros(len(segments), dtype=np.float64)
    num_tokens = np.zeros(len(segments), dtype=np.int64)
    values: list[np.ndarray] = [np.empty(0)] * len(segments)
    total = sum(s.length for s in segments)
    seen = 0
    with Progress(TextColumn(f"[bold]score[/] {label}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=total)
        for rows, segs in _batches(segments, shards, cfg.batch_tokens):
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
            _, sums_t, counts_t = segment_logps(batch, stats)
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
            seen += batch.num_tokens
            progress.update(task, completed=seen)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ModelScores(logp=logp, num_tokens=num_tokens, values=values, tokens=seen)


# =========================================================================== the table
def build_table(segments: list[Segment], res: ModelScores, *, ref_logps: np.ndarray | None, beta: float,
                preference: bool) -> Any:
    """The score table (polars), one row per state; see the module docstring."""
    import polars as pl

    counts = np.array([s.num_states for s in segments], dtype=np.int64)
    rep = lambda a: np.repeat(np.asarray(a), counts)  # noqa: E731 - per segment -> per state
    steps = np.concatenate([np.arange(n, dtype=np.int32) for n in counts])
    logp = res.logp
    cols: dict[str, Any] = {
        "example_id": rep([s.example for s in segments]).astype(np.int64),
        "part": rep([s.part for s in segments]).astype(np.int32),
        "step": steps,
        "position": np.concatenate([s.states for s in segments]).astype(np.int32),
        "value": np.concatenate(res.values).astype(np.float64),
        "num_steps": rep(counts - 1).astype(np.int32),
        "logp": rep(logp),
        "logp_mean": rep(logp / np.maximum(res.num_tokens, 1)),
        "num_tokens": rep(res.num_tokens).astype(np.int32),
        "value_s0": rep([v[0] for v in res.values]).astype(np.float64),
    }
    if ref_logps is not None:
        reward = beta * (logp - ref_logps)
        cols["ref_logp"] = rep(ref_logps)
        cols["reward"] = rep(reward)
        if preference:
            margin, loss, acc = _pair_metrics(segments, logp, ref_logps, beta)
            cols["margin"], cols["dpo_loss"], cols["dpo_accuracy"] = rep(margin), rep(loss), rep(acc)
    return pl.DataFrame(cols)


def _pair_metrics(segments: list[Segment], logp: np.ndarray, ref: np.ndarray, beta: float) -> tuple[np.ndarray, ...]:
    """Per segment: its pair's margin, sigmoid DPO loss and accuracy (NaN without a partner)."""
    chosen: dict[int, int] = {}
    rejected: dict[int, int] = {}
    for k, s in enumerate(segments):
        (chosen if s.part == 0 else rejected)[s.example] = k
    pairs = [(chosen[e], rejected[e]) for e in chosen if e in rejected]
    margin = np.full(len(segments), np.nan)
    loss = np.full(len(segments), np.nan)
    acc = np.full(len(segments), np.nan)
    if pairs:
        c, r = (np.array(x) for x in zip(*pairs))
        t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        pb = PreferenceBatch.pairs(t(logp[c]), t(logp[r]), t(ref[c]), t(ref[r]))
        pair_loss = PREFERENCE_LOSSES["sigmoid"](pb, beta=beta).numpy()
        m = beta * ((logp[c] - ref[c]) - (logp[r] - ref[r]))
        for idx in (c, r):
            margin[idx], loss[idx], acc[idx] = m, pair_loss, (m > 0).astype(np.float64)
    return margin, loss, acc


def write_table(frame: Any, path: Path, meta: dict[str, Any]) -> None:
    """Write a score table atomically, with `meta` as JSON under the Parquet key ``irtrain``."""
    import pyarrow.parquet as pq

    table = frame.to_arrow()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise IrtrainIOError(f"{path}: cannot write the score table: {e}") from None


def read_table_meta(path: str | Path) -> dict[str, Any]:
    """The ``irtrain`` metadata of a score table ({} when it has none)."""
    import pyarrow.parquet as pq

    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, ValueError) as e:
        raise DataError(f"not a readable Parquet file: {e}", path=str(path)) from None
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else {}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def _mean(x: Any) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def _model_summary(frame: Any, path: Path, seconds: float, tokens: int) -> dict[str, Any]:
    first = frame.filter(frame["step"] == 0)  # one row per response
    s: dict[str, Any] = {
        "path": str(path), "responses": first.height, "states": frame.height,
        "value/s0": _mean(first["value_s0"]), "value": _mean(frame["value"]),
        "logp": _mean(first["logp"]), "logp_mean": _mean(first["logp_mean"]),
        "num_tokens": _mean(first["num_tokens"]), "num_steps": _mean(first["num_steps"]),
        "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
    }
    if "reward" in frame.columns:
        s["reward"] = _mean(first["reward"])
    if "margin" in frame.columns:
        pairs = first.filter(first["part"] == 0)
        s["rewards/margins"] = _mean(pairs["margin"])
        s["eval/pref_loss"] = _mean(pairs["dpo_loss"])
        s["eval/pref_accuracy"] = _mean(pairs["dpo_accuracy"])
    return s


def _print_summary(summary: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    keys = ["responses", "states", "value/s0", "logp_mean", "reward", "eval/pref_accuracy", "tokens_per_second"]
    keys = [k for k in keys if any(k in m for m in summary["models"].values())]
    t = Table(title=f"score ({summary['data']['format']}, {summary['data']['segments']} responses)", title_justify="left")
    t.add_column("model")
    for k in keys:
        t.add_column(k, justify="right")
    for name, m in summary["models"].items():
        t.add_row(name, *(_fmt(m.get(k)) for k in keys))
    console.print(t)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
