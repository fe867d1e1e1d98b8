"""What a person sees on stderr, in a terminal or in a log file (main rank only).

- `Progress`: the training display. In a terminal, two lines redrawn in place (any width):

      sft ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 23/40 0:00:14 eta 0:00:10 1.64 it/s 1.5k tok/s
      loss 4.37  lr 5.0e-04  grad_norm 2.121  token_acc 0.4596  eval/pref_acc 0.6739

  The first line always holds the step count, elapsed time, ETA and rate; the bar takes the
  columns left over. The second holds the objective's headline metrics (`Objective.headline`)
  in order, as many as fit whole: the rest are dropped, never cut (eval values stay until the
  next evaluation). Not a terminal (a log file, SLURM, `| tee`): one plain line per logged
  step, with the metrics' full names,

      sft step 20/40 | 0:00:06 elapsed | eta 0:00:06 | 3.50 it/s 3.2k tok/s | loss 4.517 lr 6.3e-04 ...

  and at the end of every run, terminal or not, `Progress.summary`.
- `Phase`: any other long phase (reference pass, score, rank): a bar in a terminal; else a
  line every `every` seconds; in both, one closing line with the count and the time.
- `quiet_transformers()`: transformers' own progress bars and warnings off (they would break
  the display, and say nothing the display does not), and DeepSpeed's "Setting accelerator to
  CPU" warning on stdout (`settle_deepspeed_accelerator`).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

#: a metric's short name in the terminal's metrics line (log lines use the full names)
SHORT = {"token_accuracy": "token_acc", "rewards/accuracies": "rewards/acc", "rewards/margins": "rewards/margin",
         "eval/pref_accuracy": "eval/pref_acc", "eval/rewards/accuracies": "eval/rewards/acc",
         "eval/rewards/margins": "eval/rewards/margin"}
MIN_BAR = 10  # columns; narrower, the bar is left out (the counts stay)


def stderr_console(**kwargs: Any) -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, **kwargs)


#: packages through which DeepSpeed finds an accelerator other than CUDA and XPU
OTHER_ACCELERATORS = ("torch_npu", "torch_sdaa", "habana_frameworks", "torch_mlu", "torch_supa", "torch_xmlir")


def settle_deepspeed_accelerator() -> None:
    """Where DeepSpeed would fall back to the CPU, say so first (`DS_ACCELERATOR=cpu`, its own
    override). Without it, the first import of DeepSpeed (transformers' `save_pretrained`
    imports it through accelerate, at every first checkpoint) prints a warning on stdout that
    it found no GPU. Nothing changes where a user set DS_ACCELERATOR or where DeepSpeed could
    find CUDA, XPU, MPS or another accelerator's package."""
    import importlib.util
    import os

    if "DS_ACCELERATOR" in os.environ or any(importlib.util.find_spec(m) for m in OTHER_ACCELERATORS):
        return
    import torch

    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    if (torch.cuda.is_available() or (xpu is not None and xpu.is_available())
            or (mps is not None and mps.is_available())):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


class quiet_transformers:
    """transformers' progress bars ("Loading weights", "Writing model shards") and warnings
    off. Called, for the rest of the process; as a context manager, restored on exit."""

    def __init__(self) -> None:
        self._old: tuple[int, bool] | None = None
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:  # pragma: no cover - transformers is a dependency
            return
        self._old = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        settle_deepspeed_accelerator()

    def __enter__(self) -> quiet_transformers:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is None:
            return
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._old[0])
        if self._old[1]:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- formatting
def duration(s: float | None) -> str:
    """h:mm:ss (`-:--:--` when unknown)."""
    if s is None or not math.isfinite(s):
        return "-:--:--"
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rate(seconds_per_step: float | None, unit: str = "it") -> str:
    """`2.50 it/s` at one step a second or more, `3.2 s/it` below."""
    if not seconds_per_step or not math.isfinite(seconds_per_step):
        return f"-- {unit}/s"
    if seconds_per_step <= 1:
        return f"{1 / seconds_per_step:.2f} {unit}/s"
    return f"{seconds_per_step:.1f} s/{unit}"


def count(n: float) -> str:
    """1234 -> `1.2k`, 3.4e6 -> `3.4M`."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def value(name: str, v: Any) -> str:
    """One metric's value: lr as `2.0e-05`, everything else to 4 significant digits."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if name.endswith("lr"):
        return f"{v:.1e}"
    return f"{v:.4g}"


# --------------------------------------------------------------------------- training
class Progress:
    """The training display (see the module docstring): `update` after every step (`line`:
    this step is logged, for the plain lines), `note` for values of no step (the evaluation
    before the first), `saving` around a checkpoint, `close`, then `summary`."""

    def __init__(self, total: int, start: int, *, enabled: bool, description: str = "train",
                 headline: tuple[str, ...] = ("loss", "lr", "grad_norm"), console: Any = None):
        self.enabled, self.total, self.start, self.description, self.headline = enabled, total, start, description, headline
        self.step = start
        self.latest: dict[str, Any] = {}                  # the newest value of every metric seen
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.status: str | None = None
        self._origin: tuple[float, int, float] | None = None  # (time, step, tokens) before the first step timed
        self._last = time.perf_counter()                   # time of the last update
        self._run_start: float | None = None               # perf_counter time the run (resumed: its first part) began
        self._live: Any = None
        if not enabled:
            return
        self.console = console or stderr_console()
        self.terminal = bool(self.console.is_terminal)
        if self.terminal:
            from rich.live import Live

            # stdout goes above the display only when it is on the terminal too (never into a file it was sent to)
            self._live = Live(_Frame(self), console=self.console, refresh_per_second=4, redirect_stdout=_on_terminal(sys.stdout))
            self._live.start()

    # ---------------------------------------------------------------- input
    def note(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Remember `metrics` (of `step`) for the display and the summary; returns them."""
        for k, v in metrics.items():
            self.latest[k] = v
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.history.setdefault(k, []).append((step, float(v)))
        return metrics

    def update(self, step: int, metrics: dict[str, Any], *, line: bool = True) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._origin is None:  # timed from the start of the first step: loading is not a step
            dt, tokens = float(metrics.get("step_time_s", 0.0)), float(metrics.get("tokens", 0))
            self._origin = (now - dt, step - 1, tokens - float(metrics.get("tokens_per_s", 0.0)) * dt)
            self._run_start = now - float(metrics.get("elapsed_s", dt))
        self.step = step
        self._last = now
        self.note(step, metrics)
        if not self.terminal and line:
            print(self.plain_line(), file=sys.stderr, flush=True)

    def saving(self, name: str) -> _Status:
        """`with progress.saving("checkpoint-0000012"):` the status while it is written."""
        return _Status(self, f"saving {name}…")

    # ---------------------------------------------------------------- derived
    def seconds_per_step(self) -> float | None:
        if self._origin is None or self.step <= self._origin[1]:
            return None
        return (self._last - self._origin[0]) / (self.step - self._origin[1])

    def tokens_per_s(self) -> float | None:
        if self._origin is None or self._last <= self._origin[0] or "tokens" not in self.latest:
            return None
        return (float(self.latest["tokens"]) - self._origin[2]) / (self._last - self._origin[0])

    def elapsed(self) -> float:
        """The run's time (a resumed run's earlier time included), counting on between steps."""
        return time.perf_counter() - self._run_start if self._run_start is not None else 0.0

    def eta(self) -> float | None:
        per = self.seconds_per_step()
        if per is None:
            return None
        return max(0.0, per * (self.total - self.step) - (time.perf_counter() - self._last))

    def _rates(self) -> str:
        tps = self.tokens_per_s()
        return rate(self.seconds_per_step()) + (f" {count(tps)} tok/s" if tps is not None else "")

    def _metrics(self, short: bool) -> list[str]:
        return [f"{SHORT.get(k, k) if short else k} {value(k, self.latest[k])}" for k in self.headline if k in self.latest]

    # ---------------------------------------------------------------- output
    def plain_line(self) -> str:
        parts = [f"{self.description} step {self.step}/{self.total}", f"{duration(self.elapsed())} elapsed",
                 f"eta {duration(self.eta())}", self._rates()]
        if self.status:
            parts.append(self.status)
        metrics = self._metrics(short=False)
        if metrics:
            parts.append(" ".join(metrics))
        return " | ".join(parts)

    def frame(self, width: int) -> list[Any]:
        """The terminal's two lines at `width` columns (rich Texts)."""
        from rich.text import Text

        right = f" {self.step}/{self.total} {duration(self.elapsed())} eta {duration(self.eta())} {self._rates()}"
        head = Text(self.description, style="bold")
        room = width - len(self.description) - 1 - len(right)
        if room >= MIN_BAR:
            done = round(room * min(1.0, self.step / self.total)) if self.total else room
            head.append(" ")
            head.append("━" * done, style="magenta")
            head.append("━" * (room - done), style="grey23")
        head.append(right)
        head.truncate(width)  # only below ~45 columns, where nothing fits
        if self.status:
            return [head, Text(self.status[:width], style="yellow")]
        line = ""
        for part in self._metrics(short=True):
            if len(line) + len(part) + (2 if line else 0) > width:
                break  # dropped, with the rest: never cut
            line += ("  " if line else "") + part
        return [head, Text(line)]

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def summary(self, out: Path, last_checkpoint: Path | None, *, stopped: str | None = None) -> None:
        """The end of a run, on stderr: steps, time, tokens/s, final and best metrics, the last
        checkpoint and the outputs in `out`."""
        self.close()
        if not self.enabled:
            return
        end = f"stopped at step {self.step}/{self.total} ({stopped})" if stopped else f"{self.step}/{self.total} steps"
        tokens = f" ({count(self.latest['tokens'])} tokens)" if "tokens" in self.latest else ""
        lines = [f"{self.description} done: {end} in {duration(self.elapsed())}; steps at {self._rates()}{tokens}"]
        final = self._metrics(short=False)
        if final:
            lines.append("  final:  " + "  ".join(final))
        best = self.best()
        if best:
            lines.append("  best:   " + "  ".join(f"{k} {value(k, v)} (step {s})" for k, (s, v) in best.items()))
        lines.append(f"  last checkpoint: {last_checkpoint if last_checkpoint else 'none'}")
        lines.append(f"  outputs in {out}: " + outputs(out))
        print("\n".join(lines), file=sys.stderr, flush=True)

    def best(self) -> dict[str, tuple[int, float]]:
        """(step, value) of the best value of each headline eval metric (lowest loss, highest
        other), or, without eval metrics, of the training loss."""
        keys = [k for k in self.headline if k.startswith("eval/") and k in self.history] or ["loss"]
        out = {}
        for k in keys:
            seen = self.history.get(k)
            if seen:
                pick = min if "loss" in k else max
                s, v = pick(seen, key=lambda sv: sv[1])
                out[k] = (s, v)
        return out


def outputs(out: Path) -> str:
    """What a run left in `out`: its files and folders, checkpoints counted."""
    if not out.is_dir():
        return "nothing"
    names, ckpts = [], 0
    for p in sorted(out.iterdir()):
        if p.name.startswith("."):
            continue
        if p.name.startswith("checkpoint-"):
            ckpts += 1
        else:
            names.append(p.name + ("/" if p.is_dir() else ""))
    if ckpts:
        names.append(f"{ckpts} checkpoint{'s' if ckpts > 1 else ''}")
    return ", ".join(names) if names else "nothing"


def _on_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Frame:
    """A rich renderable drawing `Progress.frame` at the console's width."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        yield Text("\n").join(self.progress.frame(options.max_width))


class _Status:
    def __init__(self, progress: Progress, text: str):
        self.progress, self.text = progress, text

    def __enter__(self) -> None:
        p = self.progress
        if not p.enabled:
            return
        p.status = self.text
        if p._live is not None:
            p._live.refresh()
        else:
            print(f"{p.description} step {p.step}/{p.total} | {self.text}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        self.progress.status = None


# --------------------------------------------------------------------------- other phases
class Phase:
    """Progress of a long phase that is not training steps: `with Phase("reference pass",
    total=n, unit="rows") as p: ... p.advance(k)`. In a terminal a bar (gone at the end); not
    in one, a line every `every` seconds; in both a closing line (`quiet_below`: not for a
    phase shorter than that many seconds)."""

    def __init__(self, label: str, total: int, *, unit: str = "rows", enabled: bool = True, every: float = 30.0,
                 quiet_below: float = 0.0, console: Any = None):
        self.label, self.total, self.unit, self.enabled, self.every, self.quiet_below = label, total, unit, enabled, every, quiet_below
        self.done = 0
        self._bar: Any = None
        self._task: Any = None
        self.console = (console or stderr_console()) if enabled else None

    def __enter__(self) -> Phase:
        self._t0 = self._said = time.perf_counter()
        if self.console is not None and self.console.is_terminal:
            from rich.markup import escape
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(f"[bold]{escape(self.label)}[/]"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn(self.unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     console=self.console, transient=True, redirect_stdout=_on_terminal(sys.stdout))
            self._task = self._bar.add_task("", total=self.total)
            self._bar.start()
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif self.enabled:
            now = time.perf_counter()
            if now - self._said >= self.every and self.done < self.total:
                self._said = now
                spent = now - self._t0
                eta = spent / self.done * (self.total - self.done) if self.done else None
                print(f"{self.label}: {self.done:,}/{self.total:,} {self.unit} | {duration(spent)} elapsed | "
                      f"eta {duration(eta)}", file=sys.stderr, flush=True)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
        spent = time.perf_counter() - self._t0
        if self.enabled and exc_type is None and spent >= self.quiet_below:
            speed = f" ({count(self.done / spent)} {self.unit}/s)" if spent > 0 else ""
            print(f"{self.label}: {self.done:,} {self.unit} in {duration(spent)}{speed}", file=sys.stderr, flush=True)
