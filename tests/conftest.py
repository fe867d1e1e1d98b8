"""Shared fixtures: a tokenizer the tests train, and tiny models built from a config."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    f"Question {i}: what is {i} plus {i * 3}? Let's think.\n\nStep 1: {i} + {i * 3} = {i * 4}.\n\nThe answer is {i * 4}. "
    "Unicode: café, naïve, 日本語, emoji 🎉🚀, tabs\tand  spaces."
    for i in range(400)
]


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    """Byte-level BPE tokenizers trained here, one per chat template (chatml, llama3, mistral)."""
    from irtrain.toy import CHAT_TEMPLATES, train_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {name: train_tokenizer(TEXTS, root / name, template=name, vocab_size=500) for name in CHAT_TEMPLATES}


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dirs, tmp_path_factory):
    """A 2-layer Llama built from a config, with the chatml tokenizer."""
    from irtrain.toy import tiny_llama

    return tiny_llama(tokenizer_dirs["chatml"], tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def without(tmp_path):
    """`without("wandb", ...)`: the environment of a subprocess in which those packages are not
    importable, as if uninstalled: a sitecustomize (first on PYTHONPATH) puts None in
    sys.modules for them, so `import wandb` raises ModuleNotFoundError and find_spec says absent."""

    def env(*modules: str) -> dict[str, str]:
        d = tmp_path / "import-blocker"
        d.mkdir(exist_ok=True)
        (d / "sitecustomize.py").write_text(f"import sys\nfor m in {list(modules)!r}:\n    sys.modules[m] = None\n", encoding="utf-8")
        path = [str(d), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        return dict(os.environ, PYTHONPATH=os.pathsep.join(path))

    return env
