"""docs/FORMULAS.md is the reference code cites: every citation must resolve.

Citations look like  FORMULAS.md "Section"  or  FORMULAS.md, "Section"  (a heading of
docs/FORMULAS.md, compared exactly after stripping the '#'s and surrounding spaces), or
FORMULAS.md `name` (possibly a list: `a`, `b`), a name that docs/FORMULAS.md writes in
backticks. A link target docs/FORMULAS.md#anchor must be the slug of one of its headings.
No torch needed.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "FORMULAS.md"
THIS = Path(__file__).resolve()

SCAN_DIRS = ("irtrain", "cli", "tests", "examples", "bench", "scripts", "rust_ext")
SCAN_SUFFIXES = {".py", ".md", ".toml", ".rs"}
SKIP_PARTS = {"__pycache__", "target", "node_modules", ".venv", "venv", "build", "dist"}

# Headings that code cites (or that the project relies on); they must exist exactly.
REQUIRED_HEADINGS = (
    "Notation",
    "Reduction",
    "SFT losses",
    "KL to the reference",
    "Preference losses",
    "Implicit-reward metrics",
    "Value ranking",
    "Multi-objective and alternating SFT/DPO",
    "Reference log-probs",
    "Decisions",
)
# Names every reader of the page looks up; each must appear in backticks.
REQUIRED_NAMES = (
    "ce", "dft", "pearson", "hellinger", "js",
    "full", "k1", "k2", "k3",
    "sigmoid", "robust", "hinge", "ipo", "simpo", "orpo", "kto", "infonca", "plackett_luce",
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
    "value/s0", "eval/pref_loss", "eval/pref_accuracy",
    "--value-grad", "--sft-coef α", "--eval-beta", "--lambda-interval",
)
MIN_CITATIONS = 20

# Between "FORMULAS.md" (or a Markdown link whose text ends with it) and the cited item:
# an optional comma, spaces, and at most one line break (with a comment marker after it).
_SEP = r",?[ \t]*(?:\r?\n[ \t]*(?:#+|//+!?|\*)?[ \t]*)?"
_PREFIX = r"FORMULAS\.md(?:\]\([^)\s]*\))?"
QUOTED = re.compile(_PREFIX + _SEP + r"[\"“]([^\"“”`]{1,120})[\"”]")
TICKED = re.compile(_PREFIX + _SEP + r"(`[^`\n]+`(?:[ \t]*,[ \t]*(?:and[ \t]+)?`[^`\n]+`)*)")
ANCHOR = re.compile(r"docs/FORMULAS\.md#([A-Za-z0-9_\-]+)")
_CONTINUATION = re.compile(r"[ \t]*\r?\n[ \t]*(?:#+|//+!?|\*)?[ \t]*")
_REGEX_META = set("\\^$*+?{}[]|()")


def _files() -> list[Path]:
    out: list[Path] = sorted(p for p in ROOT.glob("*.md") if p.is_file())
    for d in SCAN_DIRS:
        base = ROOT / d
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.suffix in SCAN_SUFFIXES and p.is_file() and not SKIP_PARTS.intersection(p.relative_to(ROOT).parts):
                out.append(p)
    return [p for p in out if p.resolve() not in (DOC.resolve(), THIS)]


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _citations() -> list[tuple[str, str, str]]:
    """(kind, where 'file:line', cited text) for every citation in the scanned files."""
    found: list[tuple[str, str, str]] = []
    for path in _files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = path.relative_to(ROOT).as_posix()
        for m in QUOTED.finditer(text):
            section = _CONTINUATION.sub(" ", m.group(1)).strip()
            if _REGEX_META.intersection(section):
                continue  # a pattern, not a citation
            found.append(("section", f"{rel}:{_line(text, m.start())}", section))
        for m in TICKED.finditer(text):
            for name in re.findall(r"`([^`\n]+)`", m.group(1)):
                found.append(("name", f"{rel}:{_line(text, m.start())}", name))
        for m in ANCHOR.finditer(text):
            found.append(("anchor", f"{rel}:{_line(text, m.start())}", m.group(1)))
    return found


def _doc_text() -> str:
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing"
    return DOC.read_text(encoding="utf-8")


def _headings(text: str) -> list[str]:
    heads: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$", line)
        if m and not fenced:
            heads.append(m.group(2).strip())
    return heads


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    s = re.sub(r"`", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _ticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def test_doc_has_required_headings():
    heads = _headings(_doc_text())
    missing = [h for h in REQUIRED_HEADINGS if h not in heads]
    assert not missing, f"docs/FORMULAS.md lacks the headings {missing}; it has {heads}"
    dup = sorted({h for h in heads if heads.count(h) > 1})
    assert not dup, f"docs/FORMULAS.md repeats headings {dup} (a citation would be ambiguous)"


def test_doc_names_in_backticks():
    ticked = _ticked(_doc_text())
    missing = [n for n in REQUIRED_NAMES if n not in ticked]
    assert not missing, f"docs/FORMULAS.md does not write these names in backticks: {missing}"


def test_doc_internal_links_resolve():
    text = _doc_text()
    slugs = {_slug(h) for h in _headings(text)}
    bad = [f"docs/FORMULAS.md:{_line(text, m.start())}: (#{m.group(1)})"
           for m in re.finditer(r"\]\(#([^)\s]+)\)", text) if m.group(1) not in slugs]
    assert not bad, "links to no heading of docs/FORMULAS.md:\n" + "\n".join(bad)


def test_enough_citations_found():
    cites = _citations()
    assert len(cites) >= MIN_CITATIONS, (
        f"only {len(cites)} FORMULAS.md citations found under {SCAN_DIRS} and README.md "
        f"(expected >= {MIN_CITATIONS}); is the citation pattern still right?\n"
        + "\n".join(f"{w}: {k} {c!r}" for k, w, c in cites))


def test_citations_resolve():
    text = _doc_text()
    heads = set(_headings(text))
    slugs = {_slug(h) for h in heads}
    ticked = _ticked(text)
    bad = []
    for kind, where, cited in _citations():
        if kind == "section" and cited not in heads:
            bad.append(f'{where}: FORMULAS.md "{cited}" is not a heading of docs/FORMULAS.md')
        elif kind == "name" and cited not in ticked:
            bad.append(f"{where}: FORMULAS.md `{cited}` does not appear in backticks in docs/FORMULAS.md")
        elif kind == "anchor" and cited not in slugs:
            bad.append(f"{where}: docs/FORMULAS.md#{cited} is the anchor of no heading")
    assert not bad, ("citations that docs/FORMULAS.md does not resolve:\n" + "\n".join(bad)
                     + f"\n(headings: {sorted(heads)})")


def test_readme_links_to_formulas_doc():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    link = re.compile(r"\]\(\s*(?:\./)?docs/FORMULAS\.md(?:#[^)\s]*)?\s*\)|^\[[^\]]+\]:\s*(?:\./)?docs/FORMULAS\.md", re.M)
    assert link.search(readme), "README.md has no Markdown link to docs/FORMULAS.md"
    assert DOC.is_file()
