"""params.yaml: every knob of every stage, grouped by stage. Commands take their defaults here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mapet.errors import MapetError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MapetError(f"{path}: parameters file not found (pass --params PATH)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MapetError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(params, dict):
        raise MapetError(f"{path}: expected a mapping of stage names to settings")
    params["_path"] = str(path)
    return params


def param(params: dict[str, Any], dotted: str) -> Any:
    """``param(p, "pretrain.objective")``; a missing key is an error naming the file and field."""
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise MapetError(f"{params.get('_path', 'params')}: missing field {dotted!r}")
        value = value[part]
    return value
