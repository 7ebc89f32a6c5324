"""What the components do at run time, outside kfp: run `mapet` commands and turn their JSON
outputs into kfp metrics. Imported inside the component functions, so it ships in the image."""

from __future__ import annotations

import json
import os
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


def require_writable_workspace(workspace: str | Path) -> None:
    """Fails at once, with the fix, when this step's user cannot write the workspace volume (or,
    before its first use, the folder it will be made in), instead of deep inside a step."""
    path = Path(workspace)
    while not path.exists() and path != path.parent:
        path = path.parent
    if os.access(path, os.W_OK | os.X_OK):
        return
    owner = path.stat()
    raise StepError(
        f"the workspace {path} (the volume of the pipeline parameter workspace_pvc) is not writable by this "
        f"step's user, uid {os.getuid()} gid {os.getgid()}: it belongs to uid {owner.st_uid} gid {owner.st_gid} with "
        f"mode {owner.st_mode & 0o777:o}. On Kubernetes give the pods the volume's group with the pod security "
        f"context's fsGroup: {os.getgid()} (as k8s/base/trainingruntime.yaml does for the TrainJob's nodes), or "
        f"chown the volume to {os.getuid()}; with docker, mount a folder that uid {os.getuid()} owns")


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
