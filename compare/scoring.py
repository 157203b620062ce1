"""Cheap answer checks for prompt sets: keywords found and reference containment.

These say "did the answer mention the right thing", not "is the answer good"; they are
enough to see a quantization lose facts that full precision still gets right.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from .prompt_sets import Question

_ARTICLES = re.compile(r"^(the|a|an)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class Score:
    """How one answer did against its question's keywords and reference (None: not scored)."""

    keywords_hit: int = 0
    keywords_total: int = 0
    reference_match: bool | None = None

    @property
    def keyword_score(self) -> float | None:
        """Fraction of keywords found, or None when the question has none."""
        return self.keywords_hit / self.keywords_total if self.keywords_total else None

    @property
    def value(self) -> float | None:
        """The mean of the checks the question has (0..1), or None when it has none."""
        parts = [p for p in (self.keyword_score, None if self.reference_match is None else float(self.reference_match))
                 if p is not None]
        return sum(parts) / len(parts) if parts else None


def _fold(text: str) -> str:
    # NFKC folds full-width forms (Ｈ２Ｏ, ，) into their plain versions, so Chinese answers match too.
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _pattern(alternative: str) -> re.Pattern:
    """A keyword as a regex; ASCII letters/digits at its ends must not continue into a longer word ("7" ≠ "17")."""
    body = re.escape(_fold(alternative))
    head = r"(?<![a-z0-9])" if re.match(r"[a-z0-9]", _fold(alternative)[:1]) else ""
    tail = r"(?![a-z0-9])" if re.match(r"[a-z0-9]", _fold(alternative)[-1:]) else ""
    return re.compile(head + body + tail)


def keyword_found(answer: str, keyword: str) -> bool:
    """Whether `answer` contains `keyword` (case-insensitive; "a|b" accepts either alternative)."""
    folded = _fold(answer)
    return any(_pattern(alt).search(folded) for alt in keyword.split("|") if alt.strip())


def _squash(text: str) -> str:
    """Letters and digits only (any script), for reference containment."""
    text = _ARTICLES.sub("", _fold(text))
    return "".join(ch for ch in text if ch.isalnum())


def score_answer(answer: str, question: Question) -> Score:
    """Score an answer against the question's keywords and reference."""
    hits = sum(keyword_found(answer, k) for k in question.keywords)
    reference = None
    if question.reference:
        wanted = _squash(question.reference)
        reference = bool(wanted) and wanted in _squash(answer)
    return Score(keywords_hit=hits, keywords_total=len(question.keywords), reference_match=reference)
