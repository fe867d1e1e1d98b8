"""Display labels of models in score and rank tables, and `--labels`.

A table's name (its file name, `irtrain.score.inputs.table_names`) stays as it is:
``<run>-checkpoint-0000200`` is unique and sorts by step. What a person reads is its label:
``<run>@<step>`` for a run's checkpoint (``sft@200``, ``dpo@200``), the name itself for any
other model. ``--labels`` sets labels, either in order (``--labels base,sft,dpo``: one per
model or table) or by path (``--labels base=models/base``: the models or tables given,
any of them; a path may also be written as the table's name). Labels must be distinct.
"""
from __future__ import annotations

import re
from pathlib import Path

from irtrain.errors import ConfigError

#: a run's checkpoint table name, with the -2, -3 suffix of a directory given twice
_CHECKPOINT_NAME = re.compile(r"(?:(.+)-)?checkpoint-0*(\d+)(-\d+)?")


def default_label(name: str) -> str:
    """``sft-checkpoint-0000200`` -> ``sft@200``; ``…-checkpoint-0000200-2`` -> ``…@200-2``;
    any other name unchanged."""
    m = _CHECKPOINT_NAME.fullmatch(name)
    if not m:
        return name
    run, step, again = m.groups()
    return f"{run or ''}@{step}{again or ''}"


def default_labels(names: list[str]) -> list[str]:
    """`default_label` of each name; where two labels would be equal (different runs whose
    shortened names meet), those keep their full names."""
    labels = [default_label(n) for n in names]
    return [n if labels.count(lab) > 1 else lab for n, lab in zip(names, labels)]


def parse_labels(given: list[str]) -> list[str]:
    """The items of ``--labels`` (repeated flags, or one comma-separated value)."""
    return [p.strip() for item in given for p in item.split(",") if p.strip()]


def assign_labels(given: list[str], entries: list[tuple[str, list[str]]], *, what: str,
                  recorded: list[str | None] | None = None) -> list[str]:
    """A label per entry ``(name, paths that name it)``: by default the `recorded` one (a
    score table's), else `default_label` of the name (where two defaults meet: the names);
    replaced by ``given`` (``--labels``): a plain list, in order, one per entry; or
    ``label=path`` pairs, a path being one of an entry's paths (compared resolved) or its
    name. A one-line `ConfigError` for a wrong count, a path that names nothing, or labels
    that clash."""
    names = [n for n, _ in entries]
    labels = [r or d for r, d in zip(recorded or [None] * len(names), default_labels(names))]
    labels = [n if labels.count(lab) > 1 else lab for n, lab in zip(names, labels)]
    items = parse_labels(given)
    if not items:
        return labels
    pairs = [i for i in items if "=" in i]
    if pairs and len(pairs) != len(items):
        raise ConfigError("--labels: give either one label per " + what + " (in order) or label=path pairs, not both")
    if not pairs:
        if len(items) != len(entries):
            raise ConfigError(f"--labels: {len(items)} label(s) for {len(entries)} {what}(s) ({', '.join(names)}); "
                              "give one per " + what + " in order, or label=path pairs")
        labels = items
    else:
        for item in pairs:
            label, _, target = (s.strip() for s in item.partition("="))
            if not label:
                raise ConfigError(f"--labels {item}: empty label")
            hits = [k for k, (name, paths) in enumerate(entries) if target == name or _same_path(target, paths)]
            if not hits:
                raise ConfigError(f"--labels {item}: {target} is none of the {what}s ({', '.join(names)})")
            for k in hits:
                labels[k] = label
    clash = sorted({lab for lab in labels if labels.count(lab) > 1})
    if clash:
        raise ConfigError(f"--labels: the label {clash[0]!r} names two {what}s; labels must be distinct")
    return labels


def _same_path(target: str, paths: list[str]) -> bool:
    t = Path(target).expanduser()
    if not t.exists():
        return any(target == p for p in paths)
    r = t.resolve()
    return any(Path(p).exists() and Path(p).resolve() == r for p in paths)
