"""The memory line at the start of a run: parameters, and the bytes each device holds for
weights, gradients and optimizer state, before activations.

Per parameter of n elements with `e` bytes per element (the dtype it is held in):

- weights: n * e for every parameter (trainable or frozen; a bitsandbytes-quantized weight
  counts its packed storage);
- gradients: n * e for the trainable ones;
- AdamW: two moments per trainable element, in the parameter's dtype on one process
  (torch's AdamW), and fp32 moments plus an fp32 master copy (12 bytes) under DeepSpeed
  with bf16 weights (4 + 4 + 4: DeepSpeed's mixed precision), 8 bytes with fp32 weights;
- ZeRO over W processes divides optimizer state by W (stage >= 1), gradients too (>= 2)
  and weights too (3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MIB = 1 << 20


@dataclass(frozen=True)
class MemoryEstimate:
    total_params: int
    trainable_params: int
    weights: int        # bytes per device
    gradients: int
    optimizer: int
    where: str          # "float32, single process", "bfloat16, ZeRO-3 over 8 processes", ...
    adapters: str       # "full fine-tune" or the LoRA description

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def line(self) -> str:
        share = 100.0 * self.trainable_params / max(1, self.total_params)
        return (f"memory: {self.total_params / 1e6:,.1f} M parameters, {self.trainable_params / 1e6:,.2f} M trainable ({share:.2f}%, "
                f"{self.adapters}); per device before activations: weights {self.weights / MIB:,.1f} MiB + gradients "
                f"{self.gradients / MIB:,.1f} MiB + optimizer {self.optimizer / MIB:,.1f} MiB = {self.total / MIB:,.1f} MiB ({self.where})")


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3: the full size of a partitioned parameter


def estimate(model: torch.nn.Module, *, stage: int = 0, world_size: int = 1, deepspeed: bool = False,
             adapters: str = "full fine-tune") -> MemoryEstimate:
    """The estimate for `model` (the unwrapped module) trained with AdamW as described above."""
    total = trainable = weights = grads = optim = 0
    dtypes: set[str] = set()
    for p in model.parameters():
        n, e = _numel(p), p.element_size()
        total += n
        weights += n * e
        dtypes.add(str(p.dtype).replace("torch.", ""))
        if p.requires_grad:
            trainable += n
            grads += n * e
            optim += n * (12 if deepspeed and e < 4 else 8 if deepspeed else 2 * e)
    w = max(1, world_size)
    if stage >= 1:
        optim //= w
    if stage >= 2:
        grads //= w
    if stage >= 3:
        weights //= w
    where = "/".join(sorted(dtypes)) + (f", ZeRO-{stage} over {w} processes" if deepspeed else ", single process")
    return MemoryEstimate(total_params=total, trainable_params=trainable, weights=weights, gradients=grads, optimizer=optim,
                          where=where, adapters=adapters)


def strategy_estimate(model: Any, strategy: Any, adapters: str) -> MemoryEstimate:
    """`estimate` for the model a strategy holds."""
    deepspeed = strategy.name == "deepspeed"
    return estimate(strategy.unwrap(model), stage=getattr(strategy, "stage", 0), world_size=strategy.world_size,
                    deepspeed=deepspeed, adapters=adapters)
