"""The chat tab's controls read as values: numbers checked against their ranges, and the model controls.

A slider's number box sends what was typed until it loses focus (0, -5, "abc"), and API callers send
anything, so every handler reads numbers through read_number; a bad one is a BadNumber whose message
names the control and its range in the user's language.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.facade import Engine, GiB, LoadOptions, LoadSettings

from .i18n import t

# Ranges of the numeric controls (the sliders use them too). A CLI value beyond a maximum widens it.
TEMPERATURE_MAX = 2.0
TOP_P_MIN = 0.05
BUDGET_MIN_GIB = 0.5
CONTEXT_MIN, CONTEXT_MAX = 256, 32768
MAX_NEW_TOKENS_MAX = 4096
MAX_MESSAGE_CHARS = 50_000  # longest message accepted (app.py --max-message-chars)


class BadNumber(ValueError):
    """A numeric control's value is not a number or out of its range (the message says which and why)."""


def read_number(value, label_key: str, low: float, high: float, lang: str, whole: bool = False) -> float:
    """`value` as a number in [low, high], or BadNumber naming the control and its range."""
    try:
        number = float(value)
        ok = math.isfinite(number) and low <= number <= high and (not whole or number == int(number))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        kind = t("whole_number", lang) if whole else t("number", lang)
        low_s, high_s = (f"{int(low)}", f"{int(high)}") if whole else (f"{low:g}", f"{high:g}")
        raise BadNumber(t("bad_number", lang, name=t(label_key, lang), kind=kind, low=low_s, high=high_s,
                          value=str(value)[:40]))
    return int(number) if whole else number


@dataclass
class ModelChoice:
    """The model controls' values, as the UI holds them."""

    model: str
    quant: str
    double_quant: bool = False
    gpu_budget_gib: float | None = None
    context_tokens: int = 4096
    options: LoadOptions = field(default_factory=LoadOptions)

    def load_settings(self, engine: Engine, lang: str = "en", context_max: int = CONTEXT_MAX) -> LoadSettings:
        """LoadSettings for the engine (the budget only matters on a GPU); BadNumber for a bad number."""
        budget = None
        if engine.device == "cuda" and self.gpu_budget_gib not in (None, ""):
            total = engine.memory().total / GiB
            budget = read_number(self.gpu_budget_gib, "gpu_budget", BUDGET_MIN_GIB, total, lang)
        context = read_number(self.context_tokens, "context", CONTEXT_MIN, context_max, lang, whole=True)
        return LoadSettings.from_user(self.quant, budget, context, self.double_quant, self.options)
