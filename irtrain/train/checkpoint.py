"""Checkpoints: atomic, loadable by `from_pretrained`, and enough to resume exactly.

A checkpoint is a directory ``OUT/checkpoint-<step:07d>/``::

    model.safetensors (+ config.json, generation_config.json)   # from_pretrained-loadable
      | adapter_config.json + adapter_model.safetensors          # LoRA: the adapter, peft's format
        + irtrain_base.json                                      # the base it trains on (hash)
    tokenizer.json, tokenizer_config.json, ...                   # the model's tokenizer
    optimizer.pt  (single process)  |  deepspeed/ (DeepSpeed: per-rank optimizer partitions)
                                       + portable/ (the same state world-size-free, portable.py)
    rng.pt        torch CPU (+ CUDA) RNG states, per rank (rng-<rank>.pt)
    trainer_state.json   step, data position, token counters, bad-step counters, config, layout

It is written under ``.checkpoint-<step>.tmp``, fsynced and renamed when complete, so a
directory named ``checkpoint-*`` is always whole; trainer_state.json records the sha256 of
every other file, checked before a checkpoint is resumed (`verify_checkpoint`). A rank's own
files (``rng-<r>.pt``, DeepSpeed's ``*zero_pp_rank_<r>_*``) are hashed by the rank that wrote
them and verified by the rank that reads them; the checkpoint to resume is agreed by all ranks
(`agreed_checkpoint`). Everything is loaded with ``torch.load(weights_only=True)`` or as
JSON/safetensors.

The data position is global (the step index into the plan of global rows, batching.py), so
a checkpoint resumes on any world size at the same global example; the optimizer state
follows the layout it was written by, or its world-size-free copy when that differs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from irtrain.adapters import BASE_FILE
from irtrain.durable import io_error, publish
from irtrain.errors import IrtrainIOError
from irtrain.shards import file_sha256

PREFIX = "checkpoint-"
STATE = "trainer_state.json"
_RANK_FILE = re.compile(r"(?:^|/)(?:rng-(\d+)\.pt|[^/]*zero_pp_rank_(\d+)_[^/]*)$")


def file_rank(name: str) -> int | None:
    """The rank that writes and reads the checkpoint file `name` (None: shared, read by all)."""
    m = _RANK_FILE.search(name)
    return None if m is None else int(m.group(1) or m.group(2))


@dataclass
class TrainState:
    """Everything the loop needs to continue at `step` besides weights and optimizer."""

    step: int = 0                 # optimizer steps completed (= index of the next step)
    rows_consumed: int = 0        # data position: rows of the plan used so far
    tokens: int = 0               # tokens seen (all ranks)
    trained_tokens: int = 0       # response tokens trained on (all ranks)
    bad_steps: int = 0            # non-finite steps skipped, in total
    bad_in_row: int = 0           # ... in a row, right now
    elapsed: float = 0.0          # training seconds before this process
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"{PREFIX}{step:07d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / STATE).is_file():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out: Path) -> Path | None:
    cks = list_checkpoints(out)
    return cks[-1] if cks else None


def latest_verified_checkpoint(out: Path, rank: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (for `rank`: the files it reads), and the newer ones
    skipped with the reason."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(list_checkpoints(out)):
        why = verify_checkpoint(ckpt, rank)
        if why is None:
            return ckpt, skipped
        skipped.append((ckpt, why))
    return None, skipped


def agreed_checkpoint(out: Path, strategy: Any) -> tuple[Path | None, list[tuple[Path, str]]]:
    """`latest_verified_checkpoint` decided by all ranks together: each rank verifies the files
    it reads, and the newest checkpoint that verifies on every rank is the one all resume
    (a damaged rank file makes all ranks fall back alike, never some of them)."""
    if strategy.world_size == 1:
        return latest_verified_checkpoint(out)
    # one list for all: the ranks may list the directory at different moments
    names = strategy.broadcast_object([c.name for c in list_checkpoints(out)] if strategy.is_main else None)
    local = {n: verify_checkpoint(out / n, strategy.rank) for n in names}
    every = strategy.all_gather_object(local)
    skipped: list[tuple[Path, str]] = []
    for n in reversed(names):
        bad = [f"rank {r}: {why}" for r, res in enumerate(every) if (why := res[n]) is not None]
        if not bad:
            return out / n, skipped
        skipped.append((out / n, "; ".join(bad)))
    return None, skipped


def write_checkpoint(out: Path, state: TrainState, *, model: Any, tokenizer: Any, strategy: Any, config: dict[str, Any],
                     keep: bool = True, base_identity: dict[str, str] | None = None) -> Path:
    """Write checkpoint-<state.step> atomically (every rank calls this). A peft model is saved
    as its adapter (peft's format) with `base_identity` (the base it trains on) beside it."""
    final = checkpoint_dir(out, state.step)
    tmp = out / f".{final.name}.tmp"
    if strategy.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    strategy.barrier()
    full = strategy.full_state_dict()  # collective under ZeRO-3
    if strategy.is_main:
        inner = strategy.unwrap(model)
        kwargs: dict[str, Any] = {"safe_serialization": True}
        if full is not None:
            kwargs["state_dict"] = full
        if base_identity is not None:  # an adapter: adapter_config.json + adapter_model.safetensors
            kwargs["save_embedding_layers"] = False
            (tmp / BASE_FILE).write_text(json.dumps(base_identity, indent=2), encoding="utf-8")
        inner.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    strategy.save_training_state(tmp)
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng-{strategy.rank}.pt")
    strategy.barrier()
    # every rank hashes the files it wrote itself (in parallel, and seen where they were written)
    per_rank = strategy.all_gather_object(checksums(tmp, rank=strategy.rank, shared=False))
    if strategy.is_main:
        files = checksums(tmp, rank=None, shared=True)
        for part in per_rank:
            files.update(part)
        payload = {"state": asdict(state), "config": config, "world_size": strategy.world_size, "layout": strategy.layout,
                   "keep": keep, "files": dict(sorted(files.items()))}
        (tmp / STATE).write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
        publish(tmp, final)  # fsynced, then renamed; an existing checkpoint of this step is replaced atomically
    strategy.barrier()
    return final


def save_checkpoint(out: Path, state: TrainState, **kwargs: Any) -> Path:
    """`write_checkpoint`, with a write that fails (a full disk, no permission) as a one-line
    error naming the checkpoint; its temporary directory is removed, earlier checkpoints stay."""
    final = checkpoint_dir(out, state.step)
    try:
        return write_checkpoint(out, state, **kwargs)
    except OSError as e:
        shutil.rmtree(out / f".{final.name}.tmp", ignore_errors=True)
        raise io_error(e, final, "write checkpoint") from None
    except RuntimeError as e:  # torch.save reports a failed write as RuntimeError ("unexpected pos ...")
        if "writ" not in str(e) and "unexpected pos" not in str(e):
            raise
        shutil.rmtree(out / f".{final.name}.tmp", ignore_errors=True)
        free = shutil.disk_usage(out).free if out.exists() else 0
        raise IrtrainIOError(f"cannot write checkpoint {final}: the write failed "
                             f"({str(e).splitlines()[0][:120]}); {free / 2**20:.0f} MiB free on that disk") from None


def checksums(path: Path, rank: int | None = None, shared: bool = True) -> dict[str, str]:
    """sha256 of the files of a checkpoint directory but trainer_state.json, by relative path:
    the shared ones (`shared`) and those of `rank` (None: of every rank)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if not p.is_file() or p.name == STATE:
            continue
        name = p.relative_to(path).as_posix()
        owner = file_rank(name)
        if (shared and owner is None) or (owner is not None and (rank is None or owner == rank)):
            out[name] = file_sha256(p)
    return out


def verify_checkpoint(path: Path, rank: int | None = None) -> str | None:
    """Why the checkpoint at `path` cannot be used (None: it is complete and every file matches
    the checksum recorded when it was written). `rank`: only the files that rank reads (the
    shared ones and its own); None: every file."""
    try:
        _, payload = read_state(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{STATE} is unreadable ({type(e).__name__})"
    for name, digest in (payload.get("files") or {}).items():
        if rank is not None and file_rank(name) not in (None, rank):
            continue
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if file_sha256(f) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def read_state(path: Path) -> tuple[TrainState, dict[str, Any]]:
    payload = json.loads((path / STATE).read_text(encoding="utf-8"))
    return TrainState(**payload["state"]), payload


def load_checkpoint(path: Path, *, strategy: Any) -> TrainState:
    """Restore optimizer state and RNG from `path` (the weights are loaded by the caller
    with `from_pretrained(path)` before `strategy.setup`). Returns the saved state."""
    state, payload = read_state(path)
    strategy.load_training_state(path, same_layout=same_layout(saved_layout(payload), strategy.layout))
    rng_file = path / f"rng-{strategy.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def saved_layout(payload: dict[str, Any]) -> dict[str, int]:
    """The layout (world size, ZeRO stage; 0: no DeepSpeed) a checkpoint was written by."""
    if "layout" in payload:
        return dict(payload["layout"])
    spec = (payload.get("config") or {}).get("deepspeed") or ""
    stage = {"zero1": 1, "zero2": 2, "zero3": 3}.get(spec, -1 if spec else 0)  # -1: a JSON file, stage unknown
    return {"world_size": int(payload.get("world_size") or 1), "zero_stage": stage}


def same_layout(saved: dict[str, int], now: dict[str, int]) -> bool:
    """Whether optimizer state written by layout `saved` is readable as it is by layout `now`."""
    stage_ok = saved["zero_stage"] == now["zero_stage"] or (saved["zero_stage"] == -1 and now["zero_stage"] > 0)
    return saved["world_size"] == now["world_size"] and stage_ok


def prune_checkpoints(out: Path, limit: int, protected: set[int]) -> None:
    """Keep the `limit` newest periodic checkpoints; `--save-at` ones (protected) stay."""
    if limit <= 0:
        return
    periodic = [p for p in list_checkpoints(out) if int(p.name[len(PREFIX):]) not in protected]
    for p in periodic[:-limit]:
        shutil.rmtree(p, ignore_errors=True)


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the current step (on all
    ranks: the flag is all-reduced) and exits. Further signals are ignored until then: under a
    launcher every worker gets the signal twice (the process group's, then the launcher's
    forwarded one), and SLURM signals every process; a second signal must not kill a worker in
    the middle of the checkpoint. A worker started by a launcher (torchrun, deepspeed) also
    asks for SIGTERM when its launcher dies (Linux PR_SET_PDEATHSIG), so killing the launcher
    alone checkpoints too instead of leaving the workers training detached."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._depth = 0  # entered again (the loop inside the run): one set of handlers
        self._watch: _LauncherWatch | None = None

    def __enter__(self) -> StopSignal:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
            if "LOCAL_RANK" in os.environ:
                _parent_death_signal(signal.SIGTERM)
                self._watch = _LauncherWatch()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            if self._depth < 2:  # the loop enters it a second time: not yet there
                print(f"\n{name} before training started (loading, reference pass): the run stops after its first step, "
                      "with a checkpoint (further signals are ignored until then)", file=sys.stderr, flush=True)
            else:
                print(f"\n{name}: a checkpoint is written at the end of this step, then the run stops "
                      "(further signals are ignored until then)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth:
            return
        for s, h in self._old.items():
            signal.signal(s, h)
        if self._old and "LOCAL_RANK" in os.environ:
            _parent_death_signal(0)
        if self._watch is not None:
            self._watch.stop()


class _LauncherWatch:
    """A worker's watch on its launchers: the parent (torchrun's agent, deepspeed's launch.py)
    and, under the `deepspeed` command, the runner above it, which does not pass a SIGTERM
    on. When one of them is gone, the worker sends itself SIGTERM (an orderly checkpoint)."""

    def __init__(self, every: float = 1.0):
        self._done = threading.Event()
        self.pids = [os.getppid()]
        try:
            import psutil

            grand = psutil.Process(self.pids[0]).parent()
            if grand is not None and "deepspeed" in " ".join(grand.cmdline()):
                self.pids.append(grand.pid)
        except Exception:  # psutil missing, or no permission: the parent alone is watched
            pass
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True, name="irtrain-launcher-watch")
        self._thread.start()

    def _gone(self) -> bool:
        if os.getppid() != self.pids[0]:
            return True  # re-parented: the parent died
        for pid in self.pids[1:]:
            try:
                import psutil

                proc = psutil.Process(pid)
                if proc.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by its own parent
                    return True
            except psutil.NoSuchProcess:
                return True
            except Exception:
                pass
        return False

    def _run(self, every: float) -> None:
        while not self._done.wait(every):
            if self._gone():
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def stop(self) -> None:
        self._done.set()


def _parent_death_signal(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG, signum) where the platform has it (0 clears it)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
