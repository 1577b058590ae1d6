"""The sample images that ship with the package (sources in SOURCES.md)."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent


def images() -> list[Path]:
    """The sample JPEGs, in name order."""
    return sorted(FOLDER.glob("*.jpg"))
