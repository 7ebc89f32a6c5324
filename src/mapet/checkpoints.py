"""Weight files, one floor below the models and the tokenizers that both read them.

- mapet's own model files: safetensors whose header metadata says what they hold (``kind`` and
  what rebuilds the network), written to a temporary name and renamed into place;
- other projects' PyTorch checkpoints, read with torch's safe unpickler;
- the strict fit of a state dict to a module: every weight, nothing more, each shape the module's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mapet.errors import MapetError

STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema")


def write_model_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(partial), metadata=metadata)
    os.replace(partial, path)


def read_model_file(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise MapetError(f"{path}: no such file (expected a {kind} model file written by mapet)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, ValueError, OSError) as error:
        raise MapetError(f"{path}: not a readable safetensors file ({error})") from error
    if metadata.get("kind") != kind:
        raise MapetError(f"{path}: holds a {metadata.get('kind', 'unlabelled')!r} model, expected a {kind!r} model")
    return tensors, metadata


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where in the file it was). The file is read with torch's safe unpickler
    (tensors, containers and the argparse Namespace of the training arguments only)."""
    path = Path(path)
    if not path.is_file():
        raise MapetError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:      # torch raises UnpicklingError, RuntimeError or EOFError for what it cannot read
        raise MapetError(f"{path}: not a PyTorch checkpoint that can be read safely "
                         f"({str(error).splitlines()[0][:200]})") from error
    if _is_state_dict(document):
        found, where = document, "the top level"
    else:
        where = next((key for key in STATE_DICT_KEYS if isinstance(document, dict) and _is_state_dict(document.get(key))),
                     None)
        if where is None:
            keys = ", ".join(map(str, document)) if isinstance(document, dict) else type(document).__name__
            raise MapetError(f"{path}: no state dict at the top level or under {', '.join(STATE_DICT_KEYS)} "
                             f"(the file holds: {keys})")
        found = document[where]
    return {name.removeprefix("module."): tensor for name, tensor in found.items()}, where


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every weight of ``model`` from ``state`` and nothing else, each shape as the model's."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{key} {tuple(state[key].shape)} (the ViT needs {tuple(expected[key].shape)})"
             for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        problems = [f"missing {', '.join(missing[:8])}" if missing else "", f"not expected {', '.join(unexpected[:8])}"
                    if unexpected else "", f"shapes {'; '.join(wrong[:4])}" if wrong else ""]
        raise MapetError(f"{path}: does not fit the model: {'; '.join(p for p in problems if p)}")
    model.load_state_dict({key: tensor.to(expected[key].dtype) for key, tensor in state.items()})
