"""The padding-free forward of a packed micro-batch.

A `Batch` is one [1, N] sequence of several documents; no attention may cross a document
boundary. Three exact ways, picked by `--attn-implementation` (default: the first that
applies):

- `flash_attention_2` (GPU, flash-attn installed): the varlen kernel, given the boundaries
  explicitly (`cu_seq_lens_q/k`, `max_length_q/k`);
- `irtrain_varlen` (the CPU default): causal SDPA run per document, registered with
  transformers' `AttentionInterface`; costs sum(L_i^2), not N^2, and builds no mask;
- `sdpa` / `eager`: transformers (>= 4.53, 5.x) reads `position_ids` that restart at 0 as
  document boundaries when no attention mask is given and builds the block-diagonal causal
  mask (N^2 memory; what GPUs without flash-attn use).
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from irtrain.train.batching import Batch

VARLEN = "irtrain_varlen"


def varlen_sdpa_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Exact attention of a packed sequence, one causal SDPA call per document.

    query [1, H, N, D], key/value [1, H_kv, N, D]; `cu_seq_lens_q` [S+1] the document
    boundaries. Returns [1, N, H, D] (transformers' attention-function contract). Without
    boundaries (e.g. in `generate`) it is plain causal SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} expects one packed sequence (batch 1), got batch {query.shape[0]}")
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: SDPA's enable_gqa is slower on CPU than repeating
        key = key[:, :, None].expand(-1, -1, n_rep, -1, -1).flatten(1, 2)
        value = value[:, :, None].expand(-1, -1, n_rep, -1, -1).flatten(1, 2)
    p = dropout if module.training else 0.0
    bounds = cu.tolist()
    outs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=p, is_causal=True,
                                           scale=scaling)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_sdpa_attention)


_register()


def default_attn_implementation(device: torch.device) -> str:
    """flash_attention_2 on a GPU with flash-attn, sdpa on other GPUs, irtrain_varlen on CPU."""
    if device.type == "cuda":
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    return VARLEN


def _attn_impl(model: Any) -> str:
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return str(getattr(getattr(inner, "config", None), "_attn_implementation", None) or "")


def packed_forward(model: Any, batch: Batch) -> Tensor:
    """Logits [1, N, V] of a packed batch; no attention crosses a document boundary."""
    kwargs: dict[str, Any] = {}
    impl = _attn_impl(model)
    if "flash" in impl or impl == VARLEN:
        cu = batch.cu_seqlens.to(device=batch.input_ids.device, dtype=torch.int32)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)
    return out.logits
