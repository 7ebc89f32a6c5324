"""What the components do at run time, outside kfp: run `mapet` commands and turn their JSON
outputs into kfp metrics. Imported inside the component functions, so it ships in the image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


class StepError(RuntimeError):
    """A `mapet` command of a pipeline step failed; its own message is in the step's log above."""


def mapet(*args: str | Path) -> None:
    """Runs `mapet ARGS` in this step's Python (so kfp.local and the image behave alike)."""
    argv = [sys.executable, "-m", "mapet", *map(str, args)]
    print("+ mapet " + " ".join(map(str, args)), flush=True)
    status = subprocess.run(argv).returncode
    if status:
        raise StepError(f"`mapet {' '.join(map(str, args))}` exited with status {status}")


def numbers(document: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number in a (nested) JSON document, keyed by its dotted path: kfp metrics are flat."""
    flat: dict[str, float] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def log_json_metrics(metrics, path: Path) -> dict[str, Any]:
    """Logs every number of the JSON file at ``path`` on the kfp Metrics artifact; returns the document."""
    document = json.loads(Path(path).read_text())
    for name, value in numbers(document).items():
        metrics.log_metric(name, value)
    return document
