"""Write batch results as CSV (for spreadsheets) and JSONL (one JSON object per row, for scripts)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .runner import ResultRow


def write_csv(rows: list[ResultRow], path: str | Path) -> Path:
    """Write rows with a header line; empty values (None) become empty cells."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # utf-8-sig: Excel then reads Chinese answers correctly; csv readers skip the BOM with this encoding.
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ResultRow.columns())
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.as_dict().items()})
    return path


def write_jsonl(rows: list[ResultRow], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8, Chinese kept readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.as_dict(), ensure_ascii=False) + "\n")
    return path


def write_both(rows: list[ResultRow], csv_path: str | Path) -> tuple[Path, Path]:
    """The CSV at `csv_path` and a .jsonl beside it (same name)."""
    csv_path = Path(csv_path)
    return write_csv(rows, csv_path), write_jsonl(rows, csv_path.with_suffix(".jsonl"))


def format_table(rows: list[ResultRow], width: int = 48) -> str:
    """A plain-text table of the main columns, for the terminal."""
    cols = ["question_no", "config", "new_tokens", "ttft_s", "tokens_per_s", "keywords", "score", "answer"]
    cells = [[_cell(getattr(r, c) if c != "answer" else (r.error and f"ERROR: {r.error}") or r.answer, width)
              for c in cols] for r in rows]
    head = ["#", "config", "tokens", "TTFT s", "tok/s", "keywords", "score", "answer"]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value, width: int) -> str:
    if value is None:
        return "–"
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"
