"""File-system helpers shared by the stages that own an output folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path


def remove_paths(paths: Iterable[Path]) -> None:
    """Removes each path, folder or file; a path that does not exist is skipped."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
