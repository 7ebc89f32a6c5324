"""What scheduled retraining in the Kubeflow pipeline decides, and where it records it.

A run's **fingerprint** is the hash of what determines the trained model: the data version
(data.dvc's md5), the effective parameters (overrides and preset applied; the ``pipeline`` section,
which only says how and when to run, left out) and the code that trains (the mapet package's
sources and the versions of the libraries it trains with). When the registry already holds a model
of that fingerprint, the pipeline skips tokenizer-to-evaluate.

The **registry** is Kubeflow Model Registry when the pipeline's ``registry_url`` is set, else
one JSON file per version on the shared workspace volume (``<workspace>/registry/<model>/``).
Every evaluated candidate is registered; the **gate** gives it the stage (``prod``) only when its
test top-1 beats the champion's by ``pipeline.promotion.min_delta`` (the rules of
:mod:`mapet.registry`, which ``mapet promote`` applies to GTO's registry).
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol

from mapet.errors import MapetError
from mapet.files import write_json
from mapet.registry import Decision, first_model, judge

# Parameter sections that do not change the trained model: how and when the pipeline runs, the
# presets not chosen (the chosen one is merged into the sections by load_params), and where the
# parameters file was read from.
NOT_TRAINING = ("pipeline", "presets", "_path")
TRAINING_LIBRARIES = ("torch", "torchvision", "timm", "deepspeed", "open_clip_torch", "faiss-cpu")
FORMAT = ("safetensors", "1")
NO_STAGE = "none"
# Every value is a string, a number or a boolean: what Model Registry's custom properties hold.
Properties = dict[str, "str | float | bool"]


def code_revision() -> str:
    """16 hex of the sha256 of the mapet package's sources and the training libraries' versions."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
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


class Registry(Protocol):
    where: str

    def versions(self) -> list[Properties]:
        """Every version as its properties, ``version`` and ``uri`` included, oldest first."""

    def register(self, version: str, properties: Properties, uri: str) -> None:
        """Registers ``version`` (a new one, see :func:`next_version`) of the model at ``uri``."""

    def set_stage(self, version: str, stage: str) -> None:
        """Sets the version's ``stage`` property (:data:`NO_STAGE` takes the stage away)."""


class WorkspaceRegistry:
    """One JSON file per version in ``root/<model>/`` (the shared workspace volume): the registry
    of clusters without Kubeflow Model Registry, and of kfp.local runs."""

    def __init__(self, root: Path, model: str):
        self.folder = Path(root) / model
        self.where = f"the workspace registry {self.folder}"

    def _file(self, version: str) -> Path:
        return self.folder / f"{version}.json"

    def versions(self) -> list[Properties]:
        records = []
        for path in self.folder.glob("v*.json"):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as error:
                raise MapetError(f"{path}: unreadable registry record ({error}); move it aside to go on") from error
        return oldest_first(records)

    def register(self, version: str, properties: Properties, uri: str) -> None:
        try:
            write_json(self._file(version), {**properties, "version": version, "uri": uri}, exclusive=True)
        except FileExistsError as error:
            raise MapetError(f"{self._file(version)} exists already: another run registered {version} at the same "
                             f"time; run this one again") from error

    def set_stage(self, version: str, stage: str) -> None:
        record = json.loads(self._file(version).read_text())
        write_json(self._file(version), {**record, "stage": stage})


class KubeflowRegistry:
    """Kubeflow Model Registry through its Python client: the registered model ``model``, one
    version per candidate with its classifier's URI as the model artifact and every property as
    the version's custom properties (shown in the Model Registry UI)."""

    def __init__(self, url: str, model: str, author: str = "mapet pipeline"):
        from model_registry import ModelRegistry

        self.model, self.where = model, f"Kubeflow Model Registry {url}, model {model!r}"
        try:
            self.client = ModelRegistry(url, author=author)
        except Exception as error:      # the client raises its own kinds, and aiohttp's, for an unreachable server
            raise MapetError(f"cannot reach Kubeflow Model Registry at {url} ({type(error).__name__}: {error}); "
                             f"check the pipeline's registry_url (http://HOST:PORT inside the cluster)") from error

    def versions(self) -> list[Properties]:
        if self.client.get_registered_model(self.model) is None:
            return []
        records = [{**(version.custom_properties or {}), "version": version.name}
                   for version in self.client.get_model_versions(self.model)]
        for record in records:
            artifact = self.client.get_model_artifact(self.model, str(record["version"]))
            record["uri"] = artifact.uri if artifact else ""
        return oldest_first(records)

    def register(self, version: str, properties: Properties, uri: str) -> None:
        self.client.register_model(self.model, uri, model_format_name=FORMAT[0], model_format_version=FORMAT[1],
                                   version=version, metadata=properties,
                                   version_description=f"MaPeT classifier, fingerprint {properties['fingerprint']}")

    def set_stage(self, version: str, stage: str) -> None:
        found = self.client.get_model_version(self.model, version)
        found.custom_properties = {**(found.custom_properties or {}), "stage": stage}
        self.client.update(found)


def oldest_first(records: list[Properties]) -> list[Properties]:
    return sorted(records, key=lambda record: int(str(record["version"])[1:]))


def next_version(records: list[Properties]) -> str:
    """``v<N+1>`` after N versions."""
    return f"v{len(records) + 1}"


def open_registry(url: str, workspace: Path, model: str) -> Registry:
    return KubeflowRegistry(url, model) if url else WorkspaceRegistry(Path(workspace) / "registry", model)


def version_table(registry: Registry) -> str:
    """The registry's versions, newest first, as a plain-text table."""
    columns = ("version", "stage", "test top-1", "data", "commit", "fingerprint", "pipeline run")
    rows = [(str(record["version"]), str(record.get("stage", NO_STAGE)), f"{float(record['top1']):.4f}",
             str(record.get("data_md5", ""))[:8], str(record.get("git_commit", ""))[:12],
             str(record.get("fingerprint", ""))[:16], str(record.get("pipeline_run", "")))
            for record in reversed(registry.versions())]
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [columns, *rows]]
    return "\n".join(lines) if rows else f"{registry.where}: no versions yet"


def holding(records: list[Properties], stage: str) -> Properties | None:
    """The latest of ``records`` (oldest first) in ``stage``: the champion."""
    return next((record for record in reversed(records) if record.get("stage") == stage), None)


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


def gate(registry: Registry, candidate: Properties, uri: str, stage: str, min_delta: float,
         reevaluate: Callable[[str], float]) -> Decision:
    """Registers the candidate (``candidate``: its properties, with at least fingerprint, top1,
    split, data_md5, git_commit and classifier_path), then gives it ``stage`` when it beats the
    champion by ``min_delta``; ``reevaluate(classifier_path)`` gives the champion's test top-1 on
    the candidate's data when the champion was evaluated on other data."""
    records = registry.versions()
    current, version = holding(records, stage), next_version(records)
    registry.register(version, {**candidate, "stage": NO_STAGE}, uri)
    decision = Decision(False, "", stage, str(candidate.get("git_commit", "")), version, float(candidate["top1"]),
                        min_delta=min_delta)
    if current is None:
        first_model(decision)
    else:
        decision.champion_version, decision.champion_revision = str(current["version"]), str(current.get("git_commit"))
        same = current.get("data_md5") == candidate["data_md5"] and current.get("split") == candidate["split"]
        judge(decision, current["top1"] if same else None, lambda: reevaluate(str(current["classifier_path"])))
    if decision.promoted:
        if current is not None:
            registry.set_stage(str(current["version"]), NO_STAGE)
        registry.set_stage(version, stage)
    return decision
