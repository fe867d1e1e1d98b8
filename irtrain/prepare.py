"""`irtrain prepare`: raw conversations to training-ready, memory-mapped shards.

Python reads the inputs (`irtrain.data.Source`) and orchestrates; the Rust
extension renders the chat template, tokenizes with offsets, masks, truncates,
packs (best-fit decreasing) and writes the shards, in parallel and outside the
GIL. The output format is `irtrain/shards.py`'s.

The output directory is written as `.OUT.tmp-PID` next to `--out` and renamed
when complete, so a failed run leaves nothing behind. Its manifest carries a
`cache_key` (tokenizer, chat template, inputs, config): a rerun with the same
key reuses the directory; an existing `--out` that is not a prepare output is
an error, never overwritten.

The chat template's `strftime_now` renders one local time read at the start
(`template_clock` in the manifest), so every row sees the same date; a template
that reads it puts the date (the time, for formats beyond the date) in the key.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from irtrain.config import PrepareConfig, config_to_dict
from irtrain.data import (
    TokenizerFiles,
    detect_format,
    first_row,
    load_tokenizer_files,
    local_clock,
    needs_chat_template,
    parse_columns,
    preparer,
    resolve_inputs,
    row_error,
)
from irtrain.durable import io_error, publish, sweep_temps, temp_name
from irtrain.errors import ConfigError, DataError, IrtrainIOError, ShardError, TemplateError
from irtrain.paths import OutLock
from irtrain.shards import FORMAT_VERSION, MANIFEST, ShardSet, content_hash, iter_documents

#: bump when the output of the same inputs and config changes
PREPARE_VERSION = 3  # 2: {% generation %} masks, per-turn splitting, template variables, local strftime_now; 3: turns written as at inference
#: config fields that do not change the output (left out of the cache key)
_NOT_IN_KEY = ("out", "preview", "threads")
#: at most this many skipped rows are listed in the report
MAX_LISTED_SKIPS = 1000
#: names a row field cannot have as a template variable (the template's own inputs)
_RESERVED_VARS = ("messages", "add_generation_prompt")


def run(cfg: PrepareConfig, *, console: Any = None) -> dict[str, Any]:
    """Prepare shards as `cfg` says; print the report; return the manifest."""
    from rich.console import Console

    console = console or Console(highlight=False)
    _check(cfg)
    columns = parse_columns(cfg.columns)
    started = time.perf_counter()
    clock, clock_iso = local_clock()  # once per run: every row sees the same date
    out = Path(cfg.out)
    tok = load_tokenizer_files(cfg.tokenizer, cfg.chat_template)
    sources = resolve_inputs(cfg.inputs, split=cfg.split, subset=cfg.subset)
    fmt = cfg.format if cfg.format != "auto" else _detect(sources[0], columns)
    if fmt == "chat" and not cfg.apply_chat_template:
        raise ConfigError("--no-chat-template: chat rows (messages) are conversations and need the chat template; "
                          "the flag is for string prompt/completion/chosen/rejected fields")
    if needs_chat_template(fmt, cfg.apply_chat_template) and tok.chat_template is None:
        raise TemplateError(f"{cfg.tokenizer}: the tokenizer has no chat template; pass --chat-template FILE")
    fingerprints = [s.fingerprint() for s in sources]
    key = cache_key(cfg, fmt, tok, fingerprints, clock=clock_in_key(tok.chat_template, clock_iso))

    previous = _previous_output(out)
    if previous is not None and previous.get("cache_key") == key:
        console.print(f"[green]cache hit:[/] {out} already holds this data (cache key {key[:12]}); reusing it")
        print_report(previous["report"], console)
        if cfg.preview:
            print_preview(out, tok, cfg.preview, console)
        return previous

    tmp = temp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise io_error(e, out.parent, "create") from None
    with OutLock(out, "prepare"):  # a second prepare on the same --out is refused, not raced
        for p in sweep_temps(out.parent, out.name):  # what a killed prepare of this --out left
            console.print(f"[dim]removed {p}, left by a prepare that did not finish[/]")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            manifest = _build(cfg, fmt, tok, sources, fingerprints, key, tmp, console, (clock, clock_iso))
            manifest["report"]["seconds"] = round(time.perf_counter() - started, 3)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
            publish(tmp, out)  # fsynced; an older output (another key) is replaced atomically, never missing
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise io_error(e, getattr(e, "filename", None) or tmp) from None
        except IrtrainIOError as e:  # from the Rust writer, which does not name the file
            shutil.rmtree(tmp, ignore_errors=True)
            reason = "no space left on device" if "os error 28" in str(e) else str(e)
            raise IrtrainIOError(f"cannot write the shards of --out {out} (under {tmp}): {reason}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    console.print(f"[green]wrote[/] {out} ({len(manifest['shards'])} shard(s), cache key {key[:12]})")
    print_report(manifest["report"], console)
    if cfg.preview:
        print_preview(out, tok, cfg.preview, console)
    return manifest


def _check(cfg: PrepareConfig) -> None:
    if not cfg.inputs:
        raise ConfigError("no inputs: give files, directories or dataset names")
    if not cfg.out:
        raise ConfigError("no output directory: give --out")
    if not cfg.tokenizer:
        raise ConfigError("no tokenizer: give --tokenizer (a directory or hub name)")
    if cfg.max_len < 2:
        raise ConfigError(f"max_len = {cfg.max_len} must be at least 2")
    if cfg.shard_rows < 1:
        raise ConfigError(f"shard_rows = {cfg.shard_rows} must be at least 1")
    if cfg.preview < 0 or cfg.threads < 0:
        raise ConfigError("preview and threads must not be negative")
    for v in template_vars(cfg):
        if v in _RESERVED_VARS or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ConfigError(f"--template-vars {v!r}: not a name a row field can give the template "
                              f"(an identifier other than {', '.join(_RESERVED_VARS)})")


def template_vars(cfg: PrepareConfig) -> list[str]:
    """The row fields `--template-vars` names (repeated or comma-separated)."""
    return [n.strip() for v in cfg.template_vars for n in v.split(",") if n.strip()]


def _detect(source: Any, columns: list[tuple[str, str]]) -> str:
    line = first_row(source)
    if line is None:
        raise DataError("file is empty (no rows)", path=source.name)
    try:
        return detect_format(line, columns)
    except DataError as e:
        raise DataError(e.message, path=source.name, row=1) from None


def cache_key(cfg: PrepareConfig, fmt: str, tok: TokenizerFiles, fingerprints: list[str], *,
              clock: str | None = None) -> str:
    """What identifies a prepare output: tokenizer, template, inputs' hashes, config, and
    the clock the template reads (`clock_in_key`)."""
    conf = {k: v for k, v in config_to_dict(cfg).items() if k not in _NOT_IN_KEY}
    conf["format"] = fmt
    what = {"v": PREPARE_VERSION, "shards": FORMAT_VERSION, "tokenizer": tok.file_sha256,
            "chat_template": tok.chat_template_hash, "sources": fingerprints, "config": conf}
    if clock is not None:
        what["clock"] = clock
    blob = json.dumps(what, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def clock_in_key(template: str | None, clock_iso: str) -> str | None:
    """The part of the clock a template's output depends on: None when it never calls
    `strftime_now`, the local date when every format it passes is date directives only
    (`%d %b %Y`, ...), else the whole time (then the cache hits within the second only)."""
    if not template or "strftime_now" not in template:
        return None
    formats = re.findall(r"strftime_now\(\s*(?:'([^']*)'|\"([^\"]*)\")\s*\)", template)
    calls = template.count("strftime_now(")
    if formats and len(formats) == calls and all(re.fullmatch(r"(?:[^%]|%[aAbBdehjmyY%])*", a or b) for a, b in formats):
        return clock_iso[:10]
    return clock_iso


def _previous_output(out: Path) -> dict[str, Any] | None:
    """The manifest of an existing prepare output at `out`; None when `out` does not
    exist; ShardError when it exists and is something else."""
    if not out.exists():
        return None
    if not (out / MANIFEST).is_file():
        raise ShardError(f"--out {out} exists and is not an irtrain prepare output (no {MANIFEST}); "
                         "choose another --out or remove it")
    try:
        ss = ShardSet(out, verify=False)
    except ShardError as e:
        raise ShardError(f"--out {out} is not a usable prepare output ({e}); choose another --out or remove it") from None
    if "cache_key" not in ss.manifest:
        raise ShardError(f"--out {out} holds shards not written by `irtrain prepare`; choose another --out or remove it")
    try:
        ss.verify()
    except ShardError as e:  # our own output, damaged: never a cache hit, rebuilt and replaced
        print(f"warning: {e}; --out {out} is rebuilt", file=sys.stderr)
        return {**ss.manifest, "cache_key": None}
    return ss.manifest


def _build(cfg: PrepareConfig, fmt: str, tok: TokenizerFiles, sources: list[Any], fingerprints: list[str],
           key: str, tmp: Path, console: Any, clock: tuple[int, str]) -> dict[str, Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    prep = preparer(tok, fmt, cfg.mask, str(tmp), max_len=cfg.max_len, truncation=cfg.truncation, pack=cfg.pack,
                    shard_rows=cfg.shard_rows, skip_invalid=cfg.skip_invalid, threads=cfg.threads,
                    template_vars=template_vars(cfg), clock=clock[0],
                    columns=parse_columns(cfg.columns), apply_chat_template=cfg.apply_chat_template)
    skipped: list[dict[str, Any]] = []
    n_skipped = 0
    with Progress(TextColumn("[bold]prepare[/] {task.description}"), BarColumn(), DownloadColumn(),
                  TextColumn("{task.fields[docs]} docs"), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        for src in sources:
            if src.kind == "hf":
                src.dataset()  # load first, so that the size is known
            task = progress.add_task(Path(src.name).name, total=src.size, docs=0)
            docs_before = prep.progress()[0]
            for chunk in src.chunks():
                _, errors = prep.add_jsonl(chunk.data, chunk.first_row)
                if errors:
                    if not cfg.skip_invalid:
                        raise row_error(src.name, *min(errors))
                    n_skipped += len(errors)
                    for row, _kind, message in sorted(errors)[: max(0, MAX_LISTED_SKIPS - len(skipped))]:
                        skipped.append({"path": src.name, "row": row, "error": message})
                progress.update(task, advance=chunk.progress, docs=prep.progress()[0])
            src.rows = prep.progress()[0] - docs_before  # non-blank rows, skipped ones included
            if src.rows == 0:
                raise DataError("file is empty (no rows)", path=src.name)
    tokenizer_hash = prep.tokenizer_hash
    result = json.loads(prep.finish())
    shards, c = result["shards"], result["counts"]
    slots = c["rows"] * cfg.max_len
    report = {
        "docs_in": c["docs_in"], "docs_out": c["docs_out"], "skipped": c["skipped"],
        "dropped": c["dropped_too_long"] + c["dropped_nothing_trained"],
        "dropped_too_long": c["dropped_too_long"], "dropped_nothing_trained": c["dropped_nothing_trained"],
        "truncated": c["truncated"], "segments": c["segments"], "rows": c["rows"],
        "tokens_total": c["tokens_total"], "tokens_trained": c["tokens_trained"],
        "packing_efficiency": round(c["tokens_total"] / slots, 6) if slots else 0.0,
        "skipped_rows": skipped, "skipped_rows_not_listed": max(0, n_skipped - len(skipped)),
        "split_rows": c["split_rows"], "split_examples": c["split_examples"], "split_reason": c["split_reason"],
        "inference_turns": c["inference_turns"], "inference_reason": c["inference_reason"],
    }
    return {
        "irtrain_shards": FORMAT_VERSION, "format": fmt, "packed": bool(cfg.pack), "max_len": cfg.max_len,
        "tokenizer_hash": tokenizer_hash, "chat_template_hash": tok.chat_template_hash,
        "sources": [{"path": s.name, "sha256": fp, "rows": s.rows} for s, fp in zip(sources, fingerprints)],
        "config": config_to_dict(cfg), "report": report, "shards": shards,
        "content_hash": content_hash(shards), "cache_key": key,
        "template_clock": clock[1], "template_vars": ["tools", "documents", *template_vars(cfg)],
    }


# --------------------------------------------------------------------------- output
def print_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title="prepare report", show_header=False, title_justify="left")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("documents in", f"{report['docs_in']:,}")
    t.add_row("documents out", f"{report['docs_out']:,}")
    t.add_row("skipped (invalid)", f"{report['skipped']:,}")
    t.add_row("dropped (too long / nothing trained)",
              f"{report['dropped']:,} ({report['dropped_too_long']:,} / {report['dropped_nothing_trained']:,})")
    t.add_row("truncated", f"{report['truncated']:,}")
    t.add_row("rows / segments", f"{report['rows']:,} / {report['segments']:,}")
    t.add_row("tokens total", f"{report['tokens_total']:,}")
    t.add_row("tokens trained", f"{report['tokens_trained']:,}")
    t.add_row("packing efficiency", f"{report['packing_efficiency']:.1%}")
    if "seconds" in report:
        t.add_row("seconds", f"{report['seconds']:.2f}")
    console.print(t)
    for line in template_statements(report):
        console.print(line, markup=False)
    for s in report.get("skipped_rows", [])[:20]:
        console.print(f"  skipped {s['path']}:{s['row']}: {s['error']}", markup=False)
    more = len(report.get("skipped_rows", [])) - 20 + report.get("skipped_rows_not_listed", 0)
    if more > 0:
        console.print(f"  ... and {more} more skipped rows (listed in manifest.json)")


def template_statements(report: dict[str, Any]) -> list[str]:
    """The report's lines on what the template made prepare do: rows split into per-turn examples,
    turns written as at inference (none when neither happened)."""
    lines = []
    if report.get("split_rows"):
        lines.append(f"{report['split_rows']:,} row(s) split into {report['split_examples']:,} per-turn examples "
                     f"because the template is not prefix-stable: {report['split_reason']}; each example is the "
                     "conversation up to one assistant turn, rendered with that turn last, and trains that turn only")
    if report.get("inference_turns"):
        lines.append(f"{report['inference_turns']:,} assistant turn(s) written as at inference because the template "
                     f"does not render them after their own generation prompt: {report['inference_reason']}; each is "
                     "the generation prompt after the turns before it, then the turn as the model writes it (its "
                     "reasoning first, less what the prompt opens), then the template's end of turn, trained from "
                     "the generation prompt on")
    return lines


def preview_runs(input_ids: list[int], labels: list[int], decode: Any) -> list[tuple[str, bool]]:
    """Consecutive tokens with the same trained flag, decoded together: (text, trained)."""
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != -100) != (labels[start] != -100):
            runs.append((decode(input_ids[start:i]), labels[start] != -100))
            start = i
    return runs


def print_preview(out: Path, tok: TokenizerFiles, n: int, console: Any) -> None:
    """Print the first `n` prepared examples, trained text in «green guillemets», masked text dim."""
    from rich.text import Text
    from tokenizers import Tokenizer

    for line in template_statements(ShardSet(out, verify=False).manifest["report"]):
        console.print("preview: " + line, markup=False)
    t = Tokenizer.from_file(tok.tokenizer_file)
    decode = lambda ids: t.decode(ids, skip_special_tokens=False)  # noqa: E731
    console.print(Text.assemble(("preview: ", "bold"), ("«trained»", "bold green"), "  ", ("masked", "dim")))
    for k, doc in enumerate(iter_documents(out)):
        if k >= n:
            break
        if "chosen" in doc:
            parts = [("chosen", doc["chosen"]), ("rejected", doc["rejected"])]
        elif "candidates" in doc:
            parts = [(f"candidate {i} (score {c['score']:g})", c) for i, c in enumerate(doc["candidates"])]
        else:
            parts = [("label " + str(doc["label"]) if "label" in doc else "", doc)]
        for name, seg in parts:
            console.print(Text(f"── example {doc['id']} {name} ({len(seg['input_ids'])} tokens)", style="bold"))
            text = Text()
            for piece, trained in preview_runs(seg["input_ids"], seg["labels"], decode):
                if trained:
                    text.append("«" + piece + "»", style="bold green")
                else:
                    text.append(piece, style="dim")
            console.print(text)
