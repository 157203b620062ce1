"""Where local models may be loaded from when the app is served beyond this machine.

On loopback any local path works (it is the user's own machine). When the app is exposed
(--host other than loopback, or --share), a path typed in the model box must lie under one of
the model roots (--model-root DIR; default: the app's model caches and the embedded model), so a
remote user cannot make the server read arbitrary folders. Paths are compared after resolving
`..` and symlinks, so neither can lead out of a root.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .catalog import _HUB_ID, Catalog, UnknownModelError
from .remote import is_remote


class OutsideModelRootsError(UnknownModelError):
    """A local model path outside the configured roots, while the app is exposed."""


@dataclass(frozen=True)
class ModelRoots:
    """The folders local model paths must lie under (resolved: absolute, no `..`, symlinks followed)."""

    folders: tuple[Path, ...]

    @classmethod
    def of(cls, folders) -> "ModelRoots":
        """Roots from folder paths (resolved here, once)."""
        return cls(tuple(dict.fromkeys(Path(f).expanduser().resolve() for f in folders)))

    def allows(self, path: Path | str) -> bool:
        """Whether `path`, with `..` and symlinks resolved, lies under one of the roots."""
        real = Path(path).expanduser().resolve()
        return any(real == root or real.is_relative_to(root) for root in self.folders)

    def check(self, choice: str, catalog: Catalog) -> None:
        """Refuse a model-box entry that names a local path outside the roots (catalog ids, hub ids and
        remote engines pass). Checked before the path is looked at, so the answer never says whether
        a folder outside the roots exists."""
        text = (choice or "").strip()
        if not text or text in catalog.entries or is_remote(text):
            return
        path = Path(text).expanduser()
        # A hub id ("owner/name") is a path only if such a folder exists here (as the catalog resolves it).
        if _HUB_ID.match(text) and not path.exists():
            return
        if not self.allows(path):
            roots = ", ".join(str(r) for r in self.folders) or "(none)"
            raise OutsideModelRootsError("outside_roots", path=text, roots=roots)


def default_model_roots(cache_dir: Path, catalog: Catalog) -> list[Path]:
    """The app's model caches (its own and the Hugging Face hub's) and the embedded model's package folder."""
    from huggingface_hub import constants

    roots = [Path(cache_dir), Path(constants.HF_HUB_CACHE)]
    for entry in catalog.entries.values():
        if entry.source == "embedded":
            spec = importlib.util.find_spec(entry.package)
            if spec is not None and spec.submodule_search_locations:
                roots.append(Path(list(spec.submodule_search_locations)[0]))
    return roots
