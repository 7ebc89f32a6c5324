"""A run's fingerprint, and the skip decision of scheduled retraining that it serves.

A run's **fingerprint** is the hash of what determines the trained model: the data version
(data.dvc's md5), the effective parameters (overrides and preset applied; the ``pipeline`` section,
which only says how and when to run, left out) and the code that trains (the mapet package's
sources and the versions of the libraries it trains with). When the registry already holds a model
of that fingerprint, the pipeline skips tokenizer-to-evaluate.

The registries and the promotion gate are the rest of :mod:`mapet.registry`.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from mapet.registry.gate import NO_STAGE, Registry

# Parameter sections that do not change the trained model: how and when the pipeline runs, the
# presets not chosen (the chosen one is merged into the sections by load_params), and where the
# parameters file was read from.
NOT_TRAINING = ("pipeline", "presets", "_path")
TRAINING_LIBRARIES = ("torch", "torchvision", "timm", "deepspeed", "open_clip_torch", "faiss-cpu")


def code_revision() -> str:
    """16 hex of the sha256 of the mapet package's sources and the training libraries' versions."""
    digest = hashlib.sha256()
    package = Path(__file__).parents[1]
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes() + b"\0")
    for name in TRAINING_LIBRARIES:
        try:
            digest.update(f"{name}=={metadata.version(name)}\0".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} absent\0".encode())
    return digest.hexdigest()[:16]


def training_params(params: dict[str, Any]) -> dict[str, Any]:
    return {section: values for section, values in params.items() if section not in NOT_TRAINING}


def fingerprint(data_md5: str, params: dict[str, Any], code: str) -> str:
    """The sha256 of what determines the model: data version, effective parameters, code revision."""
    document = json.dumps({"data": data_md5, "params": training_params(params), "code": code}, sort_keys=True,
                          default=str)
    return hashlib.sha256(document.encode()).hexdigest()


def skip_decision(registry: Registry, run_fingerprint: str, force: bool) -> tuple[bool, str]:
    """(skip?, the reason as Markdown) for a run of ``run_fingerprint``."""
    found = next((record for record in registry.versions() if record.get("fingerprint") == run_fingerprint), None)
    head = f"| fingerprint | `{run_fingerprint[:16]}` |\n| registry | {registry.where} |\n"
    if found is None:
        return False, (f"# Training\n\nNo model of this fingerprint in the registry: the data, the parameters or the "
                       f"code changed since the last registered run.\n\n| | |\n|---|---|\n{head}")
    described = (f"| registered as | {found['version']} (stage: {found.get('stage', NO_STAGE)}, test top-1 "
                 f"{float(found['top1']):.4f}) |\n| from commit | `{found.get('git_commit', '?')}` |\n")
    if force:
        return False, (f"# Training (forced)\n\nThe registry holds a model of this fingerprint, but the run was "
                       f"started with `force=True`.\n\n| | |\n|---|---|\n{head}{described}")
    return True, (f"# Skipped: nothing changed\n\nThe registry already holds a model trained on the same data "
                  f"version, parameters and code, so tokenizer, pre-training, fine-tuning, evaluation and the gate "
                  f"did not run. Start the pipeline with `force=True` to train all the same.\n\n| | |\n|---|---|\n"
                  f"{head}{described}")
