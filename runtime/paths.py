"""Output folders checked before the long work that writes into them."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PathError


def writable_folder(folder: Path, name: str = "the folder") -> Path:
    """`folder`, made if missing (parents too) and writable, or a PathError saying why."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no such parent, no permission
        raise PathError(f"cannot make {name} {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise PathError(f"cannot write in {name} {folder}")
    return folder
