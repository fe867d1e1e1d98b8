"""A generated task irtrain owns: multi-step arithmetic with worked steps.

Used by `irtrain quickstart`, the examples and the tests, so that the whole
pipeline runs on a fresh machine with nothing downloaded. A problem is a chain
of small additions and subtractions::

    user:      Compute: 7 + 5 - 3 + 4
    assistant: 7 + 5 = 12

               12 - 3 = 9

               9 + 4 = 13

               Answer: 13

Steps are separated by blank lines (``"\\n\\n"``, the default step delimiter of
`irtrain score`), so each worked step is one state of the value ranking
(FORMULAS.md, "Value ranking").

From the problems this module builds

- instruction conversations for SFT (``{"messages": [...]}``, UltraChat style),
- preference pairs (UltraFeedback-binarized style: ``chosen`` and ``rejected``
  are whole conversations sharing the user turn) whose rejected answer carries
  one error, so the chosen one is verifiably better (`corrupt`): ``bug`` (the
  sloppy demonstrator's subtraction bug, below), ``step`` (an intermediate
  result is off; later steps carry the wrong value on consistently), ``slip``
  (one written result is off, the chain goes on from the right value) or
  ``final`` (every step right, the answer line wrong),
- held-out problems disjoint from both, for accuracy by generation and for
  scoring reasoning traces,

Real SFT corpora are imperfect. With ``demo_bug_rate`` > 0 a fraction of the SFT
demonstrations comes from a sloppy demonstrator who gets subtractions that need a
borrow wrong in a systematic way (13 - 5 = 12, the "smaller-from-larger" bug):
SFT then learns the bug about as often as the right answer, while the preference
pairs, whose rejected answer is the bug's wherever it applies, carry the information
needed to fix it. That is the situation preference learning exists for.

and checks a generated answer exactly (`check_answer`, `check_steps`).

Everything is deterministic in ``seed``. Numbers stay small (operands 1-9,
running values 0-29) so a tiny model on a CPU learns the task in minutes.

Why one module: the task is one thing (generator, corruptions, writers and checker share
`Problem` and its step format), a little over ~450 lines.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEP_DELIMITER = "\n\n"
ANSWER_PREFIX = "Answer: "
ERROR_KINDS = ("bug", "step", "slip", "final")
#: planted errors that apply to every problem ("bug" needs a borrow)
PLANTED_KINDS = ("step", "slip", "final")


@dataclass(frozen=True)
class TaskSpec:
    """How problems are drawn. The defaults suit a 2-layer model on a CPU."""

    min_ops: int = 2  #: fewest operations after the starting number
    max_ops: int = 3  #: most operations
    max_operand: int = 9  #: operands (and the start) are drawn from 1..max_operand
    max_value: int = 29  #: running values stay in 0..max_value

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if self.max_operand < 1 or self.max_value < self.max_operand:
            raise ValueError("need 1 <= max_operand <= max_value")


@dataclass(frozen=True)
class Problem:
    """A start value and a chain of ``(op, operand)`` with op in ``{"+", "-"}``."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def prompt(self) -> str:
        """The user turn."""
        return "Compute: " + " ".join([str(self.start)] + [f"{op} {b}" for op, b in self.ops])

    def values(self) -> list[int]:
        """Running values after each operation (the last one is the answer)."""
        out, v = [], self.start
        for op, b in self.ops:
            v = _apply(v, op, b)
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def buggy_values(self) -> list[int]:
        """Running values as the sloppy demonstrator computes them: every subtraction that
        needs a borrow gets the "smaller-from-larger" bug (`buggy_subtract`), and the chain
        goes on from the wrong value."""
        out, v = [], self.start
        for op, b in self.ops:
            v = buggy_subtract(v, b) if op == "-" else _apply(v, op, b)
            out.append(v)
        return out

    @property
    def has_borrow(self) -> bool:
        """True when the sloppy demonstrator gets this problem wrong."""
        return self.buggy_values() != self.values()

    def buggy_solution(self) -> str:
        """The sloppy demonstrator's worked solution (equal to `solution` without a borrow)."""
        vals = self.buggy_values()
        return STEP_DELIMITER.join(_render_steps(self.start, self.ops, vals) + [f"{ANSWER_PREFIX}{vals[-1]}"])

    def steps(self) -> list[str]:
        """The correct worked steps, one line each, without the answer line."""
        return _render_steps(self.start, self.ops, self.values())

    def solution(self) -> str:
        """The correct assistant turn: steps, then ``Answer: N``, separated by blank lines."""
        return STEP_DELIMITER.join(self.steps() + [f"{ANSWER_PREFIX}{self.answer}"])

    def messages(self, response: str | None = None) -> list[dict[str, str]]:
        """A chat conversation: the prompt and ``response`` (default: the correct solution)."""
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.solution() if response is None else response},
        ]


def _apply(v: int, op: str, b: int) -> int:
    if op == "+":
        return v + b
    if op == "-":
        return v - b
    raise ValueError(f"unknown op {op!r}")


def buggy_subtract(a: int, b: int) -> int:
    """``a - b`` with the classic "smaller-from-larger" subtraction bug (Brown & VanLehn 1980):
    when the units digit of ``a`` is smaller than ``b`` (a borrow is needed), the sloppy
    demonstrator subtracts the smaller digit from the larger and keeps the tens:
    13 - 5 = 12, 21 - 4 = 23. Without a borrow the result is right."""
    if a >= 10 and a % 10 < b:
        return (a // 10) * 10 + (b - a % 10)
    return a - b


def _render_steps(start: int, ops: Iterable[tuple[str, int]], values: list[int]) -> list[str]:
    prev, lines = start, []
    for (op, b), v in zip(ops, values):
        lines.append(f"{prev} {op} {b} = {v}")
        prev = v
    return lines


def random_problem(rng: random.Random, spec: TaskSpec = TaskSpec()) -> Problem:
    """Draw one problem; every running value stays within ``0..spec.max_value``."""
    v = start = rng.randint(1, spec.max_operand)
    ops = []
    for _ in range(rng.randint(spec.min_ops, spec.max_ops)):
        b = rng.randint(1, spec.max_operand)
        allowed = [op for op in ("+", "-") if 0 <= _apply(v, op, b) <= spec.max_value]
        op = rng.choice(allowed)  # one of them always fits: b <= max_operand <= max_value
        ops.append((op, b))
        v = _apply(v, op, b)
    return Problem(start, tuple(ops))


def generate_problems(n: int, seed: int, spec: TaskSpec = TaskSpec(), *, exclude: Iterable[Problem] = ()) -> list[Problem]:
    """``n`` distinct problems, none of them in ``exclude``; deterministic in ``seed``."""
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        p = random_problem(rng, spec)
        tries += 1
        if tries > 100 * (n + 10):
            raise ValueError(f"cannot draw {n} distinct problems from {spec}")
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
    return out


# --------------------------------------------------------------------------- planted errors
def corrupt(problem: Problem, rng: random.Random, kind: str | None = None,
            kinds: Sequence[str] = ERROR_KINDS) -> tuple[str, str]:
    """A wrong response for ``problem`` with one planted error. Returns ``(response, kind)``.

    - ``step``: the result of one step is off by 1-3; later steps start from the
      wrong value and are computed correctly from it, so the final answer is wrong too.
    - ``slip``: the result written for one step is off by 1-3, but the next steps go on
      from the right value: the final answer is right, the worked steps are not.
    - ``final``: every step is right; the answer line is off by 1-3.
    - ``bug``: the sloppy demonstrator's solution (`Problem.buggy_solution`), for a problem
      with a borrow; for one without, a ``step`` error instead.
    When ``kind`` is None it is drawn from ``kinds``, except that ``bug`` is always used
    when it is in ``kinds`` and the problem has a borrow (the demonstrator's own mistake is
    the natural rejected answer).
    The response differs from the correct solution and always fails `check_steps`
    (``step`` and ``final`` also fail `check_answer`).
    """
    if kind is None:
        if "bug" in kinds and problem.has_borrow:
            kind = "bug"
        else:
            kind = rng.choice([k for k in kinds if k != "bug"] or ["step"])
    if kind == "bug" and not problem.has_borrow:
        kind = "step"
    if kind == "bug":
        return problem.buggy_solution(), kind
    values = problem.values()
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    if kind == "step":
        k = rng.randrange(len(values))
        wrong = list(values[:k])
        v = values[k] + delta
        if v < 0:  # keep numbers non-negative: flip the sign of the error
            v = values[k] - delta
        wrong.append(v)
        for op, b in problem.ops[k + 1 :]:
            v = _apply(v, op, b)
            wrong.append(v)
        steps = _render_steps(problem.start, problem.ops, wrong)
        final = wrong[-1]
    elif kind == "slip":
        k = rng.randrange(len(values))
        wrong = list(values)
        wrong[k] = values[k] + delta if values[k] + delta >= 0 else values[k] - delta
        prev = [problem.start] + values[:-1]  # each step starts from the right value
        steps = [f"{a} {op} {b} = {w}" for a, (op, b), w in zip(prev, problem.ops, wrong)]
        final = problem.answer
    elif kind == "final":
        steps = problem.steps()
        final = problem.answer + delta
        if final < 0:
            final = problem.answer - delta
    else:
        raise ValueError(f"unknown error kind {kind!r}; one of {ERROR_KINDS}")
    response = STEP_DELIMITER.join(steps + [f"{ANSWER_PREFIX}{final}"])
    return response, kind


# --------------------------------------------------------------------------- checking
_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)\s*$")
_STEP_RE = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)\s*$")


def parse_answer(text: str) -> int | None:
    """The integer of the final ``Answer: N`` line, or None when the text does not end with one."""
    m = _ANSWER_RE.search(text.strip())
    return int(m.group(1)) if m else None


def check_answer(problem: Problem, text: str) -> bool:
    """True when the generated ``text`` ends with ``Answer: N`` and N is the exact answer."""
    return parse_answer(text) == problem.answer


def check_steps(problem: Problem, text: str) -> bool:
    """Strict check: exactly the problem's steps, each arithmetically right, chained, then the right answer."""
    parts = [p.strip() for p in text.strip().split(STEP_DELIMITER)]
    if len(parts) != len(problem.ops) + 1 or not check_answer(problem, parts[-1]):
        return False
    prev = problem.start
    for part, (op, b) in zip(parts[:-1], problem.ops):
        m = _STEP_RE.match(part)
        if not m:
            return False
        a, o, bb, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if (a, o, bb) != (prev, op, b) or r != _apply(a, o, bb):
            return False
        prev = r
    return prev == problem.answer


# --------------------------------------------------------------------------- datasets
def sft_example(problem: Problem) -> dict[str, Any]:
    """An instruction conversation (``messages``), UltraChat style."""
    return {"messages": problem.messages()}


def preference_example(problem: Problem, rng: random.Random, kind: str | None = None,
                       kinds: Sequence[str] = ERROR_KINDS) -> dict[str, Any]:
    """A preference pair, UltraFeedback-binarized style: ``chosen`` and ``rejected`` are
    whole conversations sharing the user turn; ``error`` names the planted error (drawn
    from ``kinds`` unless ``kind`` is given)."""
    wrong, kind = corrupt(problem, rng, kind, kinds)
    return {
        "prompt": problem.prompt,
        "chosen": problem.messages(),
        "rejected": problem.messages(wrong),
        "error": kind,
    }


def heldout_example(problem: Problem) -> dict[str, Any]:
    """A held-out problem: the conversation with its correct worked solution (a reasoning
    trace for `irtrain score`) plus the answer, for checking generations."""
    return {"messages": problem.messages(), "prompt": problem.prompt, "answer": problem.answer}


@dataclass
class TaskData:
    """Disjoint problem sets of one task."""

    sft: list[Problem]
    pref: list[Problem]
    heldout: list[Problem]
    seed: int
    spec: TaskSpec
    error_kinds: tuple[str, ...] = ERROR_KINDS  #: errors of the rejected answers (see `corrupt`)
    demo_bug_rate: float = 0.0  #: fraction of SFT demonstrations written by the sloppy demonstrator

    def sft_rows(self) -> list[dict[str, Any]]:
        """SFT conversations; a ``demo_bug_rate`` fraction of them (drawn by seed) carry the
        sloppy demonstrator's solution, which is wrong when the problem has a borrow."""
        rng = random.Random(f"demo-{self.seed}")
        rows = []
        for p in self.sft:
            sloppy = rng.random() < self.demo_bug_rate
            rows.append({"messages": p.messages(p.buggy_solution() if sloppy else None)})
        return rows

    def pref_rows(self) -> list[dict[str, Any]]:
        rng = random.Random(f"pref-{self.seed}")
        return [preference_example(p, rng, kinds=self.error_kinds) for p in self.pref]

    def heldout_pref_rows(self) -> list[dict[str, Any]]:
        """Preference pairs on the held-out problems (for held-out preference accuracy)."""
        rng = random.Random(f"heldout-pref-{self.seed}")
        return [preference_example(p, rng, kinds=self.error_kinds) for p in self.heldout]

    def heldout_rows(self) -> list[dict[str, Any]]:
        return [heldout_example(p) for p in self.heldout]

    def texts(self) -> Iterator[str]:
        """Text to train a tokenizer on: every prompt and worked solution, and the numbers a
        planted error can produce (so the tokenizer does not depend on which errors are drawn)."""
        for p in self.sft + self.pref + self.heldout:
            yield p.prompt
            yield p.solution()
        yield " ".join(str(i) for i in range(-self.spec.max_operand - 3, self.spec.max_value + self.spec.max_operand + 4))


def make_task(n_sft: int, n_pref: int, n_heldout: int, seed: int = 0, spec: TaskSpec = TaskSpec(),
              error_kinds: Sequence[str] = ERROR_KINDS, demo_bug_rate: float = 0.0) -> TaskData:
    """Draw disjoint SFT, preference and held-out problem sets (no problem in two sets).

    ``demo_bug_rate`` > 0 makes the SFT demonstrations imperfect, like real SFT corpora: that
    fraction of them comes from a sloppy demonstrator with a systematic subtraction bug
    (`buggy_subtract`), so SFT alone learns the bug as often as the right answer, and the
    preference pairs (whose rejected answer is the bug's, where it applies) say which is right.
    """
    if not 0.0 <= demo_bug_rate <= 1.0:
        raise ValueError(f"demo_bug_rate must be in [0, 1], got {demo_bug_rate}")
    bad = [k for k in error_kinds if k not in ERROR_KINDS]
    if bad or not error_kinds:
        raise ValueError(f"error kinds must be a non-empty subset of {ERROR_KINDS}, got {tuple(error_kinds)}")
    held = generate_problems(n_heldout, seed * 1000 + 1, spec)
    sft = generate_problems(n_sft, seed * 1000 + 2, spec, exclude=held)
    pref = generate_problems(n_pref, seed * 1000 + 3, spec, exclude=held + sft)
    return TaskData(sft=sft, pref=pref, heldout=held, seed=seed, spec=spec, error_kinds=tuple(error_kinds),
                    demo_bug_rate=demo_bug_rate)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_task(task: TaskData, out_dir: str | Path) -> dict[str, Path]:
    """Write the task as JSONL files under ``out_dir``; returns their paths by name:
    ``sft`` (chat), ``pref`` (preference), ``heldout`` (chat + answer),
    ``heldout_pref`` (preference pairs on held-out problems)."""
    out = Path(out_dir)
    return {
        "sft": write_jsonl(out / "sft.jsonl", task.sft_rows()),
        "pref": write_jsonl(out / "pref.jsonl", task.pref_rows()),
        "heldout": write_jsonl(out / "heldout.jsonl", task.heldout_rows()),
        "heldout_pref": write_jsonl(out / "heldout_pref.jsonl", task.heldout_pref_rows()),
    }


def problem_from_prompt(prompt: str) -> Problem:
    """Parse a prompt written by `Problem.prompt` back into the problem."""
    body = prompt.strip()
    if not body.startswith("Compute:"):
        raise ValueError(f"not a task prompt: {prompt!r}")
    toks = body[len("Compute:"):].split()
    if len(toks) < 3 or len(toks) % 2 == 0:
        raise ValueError(f"not a task prompt: {prompt!r}")
    start = int(toks[0])
    ops = tuple((toks[i], int(toks[i + 1])) for i in range(1, len(toks), 2))
    return Problem(start, ops)


# --------------------------------------------------------------------------- accuracy by generation
def generate_responses(model: Any, tokenizer: Any, problems: list[Problem], *, max_new_tokens: int = 64,
                       batch_size: int = 128) -> list[str]:
    """Greedy responses of a transformers causal LM to the problems' prompts (chat template,
    generation prompt, left padding), decoded without special tokens. Generation stops at
    the tokenizer's EOS (the end-of-turn token of the toy templates)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(problems), batch_size):
            chunk = problems[i : i + batch_size]
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False,
                                                     add_generation_prompt=True) for p in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return out


def task_accuracy(model_dir: str | Path, problems: list[Problem], *, max_new_tokens: int = 64,
                  batch_size: int = 128, samples: int = 3) -> dict[str, Any]:
    """Held-out task accuracy of the model saved in ``model_dir`` by greedy generation.

    Returns ``accuracy`` (the final answer is exact, `check_answer`), ``steps_accuracy``
    (every step right too, `check_steps`), ``n`` and a few ``samples`` (prompt, response, ok).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not problems:
        raise ValueError("no problems to evaluate")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    texts = generate_responses(model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ok = [check_answer(p, t) for p, t in zip(problems, texts)]
    strict = [check_steps(p, t) for p, t in zip(problems, texts)]
    return {
        "accuracy": sum(ok) / len(ok),
        "steps_accuracy": sum(strict) / len(strict),
        "n": len(ok),
        "correct": ok,  # per problem, for paired comparisons between models
        "steps_correct": strict,
        "samples": [{"prompt": p.prompt, "response": t, "correct": c} for p, t, c in list(zip(problems, texts, ok))[:samples]],
    }
