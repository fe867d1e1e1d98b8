"""irtrain.train.trackers: `--report-to`. Each tracker, offline and through the real library,
receives the run's metrics under TRL's names, read back from its own local store (TensorBoard
event files, the wandb offline run file, MLflow's store, Trackio's SQLite store) and compared
with metrics.jsonl; the names are TRL's (checked against TRL's and transformers' source);
the README's table is the code's; a missing tracker is a one-line error."""
from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from irtrain.config import SFTConfig, load_config
from irtrain.errors import ConfigError
from irtrain.train.metrics import read_metrics
from irtrain.train.trackers import TRACKER_NAMES, resolve_report_to, tracked, tracker_name

import test_train_common as common

one_torch_thread, task_shards, data_dir, pref_dir = common.one_torch_thread, common.task_shards, common.data_dir, common.pref_dir

README = Path(__file__).resolve().parents[1] / "README.md"
STEPS = 3


def irtrain(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "irtrain.cli.main", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=900)


def offline_env(tmp: Path) -> dict[str, str]:
    """No tracker settings from the caller's environment; Trackio's store in `tmp`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    return dict(env, TRACKIO_DIR=str(tmp / "trackio"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


# --------------------------------------------------------------------------- one sft run, four trackers
@pytest.fixture(scope="module")
def run(tiny_model_dir, data_dir, pref_dir, tmp_path_factory):
    """A tiny sft run logging to all four trackers at once (comma-separated and repeated flags),
    with held-out eval at steps 0 and 3."""
    tmp = tmp_path_factory.mktemp("trackers")
    out = tmp / "run"
    r = irtrain("sft", "--model", tiny_model_dir, "--out", out, "--lr", "1e-3", "--global-batch", "8", "--micro-batch", "4",
                "--max-steps", STEPS, "--warmup-ratio", "0", "--no-kl-metrics", "--eval-pairs", pref_dir,
                "--report-to", "tensorboard,trackio", "--report-to", "wandb", "--report-to", "mlflow", "--run-name", "tiny-sft",
                data_dir, env=offline_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(out)
    assert len(series(rows, "loss")) == STEPS and len(series(rows, "eval/pref_accuracy")) == 2
    return {"out": out, "tmp": tmp, "rows": rows}


#: metrics.jsonl keys compared on every tracker (loss, lr, token accuracy, tokens, held-out eval)
COMPARED = ("loss", "lr", "token_accuracy", "tokens", "grad_norm", "eval/pref_loss", "eval/pref_accuracy")


def check_same(rows: list[dict], got: dict[str, list[tuple[int, float]]], rel: float = 0.0) -> None:
    for key in COMPARED:
        want = series(rows, key)
        assert want, key
        have = sorted(got[tracker_name(key)])
        assert [s for s, _ in have] == [s for s, _ in want], key
        assert [v for _, v in have] == pytest.approx([v for _, v in want], rel=rel, abs=0), key


def test_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run["out"] / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "train/learning_rate" in tags and "loss" not in tags and "lr" not in tags
    check_same(run["rows"], {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}, rel=1e-6)  # float32 in the event file
    assert any(t.startswith("config") for t in acc.Tags()["tensors"])  # the run config, as text


def wandb_records(path: Path):
    """The records of a wandb run file (`run-ID.wandb`): LevelDB's log format (32 KiB blocks,
    7-byte chunk headers: crc32, length, type) after wandb's 7-byte header, each record a
    protobuf `wandb_internal_pb2.Record` (wandb >= 0.19 writes it from its Go core, and no
    longer ships a Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    i, block, buf = 7, 32768, b""
    while i + 7 <= len(data):
        if block - i % block < 7:  # the rest of a block too short for a header is padding
            i += block - i % block
            continue
        _, n, kind = struct.unpack("<IHB", data[i:i + 7])
        chunk, i = data[i + 7:i + 7 + n], i + 7 + n
        if kind == 0:  # zero padding up to the end of the block
            i += (block - i % block) % block
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb(run):
    files = list((run["out"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "an offline run under OUT/wandb"
    got: dict[str, list[tuple[int, float]]] = {}
    run_rec = None
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_rec = rec.run
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    got.setdefault(k, []).append((items["_step"], v))
    check_same(run["rows"], got)  # exact: wandb keeps the JSON of each double
    assert run_rec is not None and run_rec.display_name == "tiny-sft" and run_rec.project == "irtrain"
    config = {u.key: json.loads(u.value_json) for u in run_rec.config.update}
    assert config["lr"] == 1e-3 and config["max_steps"] == STEPS


def test_mlflow(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run['out'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("irtrain")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_name == "tiny-sft" and r.info.status == "FINISHED"
    assert r.data.params["lr"] == "0.001" and r.data.params["max_steps"] == str(STEPS)
    got = {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)] for k in r.data.metrics}
    check_same(run["rows"], got)
    assert not (Path.cwd() / "mlruns").exists() and not (Path.cwd() / "mlartifacts").exists()


def test_trackio(run):
    script = ("import json\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
              "print(json.dumps({'logs': S.get_logs('irtrain', 'tiny-sft'), 'config': S.get_run_config('irtrain', 'tiny-sft')}))")
    r = subprocess.run([sys.executable, "-c", script], env=offline_env(run["tmp"]), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stored = json.loads(r.stdout.strip().splitlines()[-1])
    got: dict[str, list[tuple[int, float]]] = {}
    for row in stored["logs"]:
        for k, v in row.items():
            if k not in ("step", "timestamp"):
                got.setdefault(k, []).append((row["step"], v))
    check_same(run["rows"], got)
    assert stored["config"]["lr"] == 1e-3


def test_dpo_rewards_names(tiny_model_dir, pref_dir, tmp_path):
    """A dpo run's rewards/* reach TensorBoard as TRL's train/rewards/* (same values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from irtrain.cli.main import app

    out = tmp_path / "dpo"
    r = CliRunner().invoke(app, ["dpo", "--model", str(tiny_model_dir), "--out", str(out), "--global-batch", "8", "--micro-batch", "4",
                                 "--max-steps", "2", "--no-kl-metrics", "--report-to", "tensorboard", "--reference-dir",
                                 str(tmp_path / "refs"), str(pref_dir)])
    assert r.exit_code == 0, r.output
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    rows = read_metrics(out)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "loss"):
        want = series(rows, key)
        assert len(want) == 2, key
        assert [(e.step, e.value) for e in acc.Scalars("train/" + key)] == [(s, pytest.approx(v, rel=1e-6)) for s, v in want]


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    """A resumed run rewrites steps 3.. in TensorBoard; the reader shows one curve, not two."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from irtrain.train.trackers import RunInfo, Trackers

    def run(resume_step, steps, loss):
        t = Trackers(["tensorboard"], RunInfo(out=tmp_path, project="p", name="n", config={"lr": 1.0}, resume_step=resume_step))
        for s in steps:
            t.log(s, {"loss": loss + s})
        t.close()

    run(None, [1, 2, 3, 4], 0.0)
    run(2, [3, 4, 5], 10.0)  # resumed from the checkpoint of step 2
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path, monkeypatch):
    """Killed after step 4, resumed from the checkpoint of step 2: wandb (same id), MLflow (same
    run) and Trackio (same run) hold steps 1..6 once each, the first attempt's values for the
    replayed steps 3 and 4 (the resume replays them identically); OUT/trackers.json says so."""
    from mlflow.tracking import MlflowClient

    from irtrain.train.trackers import STATE_FILE, RunInfo, Trackers

    for k in [k for k in os.environ if k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    names = ["wandb", "mlflow", "trackio"]

    def attempt(resume_step, steps, status):
        t = Trackers(names, RunInfo(out=tmp_path, project="p", name="n", config={"lr": 1.0}, resume_step=resume_step))
        for s in steps:
            t.log(s, {"loss": float(s)})
        t.close(status)

    attempt(None, [1, 2, 3, 4], "KILLED")
    first = json.loads((tmp_path / STATE_FILE).read_text())
    assert all(first[n]["last_step"] == 4 for n in names)
    attempt(2, [3, 4, 5, 6], "FINISHED")
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["wandb"]["id"] == first["wandb"]["id"] and state["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    want = [(s, float(s)) for s in range(1, 7)]
    # wandb: two offline runs with one id, together steps 1..6 once
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1
    got = []
    for f in files:
        for rec in wandb_records(f):
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                got.append((items["_step"], items["train/loss"]))
    assert sorted(got) == want
    # MLflow: one run, finished, each step once
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("p").experiment_id])
    assert r.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss")) == want
    # Trackio: one run
    script = ("import json\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
              "print(json.dumps([S.get_runs('p'), S.get_logs('p', 'n')]))")
    out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    runs, logs = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs == ["n"]
    assert sorted((row["step"], row["train/loss"]) for row in logs) == want


# --------------------------------------------------------------------------- names
def test_names_are_trls():
    """Each renamed metric is a key TRL 1.16's SFTTrainer / DPOTrainer logs, and the tracker
    name is what transformers' `rewrite_logs` makes of it (train/KEY, eval_KEY -> eval/KEY)."""
    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.sft_trainer as sft
    from transformers.integrations.integration_utils import rewrite_logs

    trl_source = Path(sft.__file__).read_text() + Path(dpo.__file__).read_text()
    for theirs in TRACKER_NAMES.values():
        prefix, key = theirs.split("/", 1)
        if prefix == "eval":
            assert rewrite_logs({"eval_" + key: 0}) == {theirs: 0}
            continue
        assert rewrite_logs({key: 0}) == {theirs: 0}
        if key not in ("loss", "learning_rate", "grad_norm", "epoch"):  # logged by transformers' Trainer itself
            assert f'"{key}"' in trl_source, f"{key} is not a TRL log key"
    assert tracker_name("value/s0") == "train/value/s0" and tracker_name("eval/logp_accuracy") == "eval/logp_accuracy"
    assert tracked({"loss": 1, "skipped": True, "grad_norm": float("nan"), "lr": 2e-5}) == {"train/loss": 1.0, "train/learning_rate": 2e-5}


def test_readme_table_is_the_code():
    """The README table under "Trackers: `--report-to`" lists TRACKER_NAMES, one row each, in the code's order."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("metrics.jsonl | trackers (TRL)"):]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", section.split("\n\n", 1)[0], flags=re.M)
    assert rows == list(TRACKER_NAMES.items())


# --------------------------------------------------------------------------- choosing
def test_report_to_config(tmp_path):
    cfg = load_config(SFTConfig, None, {"report_to": ["wandb,mlflow", "tensorboard", "wandb"]})
    assert resolve_report_to(cfg) == ["wandb", "mlflow", "tensorboard"]
    toml = tmp_path / "c.toml"
    toml.write_text('report_to = ["trackio", "tensorboard"]\n')
    assert resolve_report_to(load_config(SFTConfig, toml)) == ["trackio", "tensorboard"]
    assert resolve_report_to(load_config(SFTConfig, None, {"report_to": ["none"]})) == []
    assert resolve_report_to(load_config(SFTConfig)) == ["tensorboard"]  # the default, installed here
    assert resolve_report_to(load_config(SFTConfig, None, {"tensorboard": False})) == []
    with pytest.raises(ConfigError, match="not one of: none, tensorboard, trackio, wandb, mlflow"):
        load_config(SFTConfig, None, {"report_to": ["wandb,comet"]})
    with pytest.raises(ConfigError, match="none with other trackers"):
        resolve_report_to(load_config(SFTConfig, None, {"report_to": ["none,wandb"]}))
    with pytest.raises(ConfigError, match="--no-tensorboard"):
        resolve_report_to(load_config(SFTConfig, None, {"report_to": ["tensorboard"], "tensorboard": False}))


def test_default_without_tensorboard_says_so(without, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    r = irtrain("sft", "--model", tiny_model_dir, "--out", out, "--global-batch", "4", "--micro-batch", "4", "--max-steps", "1",
                "--no-kl-metrics", data_dir, env=without("tensorboard"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: tensorboard is not installed, so metrics go to metrics.jsonl only" in r.stderr
    assert not (out / "tensorboard").exists() and len(read_metrics(out)) == 1


# --------------------------------------------------------------------------- SIGTERM
def test_sigterm_closes_trackers(tiny_model_dir, data_dir, tmp_path):
    """SIGTERM mid-run: the checkpoint is written, TensorBoard holds every logged step, and the
    MLflow run is closed as KILLED (not left RUNNING)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "irtrain.cli.main", "sft", "--model", str(tiny_model_dir), "--out", str(out), "--global-batch", "4",
           "--micro-batch", "4", "--max-steps", "500", "--no-kl-metrics", "--report-to", "tensorboard,mlflow", str(data_dir)]
    p = subprocess.Popen(cmd, env=offline_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert p.poll() is None and time.time() < deadline, "the run ended or stalled before its second step"
            time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1 and "interrupted by signal" in err, err[-2000:]
    rows = read_metrics(out)
    assert 2 <= len(rows) < 500

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("irtrain").experiment_id])
    assert r.info.status == "KILLED" and r.info.run_name == "run"  # the default name: --out's
    assert [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss")] == series(rows, "loss")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [s for s, _ in series(rows, "loss")]
