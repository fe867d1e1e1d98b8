"""Models and their tokenizers: where they are, what they are, and whether the data fits them.

One module answers every such question for every command (sft, dpo, score, rank, the
quickstart):

- `resolve_model(name)`: a local model directory, or a hub name resolved to its snapshot;
- `load_tokenizer(model_dir)`: the model's transformers tokenizer (a fast one);
- `tokenizer_hash(tokenizer)`: the hash `irtrain prepare` writes into manifests (sha256 of
  the canonical serialization of the `tokenizers` backend; the Rust data path computes
  the same value from tokenizer.json, see `rust_ext/core/src/tokenize.rs`);
- `check_tokenizer(model_dir, tokenizer, sets)`: shards were made with this tokenizer and
  hold no id outside its vocabulary;
- `model_hash(model_dir)`: the identity of a model's weights (reference cache keys);
- `resolve_device(name)`, `resolve_dtype(name, device)`: `--device` and `--dtype`.

The data path's own view of a tokenizer directory (tokenizer.json, chat template, special
tokens) is `irtrain.data.load_tokenizer_files`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from irtrain.lazy import lazy

if TYPE_CHECKING:
    import torch
else:
    torch = lazy("torch")

from irtrain.errors import ConfigError, ShardError, TokenizerError
from irtrain.shards import ShardSet

#: `--dtype` names
DTYPES = ("float32", "bfloat16", "float16")  # torch's names
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_hash_cache: dict[tuple[str, int, int], str] = {}


# --------------------------------------------------------------------------- where
def resolve_model(name: str, *, flag: str = "--model") -> Path:
    """A local model directory, or a hub name resolved to its local snapshot. `flag` names
    the option in error messages."""
    if not name:
        raise ConfigError(f"{flag} is required (a local directory or hub name)")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ConfigError(f"{flag} {name}: {path} has no config.json (not a transformers model directory, nor an adapter checkpoint)")
        return path
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_local:
        raise ConfigError(f"{flag} {name}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, no permission
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{flag} {name}: not a local directory and not loadable from the hub ({first})") from None
    return Path(local)


def resolve_device(name: str) -> torch.device:
    """`--device`: auto = the GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def resolve_dtype(name: str, *, auto: torch.dtype) -> torch.dtype:
    """`--dtype`: a name of `DTYPES`, or `auto` (what the caller decides for its device)."""
    if name == "auto":
        return auto
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of: auto, {', '.join(DTYPES)}")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


# --------------------------------------------------------------------------- tokenizers
def load_tokenizer(model_path: Path) -> Any:
    """The model's transformers tokenizer (`AutoTokenizer`)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise TokenizerError(f"{model_path}: cannot load the model's tokenizer ({type(e).__name__}: {first})") from None


def tokenizer_hash(tokenizer: Any) -> str:
    """The `tokenizer_hash` that `irtrain prepare` writes into manifests, for a transformers
    tokenizer: sha256 of the canonical serialization of its `tokenizers` backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError("the model's tokenizer is not a fast (tokenizers) tokenizer; irtrain needs tokenizer.json")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def model_vocab_size(model_path: Path) -> int | None:
    """The embedding rows of the model at `model_path` (its config.json's `vocab_size`, read
    without loading anything), or None when it has no config.json (a tokenizer directory)."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return int(size) if isinstance(size, int) else None


def check_tokenizer(model_path: Path, tokenizer: Any, sets: list[ShardSet]) -> str:
    """Shards must have been made with the model's tokenizer, and every token id must have a row
    in the model's embedding (the smaller of the tokenizer's length and the model's
    `vocab_size`). Returns the tokenizer's hash."""
    h = tokenizer_hash(tokenizer)
    model_vocab = model_vocab_size(model_path)
    vocab = len(tokenizer) if model_vocab is None else min(len(tokenizer), model_vocab)
    whose = "the model tokenizer's vocabulary" if vocab == len(tokenizer) else f"the model's vocabulary ({model_path}/config.json vocab_size)"
    for s in sets:
        if s.tokenizer_hash and h and s.tokenizer_hash != h:
            raise TokenizerError(
                f"{s.path} was made with another tokenizer than the model's ({s.tokenizer_hash[:12]} vs {h[:12]} for {model_path}); "
                "run `irtrain prepare` with the model's tokenizer")
        for sh in s.shards:
            ids = sh.arrays["input_ids"]
            if len(ids) and int(np.max(ids)) >= vocab:
                raise TokenizerError(f"{s.path}: token id {int(np.max(ids))} is outside {whose} ({vocab})")
    return h


# --------------------------------------------------------------------------- identity
def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


#: besides weights, the files that make a model what it is (an adapter checkpoint: its config and its base's identity)
_IDENTITY_FILES = ("config.json", "adapter_config.json", "irtrain_base.json")


def model_hash(model_dir: str | Path) -> str:
    """Identity of a model's weights: sha256 over its config and weight files' checksums."""
    root = Path(model_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name in _IDENTITY_FILES)
                   and "checkpoint-" not in p.relative_to(root).as_posix())
    if not files:
        raise ShardError(f"{root}: no model weights found to fingerprint")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}={_file_sha256(p)}\n".encode())
    return h.hexdigest()
