"""params.yaml: every knob of every stage, grouped by stage. Commands take their defaults here."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
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
    return resolve_params(params, str(path))


def resolve_params(params: Any, source: str) -> dict[str, Any]:
    """A parsed parameters document with its ``preset`` (a name under ``presets``) merged in."""
    if not isinstance(params, dict):
        raise MapetError(f"{source}: expected a mapping of stage names to settings")
    preset = params.get("preset")
    if preset is not None:
        presets = params.get("presets") or {}
        if preset not in presets:
            raise MapetError(f"{source}: preset {preset!r} is not defined under 'presets' "
                             f"(defined: {', '.join(presets) or 'none'})")
        params = merge(params, presets[preset])
    for section, values in params.items():
        if section not in ("presets", "pipeline") and isinstance(values, dict):
            _check_ranges(section, values, source)
    return {**params, "_path": source}


def _check_ranges(prefix: str, values: dict[str, Any], source: str) -> None:
    for name, value in values.items():
        if isinstance(value, dict):
            _check_ranges(f"{prefix}.{name}", value, source)
        else:
            check_range(prefix, name, value, source)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, mapping by mapping (a new dict; neither is changed)."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def set_param(params: dict[str, Any], assignment: str) -> None:
    """Applies ``"pretrain.objective=mim"`` (the syntax of ``dvc exp run -S``) in place; the value
    is read as YAML, and the field must exist already, so a typo is an error, not a new knob."""
    dotted, sep, text = assignment.partition("=")
    if not sep or not dotted.strip():
        raise MapetError(f"parameter override {assignment!r}: expected FIELD=VALUE, e.g. pretrain.objective=mim")
    *parents, last = dotted.strip().split(".")
    holder = param(params, ".".join(parents)) if parents else params
    if not isinstance(holder, dict) or last not in holder:
        raise MapetError(f"parameter override {assignment!r}: {params.get('_path', 'params')} has no field {dotted!r}")
    try:
        holder[last] = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise MapetError(f"parameter override {assignment!r}: the value is not valid YAML ({error})") from error


def param(params: dict[str, Any], dotted: str) -> Any:
    """``param(p, "pretrain.objective")``; a missing key is an error naming the file and field."""
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise MapetError(f"{params.get('_path', 'params')}: missing field {dotted!r}")
        value = value[part]
    return value


def _number_kind(hint: Any) -> type | None:
    """int or float for a field annotated with it (also ``float | None``); None otherwise."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [kind for kind in options if kind in (int, float)]
    return kinds[0] if len(kinds) == 1 else None


# The range of a setting, by its name in whichever section it appears.
POSITIVE = {"epochs", "batch_size", "micro_batch_size", "lr", "k", "temperature", "iterations", "restarts",
            "shard_size", "checkpoint_every", "keep_checkpoints", "collective_timeout_s", "linear_iterations",
            "sample_images", "max_vectors", "max_points_per_centroid", "images", "codes", "patches_per_code",
            "codebook_images", "num_predict", "mim_min_block", "layer_decay", "crop_pct", "max_size", "min_size",
            "img_size", "patch_size", "depth", "embed_dim", "num_heads"}
NON_NEGATIVE = {"workers", "warmup_epochs", "warmup_lr", "min_lr", "weight_decay", "grad_clip", "color_jitter", "mixup",
                "cutmix", "probe_every", "probe_train_images", "probe_test_images", "max_shards", "train_images",
                "test_images", "min_images_per_class", "linear_weight_decay", "context", "init_values",
                "drop_path_rate"}
AT_MOST_ONE = {"label_smoothing", "reprob", "drop_path_rate", "min_class_share", "layer_decay", "crop_pct"}
CHOICES = {"zero_stage": (0, 1, 2), "objective": ("mapet", "plm", "mim"), "decode": ("cpu", "gpu"),
           "head_init": ("probe", "random")}


def check_range(section: str, name: str, value: Any, source: str = "params") -> None:
    """The range and choices above; a value outside them is an error naming ``section.name``
    (and the file, ``source``)."""
    if name in CHOICES and value not in CHOICES[name]:
        raise MapetError(f"{source}: {section}.{name} must be one of {', '.join(map(str, CHOICES[name]))}, got {value!r}")
    if name in POSITIVE | NON_NEGATIVE and isinstance(value, str):
        try:
            value = float(value)                 # YAML reads 1e-3 as a string
        except ValueError:
            raise MapetError(f"{source}: {section}.{name} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if name in POSITIVE and value <= 0:
        raise MapetError(f"{source}: {section}.{name} must be above 0, got {value!r}")
    if name in NON_NEGATIVE | AT_MOST_ONE and value < 0:
        raise MapetError(f"{source}: {section}.{name} must be at least 0, got {value!r}")
    if name in AT_MOST_ONE and value > 1:
        raise MapetError(f"{source}: {section}.{name} must be at most 1, got {value!r}")


def check_model(model: dict[str, Any]) -> None:
    """params.yaml's ``model``: img_size and patch_size present, sizes whole numbers, all in range."""
    for required in ("img_size", "patch_size"):
        if required not in model:
            raise MapetError(f"params: model.{required} is required")
    for name, value in model.items():
        if name in ("img_size", "patch_size", "depth", "embed_dim", "num_heads") and \
                (not isinstance(value, int) or isinstance(value, bool)):
            raise MapetError(f"params: model.{name} must be a whole number, got {value!r}")
        check_range("model", name, value)


def build_settings(section: str, values: dict[str, Any], cls: type, ignore: tuple[str, ...] = ()) -> Any:
    """``cls(**values)`` for a dataclass of settings, with each number converted to the type its
    field is annotated with (YAML reads ``1e-3`` as a string). An integer field refuses a
    fraction rather than truncating it. Unknown names and bad values are errors naming
    ``section.field``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields - set(ignore)
    if unknown:
        raise MapetError(f"params: unknown setting(s) {', '.join(f'{section}.{name}' for name in sorted(unknown))}")
    typed = {}
    for name, value in values.items():
        if name in ignore:
            continue
        kind = _number_kind(hints[name])
        if kind is None or value is None:
            typed[name] = value
            continue
        try:
            number = float(value)
        except (TypeError, ValueError) as error:
            raise MapetError(f"params: {section}.{name} must be a number, got {value!r}") from error
        if kind is int and not number.is_integer():
            raise MapetError(f"params: {section}.{name} must be a whole number, got {value!r}")
        typed[name] = kind(number)
    for name, value in typed.items():
        check_range(section, name, value)
    return cls(**typed)
