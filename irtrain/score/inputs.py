"""What `irtrain score` reads: the models, the data (prepared first when raw), and the
responses to score with their states (`ScoredSegment`)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from irtrain.adapters import ADAPTER_CONFIG, base_of, check_base, is_adapter_dir
from irtrain.config import PrepareConfig, ScoreConfig
from irtrain.data import detect_format, first_row, resolve_inputs
from irtrain.errors import ConfigError, DataError, IrtrainIOError
from irtrain.models import resolve_model
from irtrain.paths import check_out_dir
from irtrain.prepare import run as prepare
from irtrain.score.steps import split_states
from irtrain.shards import MANIFEST, ShardSet

#: `prepare --mask` of raw data by format: the response is the last assistant turn, or the completion
_MASK_FOR_FORMAT = {"chat": "last", "preference": "last", "prompt-completion": "completion",
                    "unpaired": "completion", "ranked": "completion"}


# --------------------------------------------------------------------------- models
#: a training run's checkpoint directory (`irtrain.train.checkpoint`)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._") or "model"


def _checkpoint_order(p: Path) -> tuple[int, int, str]:
    m = _CHECKPOINT.fullmatch(p.name)
    return (0, int(m.group(1)), p.name) if m else (1, 0, p.name)


def _holds_model(p: Path) -> bool:
    return (p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file()


def resolve_models(cfg: ScoreConfig) -> list[tuple[str, Path]]:
    """(table name, model directory) for `--model` and every checkpoint of `--checkpoints`
    (each subdirectory with a config.json, or an adapter checkpoint, scored as its base with
    the adapter merged; `checkpoint-<step>` by step; the directory itself too when it holds
    a model), named by `table_names`. An adapter's base must exist and be the one it was
    trained on; every safetensors file must be whole (`check_weights`)."""
    found: list[tuple[Path, Path, bool]] = []  # (path as given, model directory, is a checkpoint of a run)
    if cfg.model:
        given = Path(cfg.model.rstrip("/") or cfg.model)
        found.append((given, resolve_model(cfg.model), bool(_CHECKPOINT.fullmatch(given.name))))
    if cfg.checkpoints:
        root = Path(cfg.checkpoints)
        if not root.is_dir():
            raise ConfigError(f"--checkpoints {root}: no such directory")
        subs = sorted((p for p in root.iterdir() if p.is_dir() and _holds_model(p)), key=_checkpoint_order)
        found += [(p, p, True) for p in subs]
        if _holds_model(root):
            found.append((root, root, False))
        if not found[1 if cfg.model else 0:]:
            raise ConfigError(f"--checkpoints {root}: no model in it (no subdirectory with a config.json or an adapter_config.json)")
    for _, path, _ in found:
        check_weights(path)
        if is_adapter_dir(path):
            base = base_of(path)
            check_base(path, base)
            check_weights(base)
    names = table_names([(given, path, 2 if ckpt else 1) for given, path, ckpt in found])
    return [(name, path) for name, (_, path, _) in zip(names, found)]


def table_names(entries: list[tuple[Path, Path, int]]) -> list[str]:
    """A table name per (path as given, model directory, depth): the last `depth` parts of
    the given path joined by ``-`` (a run's checkpoint, depth 2: ``<run>-checkpoint-<step>``;
    any other model, depth 1: its directory's or hub name's last part). Different models that
    still share a name take one more parent directory each until they differ; the same
    directory given twice is suffixed ``-2``, ``-3``, ..."""
    parts = [(Path(os.path.abspath(g)) if g.exists() else g).parts for g, _, _ in entries]
    depth = [d for _, _, d in entries]
    key = [str(p.resolve()) for _, p, _ in entries]
    name = lambda i: _safe_name("-".join(parts[i][-depth[i]:]))  # noqa: E731
    while True:
        groups: dict[str, list[int]] = {}
        for i in range(len(entries)):
            groups.setdefault(name(i), []).append(i)
        grow = [i for g in groups.values() if len({key[i] for i in g}) > 1 for i in g if depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for i in range(len(entries)):
        n = name(i)
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}-{k + 1}")
    return out


def check_weights(model_dir: Path) -> None:
    """Every ``*.safetensors`` file of a model directory is whole: its header reads and the
    file is exactly as long as the header says (a truncated copy, a partly written or
    overwritten file are a one-line error naming the file, not a loader traceback)."""
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        size = f.stat().st_size
        want = None
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if size >= 8 and n <= size - 8:
                    header = json.loads(fh.read(n))
                    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                    want = 8 + n + max(ends, default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            want = None
        except OSError as e:
            raise IrtrainIOError(f"{f}: cannot read the model weights: {e}") from None
        if want is None:
            raise IrtrainIOError(f"{f}: corrupted model weights (not a readable safetensors header, {size} bytes); "
                                 "copy or save the checkpoint again")
        if want != size:
            raise IrtrainIOError(f"{f}: {'truncated' if size < want else 'corrupted'} model weights ({size} bytes, "
                                 f"its header describes {want}); copy or save the checkpoint again")


# --------------------------------------------------------------------------- data
def out_dir(out: str) -> Path:
    """`--out`, checked and created."""
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


# --------------------------------------------------------------------------- responses and states
@dataclass
class ScoredSegment:
    """One scored sequence (a segment of the shard format, `irtrain.shards.Segment`): where
    it is, its response and its states."""

    example: int
    part: int
    row: int  # row index in the shard set
    start: int  # token offset of the segment in its row
    length: int
    states: np.ndarray  # token positions in the segment: s_0, the end of each step, then the end-of-turn token
    terminal: bool = False  # the last state is the end-of-turn token (`irtrain.score.steps`)

    @property
    def num_states(self) -> int:
        return int(len(self.states))

    @property
    def num_steps(self) -> int:
        """K: the steps of the response's content (the states less s_0 and the terminal one)."""
        return self.num_states - 1 - int(self.terminal)


def read_segments(shards: ShardSet, tokenizer: Any, delimiter: str, *, max_len: int) -> list[ScoredSegment]:
    """Every segment with a response, in row order, with its states (`irtrain.score.steps`:
    computed in Rust over all segments at once)."""
    arrays, where = [], []
    row0 = 0
    for sh in shards.shards:
        a = sh.arrays
        so = np.asarray(a["seg_offsets"], dtype=np.int64)
        ro = np.asarray(a["row_offsets"], dtype=np.int64)
        long = np.flatnonzero(np.diff(so) > max_len)
        if len(long):
            k = int(long[0])
            raise DataError(f"{shards.path}: example {int(a['seg_example'][k])} has {int(so[k + 1] - so[k])} tokens, "
                            f"more than --max-len {max_len}; raise --max-len (score never truncates)")
        rows = np.searchsorted(ro, so[:-1], side="right") - 1  # each segment's row in the shard
        where.append(np.stack([rows + row0, so[:-1] - ro[rows], np.diff(so), np.asarray(a["seg_example"], dtype=np.int64),
                               np.asarray(a["seg_part"], dtype=np.int64)], axis=1) if len(rows) else np.zeros((0, 5), np.int64))
        arrays.append((a["input_ids"], a["labels"], so))
        row0 += sh.num_rows
    found = split_states(tokenizer, arrays, delimiter)
    seg = (np.concatenate(where) if where else np.zeros((0, 5), np.int64))[found.segment].tolist()
    states = np.split(found.states, found.offsets[1:-1]) if len(found.segment) else []
    return [ScoredSegment(example=ex, part=part, row=row, start=start, length=n, states=st, terminal=term)
            for (row, start, n, ex, part), st, term in zip(seg, states, found.terminal.tolist())]


def states_hash(shards: ShardSet, segments: list[ScoredSegment]) -> str:
    """What a score table's states are, independent of how the shards were packed: sha256 over
    the segments in (example, part) order, each its token ids and its state positions. The same
    traces scored from a raw file (prepared unpacked) and from packed shards hash alike, so
    `irtrain rank` compares them; any other tokenization or step split differs."""
    import hashlib

    h = hashlib.sha256(b"irtrain-states-2\n")  # 2: states end at the content, the end-of-turn token terminal
    for seg in sorted(segments, key=lambda x: (x.example, x.part)):
        ids = np.asarray(shards.row(seg.row).input_ids[seg.start : seg.start + seg.length], dtype="<u4")
        h.update(f"{seg.example},{seg.part},{len(ids)},{len(seg.states)},{int(seg.terminal)}|".encode())
        h.update(ids.tobytes())
        h.update(np.asarray(seg.states, dtype="<i8").tobytes())
    return h.hexdigest()
