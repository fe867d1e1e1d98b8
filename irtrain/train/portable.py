"""The optimizer state without its layout: what lets a checkpoint resume on another world size.

DeepSpeed saves each rank's partition of the flattened fp32 weights and Adam moments
(``deepspeed/*zero_pp_rank_<r>_*``); those files are only readable by the same number of
ranks with the same ZeRO stage. Beside them every DeepSpeed checkpoint holds ``portable/``::

    optimizer-00001.safetensors, ...   "fp32/<name>", "exp_avg/<name>", "exp_avg_sq/<name>"
                                        per trainable parameter (full shape, float32);
                                        metadata {"step": Adam's step count}

written by the main rank in files of about `CHUNK_BYTES` (its memory stays bounded).
A single-process checkpoint's ``optimizer.pt`` (torch AdamW, parameters by position) is
read through the same interface, so any checkpoint resumes on any layout: 2 ranks -> 1,
1 -> 2, ZeRO-2 -> ZeRO-3, DeepSpeed -> one process and back.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from irtrain.errors import ConfigError

PORTABLE = "portable"
KEYS = ("exp_avg", "exp_avg_sq")   # torch AdamW's moments (DeepSpeed wraps the same optimizer)
CHUNK_BYTES = 1 << 30


class PortableWriter:
    """Collects (key, tensor) on the main rank and writes a file whenever `CHUNK_BYTES` is reached."""

    def __init__(self, path: Path, step: int, enabled: bool):
        self.dir, self.step, self.enabled = path / PORTABLE, int(step), enabled
        self._buf: dict[str, Tensor] = {}
        self._bytes, self._files = 0, 0
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, t: Tensor | None) -> None:
        if not self.enabled or t is None:
            return
        t = t.detach().to("cpu", torch.float32, copy=True).contiguous()  # own storage (safetensors refuses shared)
        self._buf[key] = t
        self._bytes += t.numel() * 4
        if self._bytes >= CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buf or not self._files:  # at least one file, even with nothing trainable
            self._files += 1
            save_file(self._buf, str(self.dir / f"optimizer-{self._files:05d}.safetensors"), metadata={"step": str(self.step)})
        self._buf, self._bytes = {}, 0

    def close(self) -> None:
        if self.enabled:
            self._flush()


class PortableState:
    """The optimizer state of a checkpoint by parameter name, whatever wrote it: `step` (Adam's
    count) and `get(kind, name)` for kind in fp32 | exp_avg | exp_avg_sq (None: not saved)."""

    def __init__(self, step: int, tensors: dict[str, Tensor] | None = None, files: list[Path] | None = None):
        self.step = step
        self._tensors = tensors or {}
        self._where: dict[str, Path] = {}
        for f in files or []:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._where[k] = f

    def get(self, kind: str, name: str) -> Tensor | None:
        key = f"{kind}/{name}"
        if key in self._tensors:
            return self._tensors[key]
        f = self._where.get(key)
        if f is None:
            return None
        with safe_open(str(f), framework="pt") as h:  # one tensor at a time: a rank reads what it sets
            return h.get_tensor(key)

    def names(self) -> set[str]:
        return {k.split("/", 1)[1] for k in [*self._tensors, *self._where]}


def has_portable(path: Path) -> bool:
    return (path / PORTABLE).is_dir() or (path / "optimizer.pt").is_file()


def read_portable(path: Path, order: list[str]) -> PortableState:
    """The checkpoint at `path` as a `PortableState`. `order`: the trainable parameter names in
    the order of the single-process optimizer's groups (how optimizer.pt numbers them)."""
    files = sorted((path / PORTABLE).glob("optimizer-*.safetensors"))
    if files:
        with safe_open(str(files[0]), framework="pt") as h:
            step = int((h.metadata() or {}).get("step", 0))
        return PortableState(step, files=files)
    sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    if len(ids) != len(order):
        raise ValueError(f"{path / 'optimizer.pt'}: {len(ids)} parameters, the model trains {len(order)}")
    tensors: dict[str, Tensor] = {}
    step = 0
    for i, name in zip(ids, order):
        st = sd["state"].get(i)
        if not st:
            continue
        step = max(step, int(float(st["step"])))
        for k in KEYS:
            tensors[f"{k}/{name}"] = st[k]
    return PortableState(step, tensors=tensors)


def adamw_state(opt: torch.optim.Optimizer, named: Iterator[tuple[str, torch.nn.Parameter]] | list[tuple[str, Any]],
                portable: PortableState) -> dict[str, Any]:
    """A torch AdamW state dict for `opt` (over the parameters `named`, in its group order) from
    `portable`; parameters the checkpoint holds no moments for start fresh."""
    sd = opt.state_dict()
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for i, (name, p) in zip(ids, named):
        m = {k: portable.get(k, name) for k in KEYS}
        if all(v is not None for v in m.values()) and portable.step > 0:
            state[i] = {"step": torch.tensor(float(portable.step)),
                        **{k: v.to(p.device, p.dtype).reshape(p.shape) for k, v in m.items() if v is not None}}
    return {"state": state, "param_groups": sd["param_groups"]}


# ---------------------------------------------------------------------------- ZeRO partitions
# DeepSpeed's accessors (deepspeed.utils.safe_get/set_full_*) come from the strategy, the only
# module that imports deepspeed; each maps a full tensor to and from this rank's partition.
def write_portable(path: Path, named: list[tuple[str, Any]], step: int, *, enabled: bool,
                   fp32: Callable[[Any], Tensor | None], moment: Callable[[Any, str], Tensor | None]) -> None:
    """Gather each trainable parameter's fp32 weight and moments (collective: every rank calls
    this) and write them on the main rank (`enabled`). No moments before Adam's first step."""
    out = PortableWriter(path, step, enabled=enabled)
    for name, p in named:
        out.add(f"fp32/{name}", fp32(p))
        for key in KEYS if step > 0 else ():
            out.add(f"{key}/{name}", moment(p, key))
    out.close()


def init_adam_state(opt: torch.optim.Optimizer, flats: list[Tensor], step: int) -> None:
    """Create torch AdamW's state of the tensors it steps (`flats`, ZeRO's flat fp32 partitions;
    torch creates it lazily at the first step) as zeros at `step`, so that ZeRO's
    per-parameter views of the moments exist to be set."""
    for flat in flats:
        opt.state[flat] = {"step": torch.tensor(float(step)), **{k: torch.zeros_like(flat) for k in KEYS}}


def set_portable(path: Path, named: list[tuple[str, Any]], portable: PortableState, *, device: torch.device,
                 fp32: Callable[[Any, Tensor], None], moment: Callable[[Any, Tensor, str], None]) -> None:
    """Set this rank's partition of each trainable parameter from the full tensors of `portable`
    (local: no collective). A single-process checkpoint has no fp32 copy: the weights stay."""
    for name, p in named:
        value = portable.get("fp32", name)
        if value is not None:
            fp32(p, value.to(device))
        for key in KEYS if portable.step > 0 else ():
            value = portable.get(key, name)
            if value is None:
                raise ConfigError(f"{path}: the optimizer state has no {key} for {name}: not a checkpoint of this model")
            moment(p, value.to(device), key)
