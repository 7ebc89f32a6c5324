"""The promotion gate's run-time part: keep the candidate's models on the workspace (where a later
gate re-evaluates a champion), describe the candidate for the registry, and let
:func:`mapet.registry.gate.gate` decide."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mapet.params import load_params, param
from mapet.registry import open_registry
from mapet.registry.fingerprint import training_params
from mapet.registry.gate import Decision, Properties, gate


def keep_models(workspace: Path, run_id: str, classifier: Path, backbone: Path) -> tuple[Path, Path]:
    """Copies both models to ``<workspace>/models/<run_id>/``, whole or not at all."""
    target = Path(workspace) / "models" / run_id
    if not target.is_dir():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        shutil.copy(classifier, partial / "classifier.safetensors")
        shutil.copy(backbone, partial / "backbone.safetensors")
        partial.rename(target)
    return target / "classifier.safetensors", target / "backbone.safetensors"


def candidate(described: dict[str, Any], params: dict[str, Any], evaluated: dict[str, float], split: str,
              kept: tuple[Path, Path], backbone_uri: str, run_id: str) -> Properties:
    """The candidate's registry properties: where it came from, what it scored, where it lies."""
    properties: Properties = {
        "fingerprint": described["fingerprint"], "git_commit": described["git_commit"],
        "repo_url": described["repo_url"], "data_md5": described["data_md5"],
        "code_revision": described["code_revision"], "split": split, "top1": float(evaluated["top1"]),
        "classifier_path": str(kept[0]), "backbone_path": str(kept[1]), "backbone_uri": backbone_uri,
        "pipeline_run": run_id, "params": json.dumps(training_params(params), sort_keys=True, default=str)}
    if "top5" in evaluated:
        properties["top5"] = float(evaluated["top5"])
    return properties


def run_gate(described: dict[str, Any], params_file: Path, evaluated: dict[str, float], classifier: Path,
             classifier_uri: str, backbone: Path, backbone_uri: str, registry_url: str, registry_model: str,
             workspace: Path, run_id: str) -> Decision:
    from mapet.engine.evaluate import run_evaluate

    params = load_params(params_file)
    split, crop_pct = param(params, "evaluate.split"), param(params, "evaluate.crop_pct")

    def reevaluate(champion_classifier: str) -> float:
        with tempfile.TemporaryDirectory() as scratch:
            return run_evaluate(Path(champion_classifier), Path(described["path"]), split, Path(scratch), crop_pct,
                                progress=False)["top1"]

    kept = keep_models(workspace, run_id, classifier, backbone)
    return gate(open_registry(registry_url, workspace, registry_model),
                candidate(described, params, evaluated, split, kept, backbone_uri, run_id), classifier_uri,
                param(params, "pipeline.promotion.stage"), float(param(params, "pipeline.promotion.min_delta")),
                reevaluate)
