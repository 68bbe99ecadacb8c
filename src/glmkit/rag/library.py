"""The knowledge bases of one user: folders under one root, each a KnowledgeBase named by its folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import InvalidParameterError, KnowledgeBaseNotFound
from ..storage import data_dir
from .store import DATABASE, KnowledgeBase, Settings

NAME_RULE = ("must be 1 to 64 characters: letters (any script, 中文 included), digits, '_', '-' and '.', "
             "not starting with '.'")
_NAME = re.compile(r"(?!\.)[\w.-]{1,64}")  # a folder name: no separators, never "." or ".."


def default_root() -> Path:
    """$GLMKIT_HOME/kb, else the XDG data directory's glmkit/kb (read at call time)."""
    return data_dir() / "kb"


def check_name(name: str) -> str:
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise InvalidParameterError("name", name, NAME_RULE)
    return name


class Library:
    def __init__(self, root: Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME.fullmatch(p.name) and (p / DATABASE).is_file())

    def exists(self, name: str) -> bool:
        return (self.root / check_name(name) / DATABASE).is_file()

    def create(self, name: str, settings: Settings) -> KnowledgeBase:
        return KnowledgeBase.create(self.root / check_name(name), settings)

    def open(self, name: str) -> KnowledgeBase:
        if not self.exists(name):
            raise KnowledgeBaseNotFound(self._unknown(name))
        return KnowledgeBase.open(self.root / name)

    def delete(self, name: str) -> None:
        """Removes the knowledge base's folder and everything in it."""
        if not self.exists(name):
            raise KnowledgeBaseNotFound(self._unknown(name))
        shutil.rmtree(self.root / name)

    def _unknown(self, name: str) -> str:
        names = self.names()
        known = f"the knowledge bases are: {', '.join(names)}" if names else f"there are none in {self.root} yet"
        return (f"no knowledge base named {name!r}; {known}. Create one with: glmkit kb create {name} FOLDER")
