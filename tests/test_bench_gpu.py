"""bench/gpu.py, the device check: its CPU dry run (the same code path as on the GPU, tiny
models: setup, irtrain and TRL workers, the correctness line, the JSON) and the BENCHMARKS.md
section it renders. One model slot and both tasks keep it to six worker processes."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu-dry")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--models", "llama1b", "--work", str(d / "work"),
                           "--json", str(d / "gpu.json"), "--markdown", str(d / "gpu.md")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((d / "gpu.json").read_text()), (d / "gpu.md").read_text(), d


def test_dry_run_measures_every_task_and_side(dry):
    payload, _, _ = dry
    assert payload["dry_run"] and payload["device"]["type"] == "cpu" and payload["peak_tflops"] is None
    sides = {"irtrain", "trl"} if payload["trl"]["available"] else {"irtrain"}  # TRL is a bench extra
    assert {(r["model"], r["task"], r["side"]) for r in payload["runs"]} == {("llama1b", t, s) for t in ("sft", "dpo") for s in sides}
    steps = payload["settings"]["sft"]["steps"]
    for r in payload["runs"]:
        assert r["status"] == "ok", r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_mb"] > 0 and r["mfu"] is None, r
        assert r["steps"] == steps and r["measured_steps"] == steps - payload["settings"]["warmup"], r
        assert len(r["losses"]) == steps and all(math.isfinite(x) for x in r["losses"]) and r["final_loss"] == r["losses"][-1]
        if r["side"] == "irtrain":  # irtrain's own packed attention and the chunked head ran
            assert r["attention"].get("attention/sdpa_per_document") and r["attention"].get("head/fused"), r
        else:  # both sides trained on the same token ids and trained positions
            assert r["data_check"].startswith("identical"), r
    assert payload["models"]["llama1b"]["params"] > 0 and not payload["skipped"]
    if "trl" in sides:
        assert {(q["task"], q["vs"]) for q in payload["ratios"]} == {("sft", "trl"), ("dpo", "trl")}
    c = payload["correctness"]
    assert c["status"] == "ok" and c["ok"] and c["device"] == "cpu"
    assert len(c["losses_cpu"]) == len(c["losses_device"]) == 5
    assert c["losses_cpu"] == c["losses_device"]  # fp32 on the CPU both times: the same numbers


def test_dry_run_renders_the_section(dry):
    payload, md, d = dry
    gpu = bench_gpu()
    assert md.strip() == gpu.render_section(payload).strip()
    assert md.startswith("## GPU (H200)") and "A dry run on the CPU" in md and "Correctness (OK)" in md
    assert "| llama1b | sft | irtrain |" in md and "| llama1b | dpo | irtrain |" in md
    # a dry run's CPU figures are refused as the GPU section of BENCHMARKS.md
    target = d / "BENCHMARKS.md"
    target.write_text("x\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--render", str(d / "gpu.json"), "--write-benchmarks", str(target)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "dry run" in proc.stderr and target.read_text() == "x\n"


def test_replace_section_touches_only_the_section():
    gpu = bench_gpu()
    text = "# Benchmarks\n\n<!-- section:gpu -->\n## GPU\nold\n<!-- /section:gpu -->\n\n## after\n"
    new = gpu.replace_section(text, gpu.render_section(None))
    assert "old" not in new and new.startswith("# Benchmarks\n\n<!-- section:gpu -->\n## GPU (H200)\n")
    assert new.endswith("<!-- /section:gpu -->\n\n## after\n")
    assert gpu.replace_section(new, gpu.render_section(None)) == new
    assert gpu.replace_section("# B\n", "## GPU (H200)\n").endswith("<!-- section:gpu -->\n## GPU (H200)\n<!-- /section:gpu -->\n")


def test_benchmarks_md_holds_gpu_figures_or_says_they_are_pending():
    gpu = bench_gpu()
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    start, end = "<!-- section:gpu -->", "<!-- /section:gpu -->"
    section = text[text.index(start) + len(start):text.index(end)].strip()
    assert section.startswith("## GPU (H200)")
    assert section == gpu.render_section(None).strip() or ("Measured by `bench/gpu.py`" in section and "A dry run" not in section)


def test_the_1b_llama_and_the_window():
    gpu = bench_gpu()
    assert gpu._param_count(gpu.LLAMA_1B) == 1_235_814_400  # Llama-3.2-1B, tied embedding once
    steps = [(0, 10.0, 0.0), (1, 11.0, 100.0), (2, 11.5, 250.0), (3, 12.0, 400.0)]
    assert gpu._window(steps, 1) == (300.0, 1.0, 2)  # the first step left out
    assert gpu._window(steps, 0) == (400.0, 2.0, 3)
    assert gpu._window(steps, 9) == (150.0, 0.5, 1)  # at least the last step is measured
