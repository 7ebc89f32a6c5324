"""Small file helpers shared by the stages: a write lands whole or not at all (a temporary name,
then a rename), so an interrupted command never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: Path, text: str, exclusive: bool = False) -> None:
    """``exclusive``: the file must not exist yet (FileExistsError), even when another process
    writes it at the same moment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial" if exclusive else path.name + ".partial")
    partial.write_text(text)
    if not exclusive:
        os.replace(partial, path)
        return
    try:
        os.link(partial, path)
    finally:
        partial.unlink()


def write_json(path: Path, document: Any, exclusive: bool = False) -> None:
    write_text(path, json.dumps(document, indent=2) + "\n", exclusive)
