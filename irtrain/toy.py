"""Things irtrain builds itself where a hub would otherwise be needed.

- `train_tokenizer`: a byte-level BPE tokenizer trained on given texts, saved as a
  transformers tokenizer directory (tokenizer.json + tokenizer_config.json) with
  one of three structurally different chat templates.
- `tiny_llama`: a Llama-architecture causal LM built from a config (random init),
  saved with safetensors so `from_pretrained` loads it.

Used by the quickstart and by the tests; nothing here downloads anything.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

#: Chat templates in the style of real model families (Jinja, rendered by transformers).
CHAT_TEMPLATES: dict[str, str] = {
    # Qwen / ChatML style: role headers inside special tokens.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama-3 style: BOS, header tokens, trimmed content, <|eot_id|>.
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Mistral v0.1 style: BOS once, [INST] ... [/INST], answers end with EOS, strict alternation.
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{% endfor %}"
    ),
}

#: Special tokens per template: (bos, eos, pad, extra special tokens).
_SPECIALS: dict[str, tuple[str, str, str, list[str]]] = {
    "chatml": ("<|endoftext|>", "<|im_end|>", "<|endoftext|>", ["<|im_start|>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "mistral": ("<s>", "</s>", "</s>", ["[INST]", "[/INST]"]),
}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, template: str = "chatml", vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer and save it with `template` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; one of {sorted(CHAT_TEMPLATES)}")
    bos, eos, pad, extra = _SPECIALS[template]
    specials = list(dict.fromkeys([bos, eos, pad, *extra]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = CHAT_TEMPLATES[template]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def tiny_llama(tokenizer_dir: str | Path, out_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
               max_position_embeddings: int = 2048, seed: int = 0) -> Path:
    """Build a randomly initialised Llama-architecture model sized for CPU tests and save it
    (safetensors) together with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    from irtrain.durable import share_modes

    share_modes(out)  # save_pretrained leaves model.safetensors 0600
    return out
