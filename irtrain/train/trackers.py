"""Experiment trackers (`--report-to`): TensorBoard, Trackio, Weights & Biases, MLflow.

Each one is driven through the library's own API, on the main rank only, and gets the
run's metrics under TRL's names (`TRACKER_NAMES`: what SFTTrainer / DPOTrainer log, with
the `train/` / `eval/` prefixes transformers' `rewrite_logs` gives them); metrics.jsonl
keeps irtrain's names. Where each writes by default:

- tensorboard: `torch.utils.tensorboard.SummaryWriter` on OUT/tensorboard (a resumed run
  purges the steps after its checkpoint, so the curves read as one run);
- trackio: `trackio.init/log/finish` into trackio's local store (TRACKIO_DIR, default
  HF_HOME/trackio), project --project, run --run-name;
- wandb: `wandb.init(dir=OUT)`, offline unless WANDB_MODE says otherwise (no network by
  default; `wandb sync OUT/wandb/offline-run-*` uploads it later);
- mlflow: `MlflowClient` on MLFLOW_TRACKING_URI, else a SQLite store OUT/mlflow.db (MLflow 3
  keeps the plain-file store in maintenance mode), experiment --project.

A resumed run (--resume) continues the same tracker run: OUT/trackers.json keeps each
tracker's run id and the last step it was sent. TensorBoard rewrites the steps after the
checkpoint; wandb (`id=..., resume="allow"`; offline, a second offline-run directory with
the same id, which `wandb sync` joins), MLflow (the same run id) and Trackio (the same
name, `resume="allow"`) are not sent the steps they already have (a resumed run replays
them identically). The run config (the resolved flags) is logged with each. A tracker that
fails mid-run is dropped with one warning: metrics.jsonl stays the record.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from irtrain.errors import ConfigError
from irtrain.extras import installed, require

#: metrics.jsonl name -> the name trackers get: TRL 1.16's log keys (SFTTrainer: loss,
#: learning_rate, grad_norm, mean_token_accuracy, num_tokens, entropy; DPOTrainer: rewards/*,
#: logps/*), prefixed train/ as transformers' `rewrite_logs` does. A name not listed follows
#: `tracker_name`'s rule: eval/* unchanged, anything else under train/.
TRACKER_NAMES: dict[str, str] = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "token_accuracy": "train/mean_token_accuracy",
    "tokens": "train/num_tokens",
    "entropy": "train/entropy",
    "epoch": "train/epoch",
    "rewards/chosen": "train/rewards/chosen",
    "rewards/rejected": "train/rewards/rejected",
    "rewards/accuracies": "train/rewards/accuracies",
    "rewards/margins": "train/rewards/margins",
    "eval/pref_loss": "eval/pref_loss",
    "eval/pref_accuracy": "eval/pref_accuracy",
}


def tracker_name(key: str) -> str:
    """The tracker name of a metrics.jsonl key (`TRACKER_NAMES`, else eval/* kept, else train/KEY)."""
    if key in TRACKER_NAMES:
        return TRACKER_NAMES[key]
    return key if key.startswith("eval/") else "train/" + key


def tracked(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a step's metrics under their tracker names (flags such as
    `skipped` and non-finite values stay in metrics.jsonl only)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[tracker_name(k)] = float(v)
    return out


def split_names(values: list[str]) -> list[str]:
    """`["wandb,mlflow", "tensorboard"]` -> the names, in order, once each (flags may repeat or use commas)."""
    out: list[str] = []
    for v in values:
        for n in str(v).split(","):
            n = n.strip()
            if n and n not in out:
                out.append(n)
    return out


# ============================================================================ the trackers
class TensorBoard:
    rewrites = True  # a resumed run purges the steps after its checkpoint, then sends them again

    def __init__(self, run: RunInfo):
        from torch.utils.tensorboard import SummaryWriter

        purge = run.resume_step + 1 if run.resume_step is not None else None
        self.w = SummaryWriter(str(run.out / "tensorboard"), purge_step=purge)
        self.w.add_text("config", "```\n" + json.dumps(run.config, indent=1, default=str) + "\n```")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)

    def close(self, status: str) -> None:
        self.w.close()


class Trackio:
    def __init__(self, run: RunInfo):
        import trackio

        self.t = trackio
        name = run.previous.get("name", run.name)
        trackio.init(project=run.project, name=name, config=run.config, resume="allow" if run.resume_step is not None else "never")
        self.ident = {"name": name}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.t.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.t.finish()


class Wandb:
    def __init__(self, run: RunInfo):
        import wandb

        mode: dict[str, Any] = {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}  # WANDB_MODE (online, ...) wins; else no network
        again: dict[str, Any] = {"id": run.previous["id"], "resume": "allow"} if run.previous.get("id") else {}
        self.run = wandb.init(project=run.project, name=run.name, config=run.config, dir=os.environ.get("WANDB_DIR") or str(run.out),
                              **mode, **again)
        self.ident = {"id": self.run.id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class MLflow:
    def __init__(self, run: RunInfo):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run.out / 'mlflow.db').resolve()}"
        self.c = MlflowClient(tracking_uri=uri)
        exp = self.c.get_experiment_by_name(run.project)
        if exp is not None:
            exp_id = exp.experiment_id
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            exp_id = self.c.create_experiment(run.project)
        else:  # artifacts beside the store, not in the working directory
            exp_id = self.c.create_experiment(run.project, artifact_location=(run.out / "mlartifacts").resolve().as_uri())
        previous = self._previous_run(run)
        if previous is not None:  # resumed: the same run, running again (its params are logged already)
            self.run_id: str = previous
            self.c.update_run(self.run_id, status="RUNNING")
            self.ident = {"run_id": self.run_id, "tracking_uri": uri}
            return
        self.run_id = self.c.create_run(exp_id, run_name=run.name).info.run_id
        self.ident = {"run_id": self.run_id, "tracking_uri": uri}
        params = [Param(k, json.dumps(v, default=str)[:6000] if not isinstance(v, str) else v[:6000]) for k, v in run.config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.c.log_batch(self.run_id, params=params[i:i + 100])

    def _previous_run(self, run: RunInfo) -> str | None:
        """The run id of the run this one resumes, when the store still has it."""
        run_id = run.previous.get("run_id")
        if run_id is None:
            return None
        try:
            self.c.get_run(run_id)
        except Exception:
            print(f"note: --report-to mlflow: the run being resumed ({run_id}) is not in the store; logging to a new run",
                  file=sys.stderr)
            return None
        return run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.c.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        self.c.set_terminated(self.run_id, status)


@dataclass
class RunInfo:
    """What a tracker is opened with."""

    out: Path
    project: str
    name: str
    config: dict[str, Any]
    resume_step: int | None  # the checkpoint's step on --resume, else None
    previous: dict[str, Any] = field(default_factory=dict)  # on --resume, this tracker's entry of OUT/trackers.json


#: --report-to name -> (the package it needs, how it is opened)
TRACKERS: dict[str, tuple[str, Callable[[RunInfo], Any]]] = {
    "tensorboard": ("tensorboard", TensorBoard),
    "trackio": ("trackio", Trackio),
    "wandb": ("wandb", Wandb),
    "mlflow": ("mlflow", MLflow),
}
REPORT_TO = ("none", *TRACKERS)


# ============================================================================ choosing and opening
def resolve_report_to(cfg: Any, *, note: bool = True) -> list[str]:
    """The trackers of a run, checked before anything is written: --report-to's names (each
    one imported: a missing package is a one-line error naming the pip command), or by
    default TensorBoard when it is installed (a note when it is not, and --tensorboard is on)."""
    names = split_names(cfg.report_to)
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise ConfigError(f"--report-to {bad[0]!r} is not one of: {', '.join(REPORT_TO)}")
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"--report-to none with other trackers ({', '.join(n for n in names if n != 'none')}): give one or the other")
        return []
    if not names:
        if not cfg.tensorboard:
            return []
        if installed("tensorboard"):
            return ["tensorboard"]
        if note:
            print("note: tensorboard is not installed, so metrics go to metrics.jsonl only "
                  "(pip install tensorboard, or choose a tracker with --report-to)", file=sys.stderr)
        return []
    if "tensorboard" in names and not cfg.tensorboard:
        raise ConfigError("--report-to tensorboard and --no-tensorboard: give one or the other")
    for n in names:
        require(TRACKERS[n][0], f"--report-to {n}")
    return names


STATE_FILE = "trackers.json"


class Trackers:
    """The open trackers of a run (none off the main rank): `log` each step, `close` once.
    OUT/trackers.json records each one's run and last step sent (see the module docstring)."""

    def __init__(self, names: list[str], run: RunInfo):
        self.path = run.out / STATE_FILE
        saved = self._read() if run.resume_step is not None else {}
        self.state: dict[str, dict[str, Any]] = {}
        self.open: dict[str, Any] = {}
        try:
            for n in names:
                prev = saved.get(n, {})
                t = TRACKERS[n][1](replace(run, previous=prev))
                self.open[n] = t
                self.state[n] = {**getattr(t, "ident", {}), "last_step": prev.get("last_step")}
        except BaseException:
            self.close("FAILED")
            raise
        if self.open:
            self._save()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # none yet, or damaged: new tracker runs (metrics.jsonl is the record)
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        """Rewritten whole (temporary name, then rename); not fsynced: losing it only means new runs."""
        from irtrain.durable import temp_name

        tmp = temp_name(self.path)
        tmp.write_text(json.dumps(self.state), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = tracked(metrics)
        if not values or not self.open:
            return
        for n, t in list(self.open.items()):
            last = self.state[n].get("last_step")
            if last is not None and step <= last and not getattr(t, "rewrites", False):
                continue  # the tracker has this step from before the resume
            try:
                t.log(step, values)
            except Exception as e:  # a tracker's failure does not stop training: metrics.jsonl is the record
                print(f"warning: --report-to {n} failed at step {step} and is dropped for the rest of the run: {e}", file=sys.stderr)
                self.open.pop(n)
                continue
            self.state[n]["last_step"] = max(step, last or step)
        try:
            self._save()
        except OSError as e:
            print(f"warning: could not write {self.path}: {e}", file=sys.stderr)

    def close(self, status: str = "FINISHED") -> None:
        """`status`: FINISHED, KILLED (a signal) or FAILED, as MLflow names them."""
        for n, t in list(self.open.items()):
            try:
                t.close(status)
            except Exception as e:
                print(f"warning: closing --report-to {n} failed: {e}", file=sys.stderr)
        self.open.clear()
