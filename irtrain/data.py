"""The Python face of irtrain's data path.

- Reading prepared data: `iter_documents(shard_dir)` (from `irtrain.shards`; one
  dict per source example) and `ShardSet` for packed rows.
- Tokenizers and templates: `load_tokenizer_files(name_or_dir)` finds `tokenizer.json`,
  the chat template and the named special tokens, without importing transformers (the
  model's transformers tokenizer is `irtrain.models.load_tokenizer`).
- Inputs: `resolve_inputs(...)` turns files, directories and Hugging Face dataset
  names into `Source`s whose `chunks()` yield JSON-lines buffers with row numbers.
- Encoding raw rows the way `prepare` does (render the chat template, tokenize
  once with offsets, mask): `encode_rows(rows, tokenizer, ...)` and `Encoder`,
  for callers such as `score` that need token ids and labels without shards.

The heavy work happens in the Rust extension (`irtrain._rust`), outside the GIL.

Why one module: it is the one Python face of the Rust data path (tokenizer files, input
sources, encoding, packing, shard writing share its types), a little over ~450 lines.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from irtrain import _rust
from irtrain.errors import ConfigError, DataError, IrtrainIOError, TemplateError, TokenizerError
from irtrain.shards import FORMATS, ShardSet, iter_documents

__all__ = [
    "iter_documents", "ShardSet", "TokenizerFiles", "load_tokenizer_files", "tokenizer_files_of", "Source", "Chunk", "resolve_inputs",
    "Encoder", "encode_rows", "detect_format", "pack_bfd", "write_shards", "preparer", "row_error", "FORMATS", "MASKS",
    "ROW_FIELDS", "parse_columns", "needs_chat_template", "step_splitter",
]

MASKS = ("assistant", "last", "completion", "all")
#: the row fields the formats read, which `--columns` may map input columns to
ROW_FIELDS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected", "label", "completions",
              "scores", "text", "system", "tools", "documents")
#: formats tokenized as plain text, without a chat template (TRL's non-conversational data)
PLAIN_FORMATS = ("text",)
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
#: named special tokens a chat template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHUNK_BYTES = 4 << 20  # JSON-lines bytes handed to Rust at a time
BATCH_ROWS = 2048  # rows per batch for JSON arrays, Parquet and HF datasets


# --------------------------------------------------------------------------- tokenizer
@dataclass
class TokenizerFiles:
    """What the data path needs from a tokenizer directory."""

    name: str  # as the user gave it
    tokenizer_file: str  # path of tokenizer.json
    chat_template: str | None  # the template text (None: the tokenizer has none)
    chat_template_origin: str  # where the template came from, for error messages
    special_tokens: list[tuple[str, str]]  # (name, token), e.g. ("bos_token", "<s>")
    file_sha256: str  # sha256 of the tokenizer.json and tokenizer_config.json bytes (cache keys)

    @property
    def chat_template_hash(self) -> str:
        return hashlib.sha256((self.chat_template or "").encode("utf-8")).hexdigest()


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _hub_file(repo: str, filename: str, required: bool) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with datasets/transformers
        raise TokenizerError(f"{repo} is not a local directory and huggingface_hub is not installed") from None
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
        if required:
            raise TokenizerError(f"{repo}: cannot get {filename} from the Hugging Face hub: {type(e).__name__}: {e}") from None
        return None


def load_tokenizer_files(name_or_dir: str, chat_template_file: str | None = None) -> TokenizerFiles:
    """Find `tokenizer.json`, the chat template and the special tokens of a local
    directory or hub repo. The template is `chat_template_file` (a file, a name of one of
    the tokenizer's templates, or a built-in style: `_chosen_template`), else the
    tokenizer's "default" template (`_named_templates`)."""
    if not name_or_dir:
        raise TokenizerError("no tokenizer given (--tokenizer DIR or hub name)")
    local = Path(name_or_dir)
    if local.is_dir():
        get = lambda f, required: (local / f) if (local / f).is_file() else None  # noqa: E731
    elif local.exists():
        raise TokenizerError(f"{name_or_dir}: expected a tokenizer directory, got a file")
    else:
        get = lambda f, required: _hub_file(name_or_dir, f, required)  # noqa: E731
    tj = get("tokenizer.json", True)
    if tj is None:
        raise TokenizerError(
            f"{name_or_dir}: no tokenizer.json (irtrain needs a fast tokenizer; convert it with "
            "transformers: AutoTokenizer.from_pretrained(...).save_pretrained(DIR))")
    cfg_path = get("tokenizer_config.json", False)
    config: dict[str, Any] = {}
    if cfg_path is not None:
        try:
            config = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{cfg_path}: not valid JSON: {e}") from None
    specials: list[tuple[str, str]] = []
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name))
        if text is not None:
            specials.append((name, text))
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):  # model-specific named tokens (transformers v5)
        specials += [(k, t) for k, v in extra.items() if (t := _token_text(v)) is not None]

    named = _named_templates(config, cfg_path, get, local if local.is_dir() else None)
    template, origin = None, ""
    if chat_template_file:
        template, origin = _chosen_template(chat_template_file, named)
    elif "default" in named:
        template, origin = named["default"]
    h = hashlib.sha256(Path(tj).read_bytes())
    if cfg_path is not None:
        h.update(Path(cfg_path).read_bytes())
    return TokenizerFiles(
        name=name_or_dir, tokenizer_file=str(tj), chat_template=template, chat_template_origin=origin,
        special_tokens=specials, file_sha256=h.hexdigest(),
    )


def _named_templates(config: dict[str, Any], cfg_path: Any, get: Any, local: Path | None) -> dict[str, tuple[str, str]]:
    """The tokenizer's templates by name, found as transformers finds them: template files
    (`chat_template.jinja` is "default", `additional_chat_templates/NAME.jinja` is NAME) take
    priority over every entry of `tokenizer_config.json`'s `chat_template` (a string is
    "default"; a list holds {"name", "template"} entries)."""
    files: dict[str, tuple[str, str]] = {}
    jinja = get("chat_template.jinja", False)
    if jinja is not None:
        files["default"] = (Path(jinja).read_text(encoding="utf-8"), str(jinja))
    if local is not None and (local / "additional_chat_templates").is_dir():
        for f in sorted((local / "additional_chat_templates").glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = (f.read_text(encoding="utf-8"), str(f))
    if files:
        return files
    out: dict[str, tuple[str, str]] = {}
    ct = config.get("chat_template")
    if isinstance(ct, str):
        out["default"] = (ct, f"{cfg_path} (chat_template)")
    elif isinstance(ct, list):
        for t in ct:
            if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str):
                out[t["name"]] = (t["template"], f"{cfg_path} (chat_template {t['name']!r})")
    return out


def _chosen_template(choice: str, named: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """`--chat-template`: a Jinja file, else one of the tokenizer's named templates (as
    transformers' `apply_chat_template(chat_template=NAME)`), else a built-in style."""
    from irtrain.toy import CHAT_TEMPLATES

    p = Path(choice)
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8"), str(p)
        except UnicodeDecodeError as e:
            raise DataError(f"chat template is not valid UTF-8: {e}", path=str(p)) from None
    if choice in named:
        return named[choice]
    if choice in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[choice], f"built-in template {choice!r}"
    own = f"the tokenizer's: {', '.join(sorted(named))}; " if named else ""
    raise DataError(f"--chat-template {choice!r}: no such file, and no template of that name ({own}built in: "
                    f"{', '.join(CHAT_TEMPLATES)})")


def tokenizer_files_of(tokenizer: Any, chat_template_file: str | None, tmp_dir: str | Path) -> TokenizerFiles:
    """`TokenizerFiles` of a tokenizer object, its files written into `tmp_dir` (which must
    live while the files are read): a transformers fast tokenizer (`AutoTokenizer` result) is
    saved with `save_pretrained`, so it is read as its directory would be; a
    `tokenizers.Tokenizer` is its JSON alone (no chat template or named special tokens of its
    own: give `chat_template_file`)."""
    tmp = Path(tmp_dir)
    if hasattr(tokenizer, "save_pretrained") and hasattr(tokenizer, "backend_tokenizer"):
        tokenizer.save_pretrained(str(tmp))
    elif type(tokenizer).__module__.split(".")[0] == "tokenizers" and hasattr(tokenizer, "to_str"):
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    else:
        raise TokenizerError(f"expected a tokenizer directory or hub name, a transformers fast tokenizer or a "
                             f"tokenizers.Tokenizer, got {type(tokenizer).__name__} (a slow tokenizer has no tokenizer.json)")
    files = load_tokenizer_files(str(tmp), chat_template_file)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    origin = files.chat_template_origin if chat_template_file else f"{name} (chat_template)"
    return dataclasses.replace(files, name=name, chat_template_origin=origin)


# --------------------------------------------------------------------------- inputs
@dataclass
class Chunk:
    """JSON lines for Rust: `data` holds rows `first_row`, `first_row+1`, ... (1-based,
    one per line; blank lines are skipped but counted); `progress` is how much of
    `Source.size` this chunk accounts for."""

    data: bytes
    first_row: int
    progress: int


@dataclass
class Source:
    """One input: a local file (`kind` jsonl | json | parquet) or a Hugging Face dataset (`hf`)."""

    name: str  # path or dataset name, as shown in errors
    kind: str
    size: int  # bytes (files) or arrow bytes (datasets), for progress
    split: str = "train"
    subset: str | None = None
    rows: int = 0  # filled while reading
    _dataset: Any = field(default=None, repr=False)

    def fingerprint(self) -> str:
        """sha256 of a file's bytes; a dataset's own fingerprint for `hf` sources."""
        if self.kind == "hf":
            return f"hf:{self.dataset()._fingerprint}"
        h = hashlib.sha256()
        with open(self.name, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        return h.hexdigest()

    def dataset(self) -> Any:
        if self._dataset is None:
            self._dataset = _load_hf(self.name, self.subset, self.split)
            self.size = int(self._dataset.data.nbytes) or 1
        return self._dataset

    def chunks(self) -> Iterator[Chunk]:
        """JSON-lines chunks of the source, in order. Raises DataError for an empty
        source, invalid JSON in a JSON-array file and bytes that are not UTF-8 there."""
        self.rows = 0
        reader = {"jsonl": self._jsonl, "json": self._json, "parquet": self._parquet, "hf": self._hf}[self.kind]
        yield from reader()

    def _jsonl(self) -> Iterator[Chunk]:
        row, rest = 1, b""
        with open(self.name, "rb") as f:
            while True:
                block = f.read(CHUNK_BYTES)
                if not block:
                    break
                data = rest + block
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                rest, data = data[cut + 1 :], data[: cut + 1]
                n = data.count(b"\n")
                self.rows += n
                yield Chunk(data, row, len(data))
                row += n
        if rest.strip():
            self.rows += 1
            yield Chunk(rest, row, len(rest))

    def _json(self) -> Iterator[Chunk]:
        with open(self.name, "rb") as f:
            head = f.read(1 << 16)
        if head.lstrip()[:1] != b"[":  # a .json file holding JSON lines
            yield from self._jsonl()
            return
        raw = Path(self.name).read_bytes()  # a JSON array is parsed whole (not streamed)
        try:
            rows = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"not valid UTF-8: byte 0x{raw[e.start]:02x}", path=self.name, row=line) from None
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (line {e.lineno} column {e.colno})", path=self.name, row=e.lineno) from None
        for i in range(0, len(rows), BATCH_ROWS):
            batch = rows[i : i + BATCH_ROWS]
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch).encode("utf-8")
            self.rows += len(batch)
            yield Chunk(data, i + 1, int(len(raw) * len(batch) / max(len(rows), 1)))

    def _parquet(self) -> Iterator[Chunk]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.name)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid and friends
            raise DataError(f"not a readable Parquet file: {e}", path=self.name) from None
        total = max(pf.metadata.num_rows, 1)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            yield self._arrow_chunk(batch, int(self.size * batch.num_rows / total))

    def _hf(self) -> Iterator[Chunk]:
        ds = self.dataset()
        total = max(len(ds), 1)
        for table in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
            yield self._arrow_chunk(table, int(self.size * table.num_rows / total))

    def _arrow_chunk(self, batch: Any, progress: int) -> Chunk:
        import polars as pl

        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)  # a table or record batch, never one column
        text = frame.write_ndjson()
        first = self.rows + 1
        self.rows += batch.num_rows
        return Chunk(text.encode("utf-8"), first, progress)


def _load_hf(name: str, subset: str | None, split: str) -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise DataError("the `datasets` package is needed to load Hugging Face datasets", path=name) from None
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # noqa: BLE001 - load_dataset raises many kinds
        raise DataError(f"not a local path, and cannot load it as a Hugging Face dataset: {type(e).__name__}: {e}",
                        path=name) from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"load_dataset returned {type(ds).__name__}, expected a Dataset (give --split)", path=name)
    return ds


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_inputs(inputs: Iterable[str], *, split: str = "train", subset: str | None = None) -> list[Source]:
    """Files, directories (their .jsonl/.ndjson/.json/.parquet files, sorted) and
    dataset names (`hf:NAME` or a bare `owner/name` that is not a local path) to
    sources. A missing path or an empty file is a DataError."""
    sources: list[Source] = []
    for item in inputs:
        if item.startswith("hf:"):
            sources.append(Source(item[3:], "hf", 1, split=split, subset=subset))
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
            if not files:
                raise DataError(f"directory has no {'/'.join(DATA_SUFFIXES)} files", path=item)
            sources += [_file_source(f) for f in files]
        elif p.is_file():
            sources.append(_file_source(p))
        elif p.suffix.lower() not in DATA_SUFFIXES and not item.startswith((".", "/", "~")) and _HUB_NAME.match(item):
            sources.append(Source(item, "hf", 1, split=split, subset=subset))
        else:
            raise DataError("no such file or directory", path=item)
    if not sources:
        raise DataError("no inputs given")
    return sources


def _file_source(p: Path) -> Source:
    suffix = p.suffix.lower()
    kind = {"jsonl": "jsonl", "ndjson": "jsonl", "json": "json", "parquet": "parquet"}.get(suffix[1:])
    if kind is None:
        raise DataError(f"unsupported file type {suffix or '(none)'} (expected {', '.join(DATA_SUFFIXES)})", path=str(p))
    size = p.stat().st_size
    if size == 0:
        raise DataError("file is empty", path=str(p))
    return Source(str(p), kind, size)


def first_row(source: Source) -> str | None:
    """The first non-blank JSON line of a source (for format detection)."""
    for chunk in source.chunks():
        for line in chunk.data.split(b"\n"):
            if line.strip():
                try:
                    return line.decode("utf-8")
                except UnicodeDecodeError:
                    return None
    return None


def local_clock(now: float | None = None) -> tuple[int, str]:
    """The wall clock `strftime_now` renders, as transformers' `datetime.now()` (local time):
    (seconds since 1970-01-01 00:00 in the local zone, ISO 8601 with the UTC offset)."""
    import datetime
    import time

    now = time.time() if now is None else now
    local = datetime.datetime.fromtimestamp(int(now)).astimezone()
    return int(now) + int(time.localtime(int(now)).tm_gmtoff), local.isoformat()


def parse_columns(spec: str) -> list[tuple[str, str]]:
    """`--columns NAME=COLUMN,...` as (irtrain's field, the input's column) pairs; ConfigError
    naming the flag when it is malformed, names an unknown field or maps one twice."""
    pairs: list[tuple[str, str]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, eq, column = (x.strip() for x in item.partition("="))
        if not eq or not name or not column:
            raise ConfigError(f"--columns: {item!r} is not NAME=COLUMN (e.g. --columns messages=conversations)")
        if name not in ROW_FIELDS:
            raise ConfigError(f"--columns: {name!r} is not a field irtrain reads (one of {', '.join(ROW_FIELDS)})")
        if any(name == n for n, _ in pairs) or any(column == c for _, c in pairs):
            raise ConfigError(f"--columns: {item!r} maps a field or column a second time")
        pairs.append((name, column))
    return pairs


def needs_chat_template(fmt: str, apply_chat_template: bool = True) -> bool:
    """Whether rows of `fmt` are rendered with the chat template (plain text otherwise)."""
    return fmt not in PLAIN_FORMATS and apply_chat_template


def preparer(tok: TokenizerFiles, fmt: str, mask: str, out_dir: str, *, max_len: int, truncation: str, pack: bool,
             shard_rows: int, skip_invalid: bool = False, threads: int = 0, window_tokens: int = 0,
             fast_bpe: bool = True, template_vars: Iterable[str] = (), clock: int | None = None,
             columns: list[tuple[str, str]] | None = None, apply_chat_template: bool = True) -> Any:
    """The Rust pipeline behind `irtrain prepare` (`irtrain._rust.Preparer`), writing shard
    folders into `out_dir`: feed it `Chunk`s with `add_jsonl(data, first_row)`, then `finish()`.
    `clock` fixes `strftime_now` (`local_clock()[0]`; default: now)."""
    template = _template_for(tok, fmt, apply_chat_template)
    try:
        return _rust.Preparer(tok.tokenizer_file, template, tok.special_tokens, fmt, mask, out_dir,
                              max_len=max_len, truncation=truncation, pack=pack, shard_rows=shard_rows,
                              skip_invalid=skip_invalid, threads=threads, window_tokens=window_tokens,
                              fast_bpe=fast_bpe, template_vars=list(template_vars),
                              clock=local_clock()[0] if clock is None else clock,
                              columns=columns or [], apply_chat_template=apply_chat_template)
    except TemplateError as e:
        raise TemplateError(e.message, path=tok.chat_template_origin) from None


def _template_for(tok: TokenizerFiles, fmt: str, apply_chat_template: bool) -> str:
    """The template text Rust compiles ("" for plain text, which renders nothing)."""
    if not needs_chat_template(fmt, apply_chat_template):
        return ""
    if tok.chat_template is None:
        raise TemplateError(f"{tok.name}: the tokenizer has no chat template; pass --chat-template FILE")
    return tok.chat_template


def row_error(path: str, row: int, kind: str, message: str) -> Exception:
    """The `irtrain.errors` exception for a row that failed in Rust."""
    if kind == "template":
        return TemplateError(message, path=path, row=row)
    if kind == "tokenizer":
        return TokenizerError(f"{path}:{row}: {message}")
    if kind == "io":
        return IrtrainIOError(f"{path}:{row}: {message}")
    return DataError(message, path=path, row=row)


# --------------------------------------------------------------------------- encoding
class Encoder:
    """Render + tokenize + mask rows exactly as `prepare` does, without packing or files.

    >>> enc = Encoder("tok_dir", fmt="chat", mask="assistant")
    >>> docs, errors = enc.encode([{"messages": [...]}, ...])
    """

    def __init__(self, tokenizer: str | os.PathLike[str] | TokenizerFiles | Any, *, fmt: str = "chat", mask: str = "assistant",
                 chat_template: str | None = None, threads: int = 0, fast_bpe: bool = True,
                 template_vars: Iterable[str] = (), clock: int | None = None,
                 columns: list[tuple[str, str]] | None = None, apply_chat_template: bool = True):
        def init(tok: TokenizerFiles) -> None:
            self._init(tok, fmt, mask, threads, fast_bpe, template_vars=template_vars, clock=clock, columns=columns,
                       apply_chat_template=apply_chat_template)

        if isinstance(tokenizer, (TokenizerFiles, str, os.PathLike)):
            init(tokenizer if isinstance(tokenizer, TokenizerFiles) else load_tokenizer_files(os.fspath(tokenizer), chat_template))
        else:  # a tokenizer object: its files exist while the Rust encoder reads them
            with tempfile.TemporaryDirectory(prefix="irtrain-tokenizer-") as tmp:
                init(tokenizer_files_of(tokenizer, chat_template, tmp))

    def _init(self, tok: TokenizerFiles, fmt: str, mask: str, threads: int, fast_bpe: bool, *, template_vars: Iterable[str],
              clock: int | None, columns: list[tuple[str, str]] | None, apply_chat_template: bool) -> None:
        if fmt not in FORMATS:
            raise DataError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
        template = _template_for(tok, fmt, apply_chat_template)
        self.tokenizer = tok
        self.format = fmt
        self.mask = mask
        try:
            self._enc = _rust.Encoder(tok.tokenizer_file, template, tok.special_tokens, fmt, mask, threads,
                                      fast_bpe, template_vars=list(template_vars),
                                      clock=local_clock()[0] if clock is None else clock,
                                      columns=columns or [], apply_chat_template=apply_chat_template)
        except TemplateError as e:
            raise TemplateError(e.message, path=tok.chat_template_origin) from None

    @property
    def fast_bpe(self) -> bool:
        """Whether the fast byte-level BPE path is in use (token-identical; else the `tokenizers` crate)."""
        return self._enc.fast_bpe

    @property
    def tokenizer_hash(self) -> str:
        """sha256 of the tokenizer's canonical serialization: what manifests record; equal to
        `irtrain.models.tokenizer_hash` of the transformers tokenizer, which training and
        `irtrain score` compare with it."""
        return self._enc.tokenizer_hash

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages` (what transformers' apply_chat_template renders)."""
        return self._enc.render(json.dumps(messages, ensure_ascii=False), add_generation_prompt)

    def encode_jsonl(self, data: bytes, first_row: int = 1, first_example: int = 0) -> tuple[dict[str, np.ndarray], list[tuple[int, str, str]]]:
        """Flat arrays (`input_ids`, `labels`, `seg_offsets`, `seg_example`, `seg_part`,
        `seg_score`, `seg_row`) for the rows that worked, and (row, kind, message) for those that did not."""
        return self._enc.encode_jsonl(data, first_row, first_example)

    def encode(self, rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[int, str, str]]]:
        """Encode in-memory rows; documents in the shape `iter_documents` yields (id = row index,
        unless a row was split into per-turn examples: then ids count examples)."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        arrays, errors = self.encode_jsonl(data)
        return list(documents_from_arrays(arrays, self.format)), errors


def documents_from_arrays(a: dict[str, np.ndarray], fmt: str) -> Iterator[dict[str, Any]]:
    """Group flat segment arrays (as `Encoder.encode_jsonl` returns) into documents."""
    off, ex, score = a["seg_offsets"], a["seg_example"], a["seg_score"]
    ids, labels = a["input_ids"], a["labels"]
    j, n = 0, len(ex)
    while j < n:
        k = j
        while k < n and ex[k] == ex[j]:
            k += 1
        segs = [{"input_ids": ids[off[i]:off[i + 1]].astype(np.int64).tolist(),
                 "labels": labels[off[i]:off[i + 1]].astype(np.int64).tolist()} for i in range(j, k)]
        doc_id = int(ex[j])
        if fmt == "preference":
            yield {"id": doc_id, "chosen": segs[0], "rejected": segs[1]}
        elif fmt == "ranked":
            yield {"id": doc_id, "candidates": [dict(s, score=float(score[i])) for s, i in zip(segs, range(j, k))]}
        elif fmt == "unpaired":
            yield {"id": doc_id, **segs[0], "label": bool(score[j] > 0.5)}
        else:
            yield {"id": doc_id, **segs[0]}
        j = k


def encode_rows(rows: Iterable[dict[str, Any]], tokenizer: str | os.PathLike[str] | TokenizerFiles | Any, *, fmt: str = "chat",
                mask: str = "assistant", chat_template: str | None = None, columns: list[tuple[str, str]] | None = None,
                apply_chat_template: bool = True) -> list[dict[str, Any]]:
    """Encode rows like `prepare` (no packing); a row error raises `DataError` naming the row (1-based).
    `tokenizer`: a directory or hub name, a transformers fast tokenizer (`AutoTokenizer`
    result) or a `tokenizers.Tokenizer` (see `tokenizer_files_of`)."""
    docs, errors = Encoder(tokenizer, fmt=fmt, mask=mask, chat_template=chat_template, columns=columns,
                           apply_chat_template=apply_chat_template).encode(rows)
    if errors:
        row, kind, message = errors[0]
        raise row_error("<rows>", row, kind, message)
    return docs


# --------------------------------------------------------------------------- small faces
def step_splitter(tokenizer_json: str) -> Any:
    """The Rust step splitter behind `irtrain score` (`irtrain._rust.StepSplitter`), its
    per-vocabulary tables built once from a serialized `tokenizer.json`."""
    return _rust.StepSplitter(tokenizer_json)


def detect_format(row_json: str, columns: list[tuple[str, str]] | None = None) -> str:
    """The format a JSON row's fields indicate (after renaming them as `columns` says); DataError when none does."""
    return _rust.detect_format(row_json, columns or [])


def pack_bfd(lengths: Iterable[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing packing (what `prepare` uses): item indices per row."""
    return _rust.pack_bfd(np.asarray(list(lengths), dtype=np.int64), int(capacity))


def write_shards(out_dir: str | os.PathLike[str], rows: list[list[Any]], *, shard_rows: int = 16384) -> list[dict[str, Any]]:
    """Write packed rows of `irtrain.shards.Segment`s with the Rust writer (the shard
    folders only, no manifest); returns each shard's metadata."""
    segs = [s for row in rows for s in row]
    lens = [len(s.input_ids) for s in segs]
    return json.loads(_rust.write_shards(
        str(out_dir), int(shard_rows),
        np.asarray([t for s in segs for t in s.input_ids], dtype=np.uint32),
        np.asarray([t for s in segs for t in s.labels], dtype=np.int32),
        np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int64),
        np.asarray([s.example for s in segs], dtype=np.int64),
        np.asarray([s.part for s in segs], dtype=np.int32),
        np.asarray([s.score for s in segs], dtype=np.float32),
        np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)]).astype(np.int64),
    ))
