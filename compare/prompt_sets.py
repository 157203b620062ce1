"""Prompt sets as data: load and check the TOML files in prompts/, or questions pasted one per line.

A set is a name, a language, an optional system prompt, an optional passage (put before
every question, for long-context sets) and a list of questions, each with optional
keywords and a reference answer to score against. The file format is described in
prompts/README.md. Errors name the file and the line, so a user can fix their own set.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from models.facade import UserFacingError

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
QUALITY_TEXT = PROMPTS_DIR / "quality_text.txt"

_TOP_KEYS = {"name", "language", "system", "passage", "questions"}
_QUESTION_KEYS = {"text", "keywords", "reference"}


class PromptSetError(UserFacingError):
    """A prompt set that cannot be used; the detail names the file, the line and what to fix."""

    def __init__(self, detail: str):
        super().__init__("prompt_set", detail=detail)


@dataclass(frozen=True)
class Question:
    """One question, with what a good answer should contain (both optional)."""

    text: str
    keywords: tuple[str, ...] = ()  # each must occur in the answer; "a|b" accepts either
    reference: str | None = None


@dataclass(frozen=True)
class PromptSet:
    """A named list of questions asked with the same system prompt (and passage, if any)."""

    name: str
    language: str
    questions: tuple[Question, ...]
    system: str = ""
    passage: str = ""
    source: str = ""  # the file it came from, or "pasted"

    def messages(self, question: Question) -> list[dict]:
        """The chat for one question: system prompt (if any), then passage + question."""
        user = f"{self.passage.strip()}\n\nQuestion: {question.text}" if self.passage.strip() else question.text
        system = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return system + [{"role": "user", "content": user}]

    @property
    def scored(self) -> bool:
        """Whether any question carries keywords or a reference."""
        return any(q.keywords or q.reference for q in self.questions)


@dataclass
class _Lines:
    """Where things are in the raw text, to put line numbers on schema errors (tomllib gives none)."""

    question_lines: list[int] = field(default_factory=list)  # 1-based line of each [[questions]] header
    key_lines: dict[str, int] = field(default_factory=dict)  # top-level key -> 1-based line

    @classmethod
    def scan(cls, text: str) -> "_Lines":
        """Index the file's lines: where each [[questions]] table starts."""
        found = cls()
        in_table = False
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if re.match(r"\[\[\s*questions\s*\]\]", stripped):
                found.question_lines.append(number)
                in_table = True
            elif stripped.startswith("["):
                in_table = True
            elif not in_table:
                match = re.match(r"([A-Za-z_][\w-]*)\s*=", stripped)
                if match and match.group(1) not in found.key_lines:
                    found.key_lines[match.group(1)] = number
        return found

    def question(self, index: int) -> int | None:
        """The 1-based question number a line belongs to (None: before the first question)."""
        return self.question_lines[index] if index < len(self.question_lines) else None


def _where(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line else source


def _decode_position(error: tomllib.TOMLDecodeError, text: str) -> tuple[int | None, int | None, str]:
    """(line, column, message) of a TOML syntax error (Python < 3.14 has them only in the text)."""
    line = getattr(error, "lineno", None)
    col = getattr(error, "colno", None)
    message = getattr(error, "msg", None) or str(error)
    match = re.search(r"\(at line (\d+), column (\d+)\)", str(error))
    if match and line is None:
        line, col = int(match.group(1)), int(match.group(2))
    elif "(at end of document)" in str(error) and line is None:
        # e.g. an unclosed array or string: the file ended while a value was still open.
        lines = text.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
        message += " (the file ended while a value was still open)"
    message = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message)
    return line, col, message


def parse_prompt_set(text: str, source: str = "<text>") -> PromptSet:
    """Parse and check the TOML text of a prompt set (raises PromptSetError naming the line)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line, col, message = _decode_position(e, text)
        where = f"{source}, line {line}, column {col}" if line else source
        raise PromptSetError(f"{where}: invalid TOML: {message}") from None
    lines = _Lines.scan(text)

    def top_error(key: str, problem: str) -> PromptSetError:
        return PromptSetError(f"{_where(source, lines.key_lines.get(key))}: {problem}")

    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise top_error(unknown[0], f"unknown key {unknown[0]!r}; a prompt set has: {', '.join(sorted(_TOP_KEYS))}")
    for key in ("name", "language"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise PromptSetError(f"{_where(source, lines.key_lines.get(key))}: {key!r} must be a non-empty string, "
                                 f'e.g. {key} = "{"My set" if key == "name" else "en"}"')
    for key in ("system", "passage"):
        if key in data and not isinstance(data[key], str):
            raise top_error(key, f"{key!r} must be a string")
    raw = data.get("questions")
    if not isinstance(raw, list) or not raw:
        raise PromptSetError(f"{source}: the set has no questions; add at least one [[questions]] table with text = \"...\"")
    questions = [_question(item, i, source, lines.question(i)) for i, item in enumerate(raw)]
    return PromptSet(
        name=data["name"].strip(), language=data["language"].strip(), questions=tuple(questions),
        system=data.get("system", ""), passage=data.get("passage", ""), source=source,
    )


def _question(item: object, index: int, source: str, line: int | None) -> Question:
    """One [[questions]] table, checked; `index` is 0-based, messages say 'question N' from 1."""
    where = f"{_where(source, line)}: question {index + 1}"
    if not isinstance(item, dict):
        raise PromptSetError(f"{where}: must be a table with text = \"...\"")
    unknown = sorted(set(item) - _QUESTION_KEYS)
    if unknown:
        raise PromptSetError(f"{where}: unknown key {unknown[0]!r}; a question has: {', '.join(sorted(_QUESTION_KEYS))}")
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise PromptSetError(f"{where}: has no text; add text = \"...\"")
    keywords = item.get("keywords", [])
    if isinstance(keywords, str):
        keywords = [keywords]
    if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
        raise PromptSetError(f"{where}: keywords must be a list of non-empty strings, e.g. keywords = [\"Paris\"]")
    reference = item.get("reference")
    if reference is not None and (not isinstance(reference, str) or not reference.strip()):
        raise PromptSetError(f"{where}: reference must be a non-empty string")
    return Question(text=text.strip(), keywords=tuple(k.strip() for k in keywords), reference=reference)


def load_prompt_set(path: str | Path) -> PromptSet:
    """Load a prompt set from a file, or by name from prompts/ ("quick_en" = prompts/quick_en.toml)."""
    path = resolve_prompt_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptSetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_prompt_set(text, str(path))


def resolve_prompt_path(path: str | Path) -> Path:
    """The file a --prompts argument names: a path, with or without .toml, or a set name in prompts/."""
    given = Path(str(path).strip()).expanduser()
    candidates = [given, given.with_name(given.name + ".toml"), PROMPTS_DIR / given.name,
                  PROMPTS_DIR / (given.name + ".toml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(p.stem for p in list_prompt_sets())
    raise PromptSetError(f"No prompt set at {path}. Give a .toml file, or one of: {names}")


def list_prompt_sets(folder: Path = PROMPTS_DIR) -> list[Path]:
    """The prompt-set files shipped in (or added to) `folder`, by name."""
    return sorted(folder.glob("*.toml"))


def parse_pasted(text: str, name: str = "Pasted questions", language: str = "en", system: str = "") -> PromptSet:
    """A set from questions pasted one per line (blank lines ignored; no scoring)."""
    questions = tuple(Question(line.strip()) for line in (text or "").splitlines() if line.strip())
    if not questions:
        raise PromptSetError("No questions: paste at least one, one per line.")
    return PromptSet(name=name, language=language, questions=questions, system=system, source="pasted")
