"""The padding-free forward of a packed micro-batch.

A `Batch` is one [1, N] sequence of several documents. transformers (>= 4.53, 5.x) treats
`position_ids` that restart at 0 as document boundaries when no attention mask is given:
with `sdpa` / `eager` it builds the block-diagonal causal mask (exact, used on CPU), with
flash-attention it runs the varlen kernel. For flash-attention we also pass the boundaries
explicitly (`cu_seq_lens_q/k`, `max_length_q/k`), so nothing is re-derived on the GPU.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from irtrain.train.batching import Batch


def _uses_flash(model: Any) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash" in str(impl)


def packed_forward(model: Any, batch: Batch) -> Tensor:
    """Logits [1, N, V] of a packed batch; no attention crosses a document boundary."""
    kwargs: dict[str, Any] = {}
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    if _uses_flash(inner):
        cu = batch.cu_seqlens.to(device=batch.input_ids.device, dtype=torch.int32)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)
    return out.logits
