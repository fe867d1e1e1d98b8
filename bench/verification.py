"""The cost of verifying what is read (issue 13): shards against manifest.json, checkpoints
against the checksums in trainer_state.json, next to what the same step costs anyway.

    python bench/verification.py [--n 20000] [--work /tmp/irtrain-bench-verify]

1. The corpus of bench/prepare.py (20,000 conversations, ~26 M tokens), prepared once.
2. Opening its shards as training does (`ShardSet`), with and without verification, each in
   a fresh process (the in-process cache of verified files is then cold), and a prepare
   rerun that is a cache hit (it verifies the output before reusing it).
3. A checkpoint of the real model (SmolLM2-135M, fp32; `scripts/get-real-model`) written by
   one `irtrain sft` step: `verify_checkpoint` against what a resume reads anyway
   (`from_pretrained` of the weights and `torch.load` of the optimizer state).
Prints one JSON line per measurement and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prepare import build_tokenizer, make_corpus, word_list  # noqa: E402  (bench/prepare.py)


def child(code: str, *args: str) -> float:
    """Seconds reported by `code` run in a fresh interpreter (it prints them last)."""
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


OPEN = """
import sys, time
from irtrain.shards import ShardSet
t = time.perf_counter(); s = ShardSet(sys.argv[1], verify=sys.argv[2] == "1"); n = len(s)
print(time.perf_counter() - t)
"""

VERIFY_CKPT = """
import sys, time
from pathlib import Path
from irtrain.train.checkpoint import verify_checkpoint
t = time.perf_counter(); assert verify_checkpoint(Path(sys.argv[1])) is None
print(time.perf_counter() - t)
"""

LOAD_CKPT = """
import sys, time, torch
from transformers import AutoModelForCausalLM
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
sum(float(p.detach().sum()) for p in m.parameters())  # touch every weight (from_pretrained maps the file lazily)
o = torch.load(sys.argv[1] + "/optimizer.pt", weights_only=True)
print(time.perf_counter() - t)
"""


def best(f, repeats: int) -> float:
    return min(f() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="conversations in the corpus")
    ap.add_argument("--work", default="/tmp/irtrain-bench-verify")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    tok = work / "tokenizer"
    build_tokenizer(tok)
    corpus = work / "corpus.jsonl"
    if not corpus.is_file():
        make_corpus(corpus, args.n, word_list(tok), seed=0)
    shards = work / "shards"
    cmd = ["irtrain", "prepare", str(corpus), "--tokenizer", str(tok), "--out", str(shards), "--max-len", "4096"]
    if not shards.is_dir():
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        rows.append(("prepare (writes and hashes the shards)", time.perf_counter() - t, None))
    manifest = json.loads((shards / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["shards"])
    size = sum(p.stat().st_size for p in shards.rglob("*.bin"))

    plain = best(lambda: child(OPEN, str(shards), "0"), args.repeats)
    verified = best(lambda: child(OPEN, str(shards), "1"), args.repeats)
    rows.append((f"open the shards, {tokens / 1e6:.1f} M tokens, {size / 2**20:.0f} MiB: without verification", plain, None))
    rows.append(("... with verification (sha256 of every file)", verified, verified - plain))

    def rerun() -> float:
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - t
    rows.append(("prepare rerun, a cache hit (verifies the output)", best(rerun, args.repeats), verified - plain))

    model = subprocess.run([sys.executable, str(HERE.parent / "scripts" / "get-real-model")], check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    ckpt_run = work / "ckpt"
    if not (ckpt_run / "checkpoint-0000001").is_dir():
        small = work / "small-shards"
        if not small.is_dir():
            chat = work / "chat.jsonl"
            chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                             {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n"
                                    for i in range(8)))
            subprocess.run(["irtrain", "prepare", str(chat), "--tokenizer", model, "--out", str(small)], check=True, capture_output=True)
        subprocess.run(["irtrain", "sft", str(small), "--model", model, "--out", str(ckpt_run), "--max-steps", "1", "--global-batch", "2",
                        "--no-tensorboard", "--no-kl-metrics"], check=True, capture_output=True)
    ckpt = ckpt_run / "checkpoint-0000001"
    ck_size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    load = best(lambda: child(LOAD_CKPT, str(ckpt)), args.repeats)
    check = best(lambda: child(VERIFY_CKPT, str(ckpt)), args.repeats)
    rows.append((f"resume: load a SmolLM2-135M checkpoint ({ck_size / 2**20:.0f} MiB: weights + AdamW state)", load, None))
    rows.append(("... verify it first (sha256 of every file)", check, check))

    for what, seconds, extra in rows:
        print(json.dumps({"what": what, "seconds": round(seconds, 3), "verification_s": None if extra is None else round(extra, 3)}))
    print("\n| step | seconds | of which verification |\n|---|---|---|")
    for what, seconds, extra in rows:
        print(f"| {what} | {seconds:.2f} | {'' if extra is None else f'{extra:.2f}'} |")


if __name__ == "__main__":
    main()
