"""`irtrain score`: what a model's logits say about the value of each reasoning state.

For every response (the tokens whose label is not -100) the response is split into
steps at `--step-delimiter` (FORMULAS.md, "Value ranking"), and the soft value
``V(s) = τ·logsumexp(l(s)/τ)`` (`--value-temperature` τ) is read at

- step 0: ``s_0``, the last prompt position (its logits predict the first response token);
- step k = 1..K: the position of step k's last token (the state after step k); the last
  step ends at the response's last content token;
- step K+1, the terminal state: the end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, eos)
  where the response has one; nothing the template appends after it is a state.

Where a step ends (the delimiter belongs to the step it closes; exact at the byte level)
and which token ends the turn is defined in `irtrain.score.steps` (computed in Rust).

Output, in ``--out``: one Parquet table per model, ``<name>.parquet`` (a run's checkpoint
named ``<run>-checkpoint-<step>``, any other model by its directory; `inputs.table_names`),
one row per state (what the terminal table shows instead of the name is the model's label:
``--labels``, else ``run@step``, `irtrain.labels`; recorded as ``label`` in the table's
metadata and ``summary.json``, never in the file names):

=================  =========================================================================
example_id, part   the source example (0-based over the inputs) and its segment: 0 = the
                   response or `chosen`, 1 = `rejected` (k = k-th candidate of ranked data)
step, position     step index (0 = s_0) and token position inside the tokenized sequence
terminal           the state is the end-of-turn token (step K+1), not a step's end
value              V(s)
num_steps          K, the steps of this response's content
logp, logp_mean    log π(y|x) = Σ_t log p_t and its mean over the response tokens
num_tokens         |y|
value_s0           V(s_0) of this response
ref_logp, reward   with ``--ref-model``: log π_ref(y|x) and β·(log π − log π_ref)
margin, dpo_loss,  with ``--ref-model`` on preference data, for the pair (both rows):
dpo_accuracy       m = reward(chosen) − reward(rejected), −logσ(m), 1.0 if m > 0
=================  =========================================================================

The table's Parquet metadata (key ``irtrain``) and ``summary.json`` beside the tables record
the data's content hash, the step delimiter and the settings, so that `irtrain rank`
can refuse tables of different data. One run at a time holds ``--out`` (`irtrain.paths.OutLock`);
a later run of the same data and settings adds its models to ``summary.json`` (a model
scored again is replaced), one of other data or settings starts it anew. Responses the
delimiter never splits (one step: s_0, the content's end, the end-of-turn token) are counted
(``data.no_step_boundary``), with a warning.

Inference is padding-free: rows of ``--batch-tokens`` tokens are concatenated into one
sequence whose position ids restart at every document, and no attention crosses a
document (`irtrain.train.packed.packed_scores`, with irtrain's packed attention: per-document
SDPA on CPU, flash-attn's varlen kernel or SDPA on GPU; no [N, N] mask), and the LM head
runs only at the response tokens and the scored states, in chunks (`irtrain.train.head`).
Parameters are bf16 on GPU (``--dtype auto``, loaded straight onto it), fp32 on CPU; values
and log-probs are computed in fp32. Under `torchrun` the models, or the forwards of each,
are split over the processes (`irtrain.score.parallel`), with the same result.

Raw input files (chat, preference, prompt+completion JSONL/JSON/Parquet) go through
`irtrain prepare` first (unpacked, into ``OUT/prepared``, reused when unchanged); the
response is the last assistant turn (``--mask last``), or the completion.

The package: `irtrain.score.steps` (token bytes, step ends and states, in Rust), `irtrain.score.inputs`
(models, table names, data, the scored segments and their states), `irtrain.score.forward`
(the model pass), `irtrain.score.parallel` (several processes), `irtrain.score.table` (the
table, its metadata and the summary); `run` here.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from irtrain.config import ScoreConfig, config_to_dict
from irtrain.display import quiet_transformers
from irtrain.durable import sweep_temps
from irtrain.errors import ConfigError, DataError
from irtrain.labels import assign_labels
from irtrain.models import check_tokenizer, load_tokenizer, resolve_device, resolve_dtype, resolve_model
from irtrain.paths import OutLock
from irtrain.score.forward import ModelScores, load_model, score_model
from irtrain.score.inputs import (
    ScoredSegment,
    check_weights,
    out_dir,
    read_segments,
    resolve_data,
    resolve_models,
    states_hash,
    table_names,
)
from irtrain.score.parallel import ALL, Ranks, Share, merge_parts, model_rounds
from irtrain.score.steps import split_states, token_bytes, unescape
from irtrain.score.table import (
    BASE_COLUMNS,
    META_KEY,
    PAIR_COLUMNS,
    REF_COLUMNS,
    SUMMARY,
    TABLE_VERSION,
    build_table,
    merge_summary,
    model_summary,
    print_summary,
    read_summary,
    read_table_meta,
    write_json,
    write_table,
)
from irtrain.shards import ShardSet

__all__ = [
    "run", "ScoredSegment", "ModelScores", "read_segments", "resolve_models", "resolve_data", "load_model",
    "score_model", "build_table", "write_table", "read_table_meta", "token_bytes", "split_states", "unescape",
    "table_names", "check_weights", "META_KEY", "TABLE_VERSION", "SUMMARY", "BASE_COLUMNS",
    "REF_COLUMNS", "PAIR_COLUMNS",
]


def run(cfg: ScoreConfig, *, console: Any = None) -> dict[str, Any]:
    """Score the data with every model `cfg` names; write the tables and `summary.json`
    into `cfg.out`; return the summary (also printed as a table). Under `torchrun` every
    rank calls this and returns the same summary."""
    from rich.console import Console

    console = console or Console(highlight=False)
    _check(cfg)
    models = resolve_models(cfg)
    # display labels (--labels, else run@step); table file names stay as `table_names` gives them
    labels = dict(zip((n for n, _ in models), assign_labels(
        cfg.labels, [(n, [str(p)] + ([cfg.model] if k == 0 and cfg.model else [])) for k, (n, p) in enumerate(models)],
        what="model")))
    with Ranks() as ranks, contextlib.ExitStack() as held, quiet_transformers():  # its bars would break the display
        if not ranks.is_main:
            console = Console(quiet=True)

        def take_out() -> str:
            out = out_dir(cfg.out)
            # score processes sharing an --out would overwrite each other's summary: one run at a time
            held.enter_context(OutLock(out, "score"))
            sweep_temps(out, r"[^/]+\.parquet|summary\.json", regex=True)  # tables a killed score left half-written
            return str(out)

        out = Path(ranks.on_main(take_out))
        return _score(cfg, models, labels, out, console, ranks)


def _score(cfg: ScoreConfig, models: list[tuple[str, Path]], labels: dict[str, str], out: Path, console: Any,
           ranks: Ranks) -> dict[str, Any]:
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else models[0][1]
    shards = ShardSet(Path(ranks.on_main(lambda: str(resolve_data(cfg, tok_dir, out, console).path))))
    tokenizer = load_tokenizer(tok_dir)
    # shards that record a tokenizer must have been made with this one (the one definition
    # of the tokenizer hash, as in training)
    check_tokenizer(tok_dir, tokenizer, [shards])
    delimiter = unescape(cfg.step_delimiter)
    segments = read_segments(shards, tokenizer, delimiter, max_len=cfg.max_len)
    if not segments:
        raise DataError(f"{shards.path}: no response to score (every segment's labels are -100)")
    states_id = states_hash(shards, segments)  # what rank matches tables on (not the packing)
    one_step = sum(s.num_steps <= 1 for s in segments)
    if one_step and ranks.is_main:
        print(f"warning: {one_step} of {len(segments)} responses have no step boundary (the step delimiter "
              f"{delimiter!r} never splits them): each is one step, only s_0 and its end (and the end-of-turn token) are scored", file=sys.stderr)
    device = ranks.device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, auto=torch.bfloat16 if device.type == "cuda" else torch.float32)
    attn = getattr(cfg, "attn_implementation", None)  # irtrain's packed attention unless the config names one

    def scores(path: Path, label: str, share: Share = ALL) -> ModelScores:
        return score_model(path, shards, segments, cfg=cfg, device=device, dtype=dtype, console=console, label=label,
                           attn_implementation=attn, share=share)

    ref_logps = None
    if cfg.ref_model:
        ref_path = resolve_model(cfg.ref_model, flag="--ref-model")
        check_weights(ref_path)
        ref_logps = merge_parts(ranks.all_gather(scores(ref_path, f"reference {ref_path.name}", ranks.share))).logp

    summary: dict[str, Any] = {
        "irtrain_score": TABLE_VERSION,
        "data": {"path": str(shards.path), "format": shards.format, "content_hash": shards.content_hash,
                 "states_hash": states_id,
                 "tokenizer_hash": shards.tokenizer_hash, "segments": len(segments),
                 "examples": len({s.example for s in segments}), "states": int(sum(s.num_states for s in segments)),
                 "no_step_boundary": int(one_step)},
        "step_delimiter": delimiter, "value_temperature": cfg.value_temperature, "beta": cfg.beta,
        "ref_model": cfg.ref_model, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "processes": ranks.world, "config": config_to_dict(cfg), "tables": {}, "models": {},
    }
    if ranks.is_main:
        summary = merge_summary(read_summary(out / SUMMARY), summary)

    def write(name: str, path: Path, res: ModelScores, started: float) -> dict[str, Any]:
        frame = build_table(segments, res, ref_logps=ref_logps, beta=cfg.beta, preference=shards.format == "preference")
        meta = {"kind": "irtrain-score", "version": TABLE_VERSION, "model": name, "model_path": str(path),
                "data_hash": shards.content_hash, "states_hash": states_id, "data_format": shards.format,
                "data_path": str(shards.path),
                "step_delimiter": delimiter, "value_temperature": cfg.value_temperature, "beta": cfg.beta,
                "ref_model": cfg.ref_model, "label": labels[name]}
        write_table(frame, out / f"{name}.parquet", meta)
        return {"label": labels[name], **model_summary(frame, path, time.perf_counter() - started, res.tokens)}

    def record(entries: list[tuple[str, dict[str, Any]]]) -> None:
        for name, entry in entries:
            summary["tables"][name] = f"{name}.parquet"
            summary["models"][name] = entry
        write_json(out / SUMMARY, summary)  # after every model (or round of models): a crash keeps what is done

    if len(models) >= ranks.world:  # whole models per rank (one process: every model, in order)
        for round_ in model_rounds(len(models), ranks.world):
            mine = round_[ranks.rank] if ranks.rank < len(round_) else None
            entry = None
            if mine is not None:
                name, path = models[mine]
                started = time.perf_counter()
                entry = (name, write(name, path, scores(path, labels[name]), started))
            done = ranks.gather(entry)
            if done is not None:
                record([e for e in done if e is not None])
    else:  # every model on every rank, each rank its share of the forwards
        for name, path in models:
            started = time.perf_counter()
            parts = ranks.gather(scores(path, labels[name], ranks.share))
            if parts is not None:
                record([(name, write(name, path, merge_parts(parts), started))])
    if ranks.is_main:
        print_summary(summary, console)
    return ranks.on_main(lambda: summary)


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
