"""Where the model runs: one process, or DeepSpeed ZeRO over many (Lightning Fabric's idea:
the strategy hides the wrapping, the loop stays plain PyTorch).

This is the only module that imports `deepspeed`. The loop calls, per optimizer step::

    strategy.set_lr(lr)
    for i, batch in enumerate(micro_batches):
        strategy.begin_micro_step(last=(i == len(micro_batches) - 1))
        with strategy.autocast():
            loss = ...
        strategy.backward(loss)
    grad_norm, applied = strategy.step(max_grad_norm, finite_loss)

Gradient semantics: `backward(loss)` accumulates d(loss)/dθ **summed** over micro-batches
and ranks (the loop's losses are already shares of the step total), so the DeepSpeed
strategy multiplies by the world size to undo DeepSpeed's averaging over ranks.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from irtrain.adapters import load_causal_lm
from irtrain.config import TrainConfig
from irtrain.errors import ConfigError
from irtrain.extras import require
from irtrain.models import resolve_device, resolve_dtype
from irtrain.train.packed import default_attn_implementation
from irtrain.train.portable import adamw_state, init_adam_state, read_portable, set_portable, write_portable


def world_from_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) as set by `torchrun` / `deepspeed` launchers."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm weights (1-D parameters). A parameter's
    dimensions are those of its full shape: under ZeRO-3 the model is built partitioned and
    every local tensor is empty, shape (0,); DeepSpeed keeps the full shape in `ds_shape`."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _group_order(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) in the order of the AdamW groups (how optimizer.pt numbers them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for g in _param_groups(model, 0.0) for p in g["params"]]


def _adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
    )


class Strategy:
    """Single process on one device (CPU or one GPU)."""

    name = "single"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = 0, 0, 1
        self.device = resolve_device(cfg.device)
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ facts
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def param_dtype(self) -> torch.dtype:
        """dtype to load parameters in. auto: fp32 (with bf16 autocast on GPU)."""
        return resolve_dtype(self.cfg.dtype, auto=torch.float32)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.on_gpu and self.cfg.dtype == "auto":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ model
    def load_model(self, path: str | Path, *, attn_implementation: str | None, trust_remote_code: bool = False,
                   quantization: Any = None) -> Any:
        """A full model directory, or an adapter checkpoint (its base with the adapter merged);
        `quantization`: a BitsAndBytesConfig (QLoRA), loaded straight onto this process's GPU."""
        kwargs: dict[str, Any] = {"dtype": self.param_dtype(), "trust_remote_code": trust_remote_code,
                                  "attn_implementation": attn_implementation or default_attn_implementation(self.device)}
        if quantization is not None:
            kwargs.update(quantization_config=quantization, dtype=torch.bfloat16, device_map={"": self.device})
        with self._init_context():
            model = load_causal_lm(path, **kwargs)
        return model

    def _init_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def setup(self, model: Any) -> Any:
        """Move to the device, build AdamW; returns the model to call."""
        self.model = model if getattr(model, "is_quantized", False) else model.to(self.device)  # bitsandbytes: placed at load
        self.optimizer = _adamw(self.model, self.cfg)
        return self.model

    def frozen(self, model: Any) -> Any:
        """A frozen copy for inference only (e.g. a resident reference model)."""
        model.requires_grad_(False)
        return model.to(self.device).eval()

    def unwrap(self, model: Any) -> Any:
        return model

    # ------------------------------------------------------------------ step
    def _opt(self) -> torch.optim.Optimizer:
        assert self.optimizer is not None, "setup(model) first"
        return self.optimizer

    def set_lr(self, lr: float) -> None:
        for g in self._opt().param_groups:
            g["lr"] = lr

    def begin_micro_step(self, *, last: bool) -> None:
        pass

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float, finite_loss: bool) -> tuple[float, bool]:
        """Clip and step. Returns (grad norm before clipping, whether the step was applied);
        a non-finite loss or grad norm skips the step and drops the gradients."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        norm_f = float(norm)
        applied = finite_loss and math.isfinite(norm_f)
        if applied:
            self._opt().step()
        self._opt().zero_grad(set_to_none=True)
        return norm_f, applied

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        return t

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    # ------------------------------------------------------------------ checkpoints
    @property
    def layout(self) -> dict[str, int]:
        """How this run partitions its optimizer state (a checkpoint of another layout is
        resumed from its world-size-free state, portable.py)."""
        return {"world_size": 1, "zero_stage": 0}

    def save_training_state(self, path: Path) -> None:
        """Optimizer state (everything but the weights, which go to safetensors)."""
        torch.save(self._opt().state_dict(), path / "optimizer.pt")

    def load_training_state(self, path: Path, same_layout: bool = True) -> None:
        """The optimizer state of `path`: its optimizer.pt, or the world-size-free state a
        DeepSpeed run wrote (fp32 master weights into the parameters, Adam's moments)."""
        if (path / "optimizer.pt").is_file():
            state = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
            self._opt().load_state_dict(state)
            return
        named = _group_order(self.model)
        portable = read_portable(path, [n for n, _ in named])
        with torch.no_grad():
            for name, p in named:
                fp32 = portable.get("fp32", name)
                if fp32 is not None:
                    p.copy_(fp32.reshape(p.shape))
        self._opt().load_state_dict(adamw_state(self._opt(), named, portable))

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The model's full state dict on the main rank (None: use the module's own)."""
        return None

    def teardown(self) -> None:
        pass


# ---------------------------------------------------------------------------- DeepSpeed
_ZERO = {"zero1": 1, "zero2": 2, "zero3": 3}


def deepspeed_config(spec: str, cfg: TrainConfig, *, bf16: bool, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config: a preset (zero1|zero2|zero3) or a user file whose "auto"
    values are filled in from the flags. DeepSpeed's batch sizes are bookkeeping only (the
    loop sets accumulation boundaries and scales losses itself); they are filled in to
    describe the run: micro-batch rows, accumulation steps, global batch."""
    micro = max(1, cfg.micro_batch)
    micro_steps = max(1, cfg.global_batch // (micro * world_size)) if cfg.global_batch_tokens <= 0 else 1
    if spec in _ZERO:
        ds: dict[str, Any] = {"zero_optimization": {"stage": _ZERO[spec], "overlap_comm": False, "contiguous_gradients": True}}
        if _ZERO[spec] == 3:
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--deepspeed {spec!r} is neither zero1|zero2|zero3 nor an existing JSON file")
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError("the DeepSpeed config must not set 'optimizer' or 'scheduler': irtrain uses AdamW with its own lr schedule")

    def fill(d: dict[str, Any], key: str, value: Any) -> None:
        if d.get(key, "auto") == "auto":
            d[key] = value

    fill(ds, "train_micro_batch_size_per_gpu", micro)
    fill(ds, "gradient_accumulation_steps", max(1, micro_steps))
    fill(ds, "train_batch_size", ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size)
    fill(ds, "gradient_clipping", cfg.max_grad_norm)
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    if ds["bf16"]["enabled"]:
        ds["bf16"].setdefault("check_grad_overflow", True)  # skip, do not apply, a non-finite step
    ds.setdefault("steps_per_print", 10**12)
    ds.setdefault("wall_clock_breakdown", False)
    zo = ds.setdefault("zero_optimization", {})
    for key in list(zo):
        if zo[key] == "auto":
            del zo[key]
    return ds


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO 1/2/3 over the processes started by `deepspeed` or `torchrun`
    (gloo on CPU, NCCL on GPU)."""

    name = "deepspeed"

    def __init__(self, cfg: TrainConfig):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self._ds = deepspeed
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = world_from_env()
        acc = get_accelerator()
        if acc.device_name() == "cuda" and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), verbose=False)
            # destroyed once, at the end of the process (the alternating schedule runs several
            # trainings in one): a process group left to the interpreter's teardown can abort
            # the exit ("terminate called without an active exception")
            atexit.register(_destroy_process_group)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.bf16 = (self.on_gpu and cfg.dtype == "auto") or cfg.dtype == "bfloat16"
        if cfg.dtype == "float16":
            raise ConfigError("--dtype float16 is not supported with --deepspeed (use bfloat16)")
        self.ds_config = deepspeed_config(cfg.deepspeed or "", cfg, bf16=self.bf16, world_size=self.world_size)
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self._hf_ds_config: Any = None
        self.engine: Any = None
        self.model = None
        self.optimizer = None

    def param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed's bf16 mode holds bf16 weights itself

    def _init_context(self) -> contextlib.AbstractContextManager:
        if self.stage == 3 and self._hf_ds_config is None:
            # Makes from_pretrained build the model already partitioned (zero.Init).
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        return contextlib.nullcontext()

    def setup(self, model: Any) -> Any:
        optimizer = _adamw(model, self.cfg)
        self.engine, self.optimizer, _, _ = self._ds.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.model = self.engine
        return self.engine

    def frozen(self, model: Any) -> Any:
        model.requires_grad_(False)
        if self.stage == 3:
            ref_cfg = {k: v for k, v in self.ds_config.items() if k not in ("gradient_clipping",)}
            engine, *_ = self._ds.initialize(model=model, config=ref_cfg)
            engine.eval()
            return engine
        return model.to(self.device, dtype=self.param_dtype()).eval()

    def unwrap(self, model: Any) -> Any:
        return getattr(model, "module", model)

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr

    def begin_micro_step(self, *, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: Tensor) -> None:
        # DeepSpeed averages gradients over ranks; our losses are shares of the step sum.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self, max_grad_norm: float, finite_loss: bool) -> tuple[float, bool]:
        # ZeRO computes the global norm, clips (gradient_clipping) and skips a step whose
        # gradients are not finite; a non-finite loss gives non-finite gradients.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm_f = float(norm) if norm is not None else float("nan")
        applied = bool(self.engine.was_step_applied()) and finite_loss and math.isfinite(norm_f)
        return norm_f, applied

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX, "min": torch.distributed.ReduceOp.MIN}
        t = t.to(self.device)
        torch.distributed.all_reduce(t, op=ops[op])
        return t

    def barrier(self) -> None:
        torch.distributed.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    @property
    def layout(self) -> dict[str, int]:
        return {"world_size": self.world_size, "zero_stage": self.stage}

    def _adam_step(self) -> int:
        """Adam's step count (0 before the first applied step: no moments exist yet)."""
        inner = self.engine.optimizer.optimizer
        local = max((float(st["step"]) for st in inner.state.values() if "step" in st), default=0.0)
        return int(self.all_reduce(torch.tensor([local], dtype=torch.float64), op="max").item())

    def _link_moments(self) -> None:
        # ZeRO-1/2 link each parameter's view of the Adam moments once, after the first step of
        # the first group, when a second group (no decay) has no state yet: link again, now
        if self.stage in (1, 2):
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def save_training_state(self, path: Path) -> None:
        # Every rank writes its optimizer partition; the weights go to safetensors separately.
        # With LoRA only the adapters are trainable; the frozen base is not written again.
        self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False, exclude_frozen_parameters=self.cfg.lora_r > 0)
        # ... and the same state world-size-free (portable.py): what resumes on another layout
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        step = self._adam_step()
        self._link_moments()
        write_portable(path, _trainable(self.unwrap(self.engine)), step, enabled=self.is_main,
                       fp32=safe_get_full_fp32_param, moment=safe_get_full_optimizer_state)

    def load_training_state(self, path: Path, same_layout: bool = True) -> None:
        """DeepSpeed's own partitions when the checkpoint was written by this layout (world size,
        ZeRO stage); otherwise its world-size-free state (portable.py), set partition-wise."""
        if same_layout and (path / "deepspeed").is_dir():
            load_path, _ = self.engine.load_checkpoint(
                str(path), tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=False,
                load_module_strict=self.cfg.lora_r == 0)
            if load_path is None:
                raise ConfigError(f"{path}: no DeepSpeed state to resume from")
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        module = self.unwrap(self.engine)
        portable = read_portable(path, [n for n, _ in _group_order(module)])
        if portable.step > 0:
            zero, inner = self.engine.optimizer, self.engine.optimizer.optimizer
            # the tensors AdamW steps: ZeRO-3 puts its partitions into the groups only during a step
            flats = list(zero.fp32_partitioned_groups_flat) if self.stage == 3 else [p for g in inner.param_groups for p in g["params"]]
            init_adam_state(inner, flats, portable.step)
            self._link_moments()
        set_portable(path, _trainable(module), portable, device=self.device, fp32=safe_set_full_fp32_param,
                     moment=safe_set_full_optimizer_state)

    def full_state_dict(self) -> dict[str, Tensor] | None:
        if self.stage == 3:
            # collective; full on rank 0 (with LoRA: the trainable parameters only, i.e. the adapter)
            return self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=self.cfg.lora_r > 0)
        return None

    def teardown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


def make_strategy(cfg: TrainConfig) -> Strategy:
    """Single process unless `--deepspeed` is given; a multi-process launch without it is an error."""
    _, _, world = world_from_env()
    if cfg.deepspeed:
        require("deepspeed", f"--deepspeed {cfg.deepspeed}")
        return DeepSpeedStrategy(cfg)
    if world > 1:
        raise ConfigError(f"launched with WORLD_SIZE={world} but without --deepspeed: multi-process training runs under DeepSpeed")
    return Strategy(cfg)
