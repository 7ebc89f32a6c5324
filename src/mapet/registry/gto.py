"""GTO's registry: the DVC artifacts of dvc.yaml (``classifier`` and ``backbone``) versioned and
staged in git tags, the registry of `dvc repro` runs, and ``mapet promote`` over it.

A version is a commit whose dvc.lock and metrics hold an evaluated classifier: its test top-1,
split and data version (data.dvc's md5) are read from that commit, and its classifier is
``<commit>:outputs/finetune/model.safetensors`` in DVC. ``mapet promote`` registers
both artifacts at a committed run's revision (once: promoting the same revision again registers
nothing new) and passes it through :func:`mapet.registry.gate.gate`; a champion of other data is
read from the DVC cache at its revision and evaluated again on the candidate's data.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mapet.errors import MapetError
from mapet.registry.gate import NO_STAGE, Decision, Properties, gate

ARTIFACTS = ("classifier", "backbone")
METRICS = "outputs/evaluate/metrics.json"
CLASSIFIER = "outputs/finetune/model.safetensors"


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if result.returncode:
        raise MapetError(f"{repo}: `git {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout.strip()


def committed(repo: Path, revision: str, path: str) -> str:
    """The file at ``path`` as committed at ``revision``; an error that says to commit the run."""
    result = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=repo, capture_output=True, text=True)
    if result.returncode:
        raise MapetError(f"{repo}: {path} is not committed at {revision}: run `dvc repro`, then commit dvc.lock and "
                         f"the metrics (git add dvc.lock outputs reports && git commit) before promoting")
    return result.stdout


def evaluated(repo: Path, revision: str) -> tuple[dict[str, Any], str]:
    """(the evaluation's metrics, the data version: data.dvc's md5) at ``revision``."""
    metrics = json.loads(committed(repo, revision, METRICS))
    outs = (yaml.safe_load(committed(repo, revision, "data.dvc")) or {}).get("outs") or [{}]
    return metrics, str(outs[0].get("md5", ""))


def reevaluate(repo: Path, revision: str, data: Path, split: str, crop_pct: float) -> float:
    """Test top-1 of the classifier committed at ``revision`` (read from DVC) on ``data``."""
    import dvc.api

    from mapet.engine.evaluate import run_evaluate

    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "champion.safetensors"
        try:
            with dvc.api.open(CLASSIFIER, repo=str(repo), rev=revision, mode="rb") as source:
                model.write_bytes(source.read())
        except Exception as error:      # DVC raises its own kinds for a missing cache or remote
            raise MapetError(f"{repo}: cannot read the champion's {CLASSIFIER} at {revision[:12]} from DVC "
                             f"({str(error).splitlines()[0]}): `dvc pull` it, or `dvc fetch --rev {revision[:12]}`") \
                from error
        return run_evaluate(model, data, split, Path(scratch) / "evaluate", crop_pct, progress=False)["top1"]


class GTORegistry:
    """The ``classifier`` artifact's versions in ``repo``'s git tags, as the gate sees a registry;
    registering and staging a version does the same to the ``backbone`` of its commit."""

    def __init__(self, repo: Path, stage: str):
        self.repo, self.stage = Path(repo), stage
        self.where = f"GTO's registry in {self.repo} (git tags)"
        self.commits: dict[str, str] = {}            # version -> commit, of the versions seen or registered
        self.author = (_git_config(self.repo, "user.name") or "mapet promote",
                       _git_config(self.repo, "user.email") or "mapet@localhost")

    def versions(self) -> list[Properties]:
        from gto.api import find_latest_version, find_versions_in_stage
        from gto.exceptions import ArtifactNotFound

        try:
            found = find_latest_version(str(self.repo), "classifier", all=True) or []
            staged = find_versions_in_stage(str(self.repo), "classifier", self.stage)
        except ArtifactNotFound:
            return []
        staged = staged[0] if isinstance(staged, list) and staged else staged
        self.commits.update({version.version: version.commit_hexsha for version in found})
        records = []
        for version in reversed(found):                                   # GTO lists the newest first
            metrics, data_md5 = evaluated(self.repo, version.commit_hexsha)
            records.append({"version": version.version, "git_commit": version.commit_hexsha,
                            "stage": self.stage if staged and staged.version == version.version else NO_STAGE,
                            "top1": float(metrics["top1"]), "split": metrics.get("split", "test"),
                            "data_md5": data_md5, "classifier_path": f"{version.commit_hexsha}:{CLASSIFIER}"})
        return records

    def register(self, version: str, properties: Properties, uri: str) -> str:
        """Registers every artifact at the candidate's commit, once; GTO names the versions
        (the next patch version), so ``version`` goes unused. Returns the classifier's."""
        from gto.api import find_latest_version, register
        from gto.exceptions import ArtifactNotFound

        commit, names = str(properties["git_commit"]), {}
        for name in ARTIFACTS:
            try:
                latest = find_latest_version(str(self.repo), name)
            except ArtifactNotFound:
                latest = None
            if latest is not None and latest.commit_hexsha == commit:
                names[name] = latest.version
            else:
                names[name] = register(str(self.repo), name, commit, author=self.author[0],
                                       author_email=self.author[1]).version
        self.commits[names["classifier"]] = commit
        return names["classifier"]

    def set_stage(self, version: str, stage: str) -> None:
        """Assigns ``stage`` to every artifact at the version's commit. Taking a stage away
        (:data:`NO_STAGE`) writes nothing: a GTO stage is held by the version assigned to it last."""
        from gto.api import assign

        if stage == NO_STAGE:
            return
        for name in ARTIFACTS:
            assign(str(self.repo), name, stage, ref=self.commits[version], skip_registration=True, author=self.author[0],
                   author_email=self.author[1])


def promote(repo: Path, revision: str, data: Path, stage: str, min_delta: float, crop_pct: float) -> Decision:
    """The gate over GTO's registry for the run committed at ``revision``."""
    repo = Path(repo)
    metrics, data_md5 = evaluated(repo, revision)
    commit = _git(repo, "rev-parse", f"{revision}^{{commit}}")
    candidate = {"git_commit": commit, "top1": float(metrics["top1"]), "split": metrics.get("split", "test"),
                 "data_md5": data_md5}
    return gate(GTORegistry(repo, stage), candidate, f"{commit}:{CLASSIFIER}", stage, min_delta,
                lambda where: reevaluate(repo, where.split(":")[0], data, str(candidate["split"]), crop_pct))


def _git_config(repo: Path, key: str) -> str:
    return subprocess.run(["git", "config", key], cwd=repo, capture_output=True, text=True).stdout.strip()
