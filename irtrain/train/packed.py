"""The padding-free forward of a packed micro-batch.

A `Batch` is one [1, N] sequence of several documents; no attention may cross a document
boundary. Three exact ways, picked by `--attn-implementation` (default: the first that
applies, `default_attn_implementation`):

- `flash_attention_2` (GPU, flash-attn installed): the varlen kernel, given the boundaries
  explicitly (`cu_seq_lens_q/k`, `max_length_q/k`);
- `irtrain_varlen` (every other device), registered once with transformers'
  `AttentionInterface`: on a GPU, PyTorch's own variable-length flash kernel
  (`torch.nn.attention.varlen.varlen_attn`, one call over all documents) where it applies
  (`varlen_kernel_for`: bf16/fp16, no dropout, ...); otherwise, and always on CPU, causal
  SDPA run per document. Both cost sum(L_i^2), not N^2, and build no mask;
- `sdpa` / `eager`, only when asked for: transformers (>= 4.53, 5.x) reads `position_ids`
  that restart at 0 as document boundaries when no attention mask is given and builds the
  block-diagonal causal mask (N^2 memory).

Training, the reference pass and score read the model through `packed_token_stats` /
`packed_scores`: the LM head runs at the response states only (`irtrain.train.head`),
inside the head module's own call (`_stats_head`), never over the whole [N, V] row.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from irtrain.losses import TokenStats, response_states, state_token_stats
from irtrain.train.batching import Batch
from irtrain.train.head import lm_head_stats

VARLEN = "irtrain_varlen"
TORCH_VARLEN, PER_DOCUMENT = "varlen_attn", "sdpa_per_document"
#: How many heads and attention calls ran which way in this process (tests and diagnostics read it).
PATHS: Counter[str] = Counter()


@dataclass(frozen=True)
class VarlenKernel:
    """What the installed `varlen_attn` accepts: how to ask for causal attention (torch 2.9:
    `is_causal=True`; 2.10 on: `window_size=(-1, 0)`), and whether it takes `scale` (2.10
    on) and `enable_gqa` (2.12 on; without it the kv heads are repeated)."""

    fn: Callable[..., Any]
    causal: dict[str, Any] = field(default_factory=dict)
    scale: bool = False
    gqa: bool = False


def describe_varlen(fn: Callable[..., Any]) -> VarlenKernel | None:
    """The `VarlenKernel` of a `varlen_attn`-like function, from its signature; None if it
    has no way to ask for causal attention."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if "window_size" in params:
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return VarlenKernel(fn, causal, scale="scale" in params, gqa="enable_gqa" in params)


@functools.lru_cache(maxsize=1)
def torch_varlen() -> VarlenKernel | None:
    """PyTorch's variable-length flash kernel, if this torch has it (2.9 on) and it runs on
    this GPU (CUDA, not ROCm; flash needs compute capability >= 8.0)."""
    if not torch.cuda.is_available() or torch.version.hip is not None or torch.cuda.get_device_capability() < (8, 0):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return describe_varlen(varlen_attn)


def varlen_kernel_for(device_type: str, dtype: torch.dtype, head_dims: tuple[int, int], heads: tuple[int, int],
                      dropout: float, scaling: float | None, kernel: VarlenKernel | None) -> str:
    """Which kernel one `irtrain_varlen` call runs: TORCH_VARLEN when `varlen_attn` applies,
    else PER_DOCUMENT (exact too, a Python loop of SDPA calls).

    `varlen_attn` needs a CUDA tensor in float16/bfloat16 (bf16 autocast gives that;
    float32 weights without autocast do not), no dropout (it has none: its dropout is fixed
    at 0, so a training run with attention dropout stays per document; eval has p = 0),
    query and value head dims equal, a multiple of 8 and at most 256 (flash), query heads a
    multiple of the kv heads, and a scale it can take (the default 1/sqrt(D) when it has no
    `scale` argument). `head_dims` = (query, value), `heads` = (query, kv).
    """
    if kernel is None or device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or dropout > 0:
        return PER_DOCUMENT
    (d, dv), (hq, hkv) = head_dims, heads
    if d != dv or d % 8 or d > 256 or hkv < 1 or hq % hkv:
        return PER_DOCUMENT
    if scaling is not None and not kernel.scale and not math.isclose(scaling, d ** -0.5, rel_tol=1e-6):
        return PER_DOCUMENT
    return TORCH_VARLEN


def _repeat_kv(x: Tensor, n_rep: int, dim: int) -> Tensor:
    """Each kv head repeated n_rep times along `dim` (query head i reads kv head i // n_rep)."""
    if n_rep == 1:
        return x
    shape = list(x.shape)
    shape.insert(dim + 1, n_rep)
    return x.unsqueeze(dim + 1).expand(shape).flatten(dim, dim + 1)


def torch_varlen_attention(kernel: VarlenKernel, query: Tensor, key: Tensor, value: Tensor, cu: Tensor, max_len: int,
                           scaling: float | None) -> Tensor:
    """Causal attention of a packed sequence in one `varlen_attn` call: query [1, H, N, D],
    key/value [1, H_kv, N, D], cu [S+1] int32 -> [1, N, H, D]. The same `cu` tensor serves
    queries and keys (cuDNN's causal varlen path requires it)."""
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [N, H, D]
    extra = dict(kernel.causal)
    if scaling is not None and kernel.scale:
        extra["scale"] = scaling
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and kernel.gqa:
        extra["enable_gqa"] = True
    elif n_rep > 1:
        k, v = _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1)
    return kernel.fn(q, k, v, cu, cu, max_len, max_len, **extra).unsqueeze(0)


def per_document_sdpa(query: Tensor, key: Tensor, value: Tensor, bounds: list[int], dropout: float,
                      scaling: float | None) -> Tensor:
    """Causal SDPA one document at a time: query [1, H, N, D], key/value [1, H_kv, N, D] ->
    [1, N, H, D]."""
    n_rep = query.shape[1] // key.shape[1]
    # grouped-query attention: SDPA's enable_gqa is slower on CPU than repeating
    key, value = _repeat_kv(key, n_rep, 1), _repeat_kv(value, n_rep, 1)
    outs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, is_causal=True,
                                           scale=scaling)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous()


def varlen_sdpa_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Exact attention of a packed sequence (`irtrain_varlen`), no attention across documents.

    query [1, H, N, D], key/value [1, H_kv, N, D]; `cu_seq_lens_q` [S+1] the document
    boundaries. Returns [1, N, H, D] (transformers' attention-function contract). On a GPU
    one `varlen_attn` call where `varlen_kernel_for` says it applies, else (and on CPU) one
    causal SDPA call per document. Without boundaries (e.g. in `generate`) it is plain
    causal SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} expects one packed sequence (batch 1), got batch {query.shape[0]}")
    p = dropout if module.training else 0.0
    if query.device.type == "cuda":
        query, key, value = autocast_inputs(query, key, value)
        kernel = torch_varlen()
        choice = varlen_kernel_for("cuda", query.dtype, (query.shape[-1], value.shape[-1]), (query.shape[1], key.shape[1]), p,
                                   scaling, kernel)
        if kernel is not None and choice == TORCH_VARLEN:
            PATHS["attention/" + TORCH_VARLEN] += 1
            max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
            return torch_varlen_attention(kernel, query, key, value, cu, int(max_len), scaling), None
    PATHS["attention/" + PER_DOCUMENT] += 1
    return per_document_sdpa(query, key, value, cu.tolist(), p, scaling), None


def autocast_inputs(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under autocast, q, k and v in the autocast dtype. With fp32 weights and bf16 autocast
    (`--dtype auto` on one GPU) RoPE's fp32 cos/sin promote q and k to fp32 while v is bf16;
    the flash kernel needs all three in bf16/fp16, as transformers' flash-attention integration
    casts them. Outside autocast the tensors are returned as they are."""
    dev = query.device.type
    if not torch.is_autocast_enabled(dev):
        return query, key, value
    dtype = torch.get_autocast_dtype(dev)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_sdpa_attention)


_register()


def default_attn_implementation(device: torch.device) -> str:
    """flash_attention_2 on a GPU with flash-attn, irtrain_varlen everywhere else (never
    transformers' N^2 block-diagonal mask unless `--attn-implementation sdpa`)."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return VARLEN


def _attn_impl(model: Any) -> str:
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return str(getattr(getattr(inner, "config", None), "_attn_implementation", None) or "")


def _forward(model: Any, batch: Batch, **extra: Any) -> Any:
    kwargs: dict[str, Any] = {}
    impl = _attn_impl(model)
    if "flash" in impl or impl == VARLEN:
        cu = batch.cu_seqlens.to(device=batch.input_ids.device, dtype=torch.int32)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
    return model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs, **extra)


def packed_forward(model: Any, batch: Batch) -> Tensor:
    """Logits [1, N, V] of a packed batch; no attention crosses a document boundary."""
    return _forward(model, batch).logits


#: Model types whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)`
#: (no logit soft-capping or scaling after the head), so the head's output can be replaced.
FUSED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"})


def _fusable_head(inner: Any) -> Any | None:
    """The LM head module (an `nn.Linear`) when it can be computed at the states by
    `lm_head_stats`; a ZeRO-3 partitioned one too (`_stats_head` runs inside its own call)."""
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    get_head = getattr(inner, "get_output_embeddings", None)
    head = None if get_head is None else _active_head(get_head())
    return head if isinstance(head, torch.nn.Linear) else None


def _active_head(head: Any) -> Any:
    """The LM head that runs: under peft's `--lora-modules-to-save lm_head` the head is a wrapper
    holding the original and a trained copy; the copy, unless adapters are disabled."""
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):
        active = list(head.active_adapters)
        if head.disable_adapters or not active or not all(a in head.modules_to_save for a in active):
            return head.original_module
        return head.modules_to_save[active[0]]
    return head


def _accepts(inner: Any, name: str) -> bool:
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a peft model: its transformers model
    try:
        return name in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _note_zero3_head(head: torch.nn.Linear) -> None:
    """Once per process (rank 0): the head's weight is ZeRO-3 partitioned and the chunked head runs anyway."""
    if not hasattr(head.weight, "ds_id"):
        return
    PATHS["head/zero3"] += 1
    if PATHS["head/zero3"] == 1 and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print("note: ZeRO-3: the LM head's partitioned weight is gathered by its own forward; the chunked head runs "
              "at the response states", file=sys.stderr)


@contextlib.contextmanager
def _stats_head(head: torch.nn.Linear, targets: Tensor, *, tau: float, extras: bool) -> Iterator[list[int]]:
    """While active, the head module computes `lm_head_stats` instead of logits: x [..., H]
    (the model passes its hidden states at `logits_to_keep`) -> [..., k] float32, the columns
    log p, V(s) and, with `extras`, entropy and correct (1.0/0.0). Yields a list that counts
    the calls (exactly one is expected).

    It runs as the module's own forward so that every hook of the module fires around it:
    under DeepSpeed ZeRO-3 the partitioned weight is gathered before it and released after,
    the module's output is hooked to gather it again before the backward, and its gradient
    reaches the partitioned parameter as that of any `nn.Linear`. The stats are stacked into
    one tensor because ZeRO-3 hooks the tensors of a module's output.
    """
    calls: list[int] = []

    def forward(x: Tensor) -> Tensor:
        calls.append(x.shape[-2] if x.dim() > 1 else 0)
        out = lm_head_stats(x.reshape(-1, x.shape[-1]), head.weight, head.bias, targets, tau=tau, extras=extras)
        cols = [out[0], out[1]] + ([out[3], out[2].to(out[0].dtype)] if extras else [])
        return torch.stack(cols, dim=-1).reshape(*x.shape[:-1], len(cols))

    saved = head.__dict__.get("forward")  # an instance forward already there (e.g. accelerate's hooks) comes back after
    head.__dict__["forward"] = forward
    try:
        yield calls
    finally:
        if saved is None:
            del head.__dict__["forward"]
        else:
            head.__dict__["forward"] = saved


def _head_stats(model: Any, batch: Batch, positions: Tensor, targets: Tensor, *, tau: float, extras: bool,
                keep_logits: bool) -> tuple[Tensor, ...] | Tensor:
    """One forward of a packed batch, for the head at `positions` [P] only: the stats there
    (logps, values[, correct, entropies]) from the fused head (`FUSED_HEAD_MODEL_TYPES`,
    unless `keep_logits`), else the logits there [P, V]."""
    if batch.input_ids.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {tuple(batch.input_ids.shape)}")
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    head = None if keep_logits else _fusable_head(inner)
    if head is None:
        if _accepts(inner, "logits_to_keep"):
            PATHS["head/logits_to_keep"] += 1
            return _forward(model, batch, logits_to_keep=positions).logits[0]
        PATHS["head/full_logits"] += 1
        return _forward(model, batch).logits[0][positions]
    _note_zero3_head(head)
    with _stats_head(head, targets, tau=tau, extras=extras) as calls:
        out = _forward(model, batch, logits_to_keep=positions).logits
    cols = out.reshape(-1, out.shape[-1])  # [P, k]
    if len(calls) != 1 or cols.shape[0] != positions.numel():
        raise RuntimeError(f"the fused LM head ran {len(calls)} times on {calls} rows, expected once on {positions.numel()}")
    PATHS["head/fused"] += 1
    logps, values = cols[:, 0], cols[:, 1]
    if not extras:
        return logps, values
    return logps, values, cols[:, 3] > 0.5, cols[:, 2].detach()


def packed_token_stats(model: Any, batch: Batch, *, tau: float = 1.0, keep_logits: bool = False,
                       extras: bool = False) -> TokenStats:
    """`TokenStats` of a packed batch, with the LM head computed at the response states only.

    For the model types in `FUSED_HEAD_MODEL_TYPES` (and unless `keep_logits`), the head
    module computes `lm_head_stats` at the states inside the model's forward (chunked rows,
    no [N, V] logits kept for the backward); otherwise transformers computes the logits at
    those positions only (`logits_to_keep`), or, for a model whose forward lacks it, everywhere.
    """
    states = response_states(batch.labels)
    out = _head_stats(model, batch, states.index, states.targets, tau=tau, extras=extras, keep_logits=keep_logits)
    if isinstance(out, Tensor):
        return state_token_stats(out, states, tau=tau, keep_logits=keep_logits, extras=extras)
    return TokenStats(logps=out[0], values=out[1], is_last=states.is_last, index=states.index, targets=states.targets,
                      correct=out[2] if extras else None, entropies=out[3] if extras else None)


@torch.no_grad()
def packed_scores(model: Any, batch: Batch, value_positions: Tensor, *, tau: float = 1.0) -> tuple[TokenStats, Tensor]:
    """One no-grad forward for `irtrain score`: the response tokens' `TokenStats` and the
    values V(s) = tau * logsumexp(l(s) / tau) [P] float32 at `value_positions` (positions in
    the packed row; the logits at position p are l(s) of the state that ends at p), with the
    head computed at those positions only."""
    states = response_states(batch.labels)
    n = states.index.numel()
    value_positions = value_positions.to(device=states.index.device, dtype=torch.long)
    positions = torch.cat([states.index, value_positions])
    targets = torch.cat([states.targets, torch.zeros_like(value_positions)])  # a value needs no target
    out = _head_stats(model, batch, positions, targets, tau=tau, extras=False, keep_logits=False)
    if isinstance(out, Tensor):
        stats = state_token_stats(out[:n], states)
        z = out[n:].float()
        values = torch.logsumexp(z, dim=-1) if tau == 1.0 else tau * torch.logsumexp(z / tau, dim=-1)
        return stats, values
    logps, values = out
    return TokenStats(logps=logps[:n], values=values[:n], is_last=states.is_last, index=states.index,
                      targets=states.targets), values[n:]
