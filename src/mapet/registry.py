"""The promotion gate and the model registry of `dvc repro`: DVC's artifacts (``artifacts:`` in
dvc.yaml: ``classifier`` and ``backbone``) versioned and staged by GTO, in git tags.

``mapet promote`` looks at a committed run (a git revision whose dvc.lock and metrics hold an
evaluated classifier): it registers both artifacts at that revision, then compares the
candidate's test top-1 with the champion's (the classifier version in the stage, ``prod`` by
default) on the same test split, and assigns the stage to the candidate only when it wins by at
least ``min_delta``; the first candidate always wins. When the champion was evaluated on other
data, its classifier (from the DVC cache, at its revision) is evaluated again on the candidate's.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from mapet.errors import MapetError

ARTIFACTS = ("classifier", "backbone")
METRICS = "outputs/evaluate/metrics.json"
CLASSIFIER = "outputs/finetune/model.safetensors"


@dataclass
class Decision:
    promoted: bool
    reason: str
    stage: str
    candidate_revision: str
    candidate_version: str
    candidate_top1: float
    champion_version: str | None = None
    champion_revision: str | None = None
    champion_top1: float | None = None
    min_delta: float = 0.0


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


def champion(repo: Path, stage: str) -> tuple[str, str] | None:
    """(version, commit) of the classifier in ``stage``, or None."""
    from gto.api import find_versions_in_stage
    from gto.exceptions import ArtifactNotFound

    try:
        found = find_versions_in_stage(str(repo), "classifier", stage)
    except ArtifactNotFound:
        return None
    found = found[0] if isinstance(found, list) and found else found
    return (found.version, found.commit_hexsha) if found else None


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


def register(repo: Path, revision: str, author: tuple[str, str]) -> str:
    """Registers every artifact at ``revision`` (once); returns the classifier's version."""
    from gto.api import find_latest_version, register as gto_register
    from gto.exceptions import ArtifactNotFound

    commit = _git(repo, "rev-parse", f"{revision}^{{commit}}")
    versions = {}
    for name in ARTIFACTS:
        try:
            latest = find_latest_version(str(repo), name)
        except ArtifactNotFound:
            latest = None
        if latest is not None and latest.commit_hexsha == commit:
            versions[name] = latest.version
        else:
            versions[name] = gto_register(str(repo), name, commit, author=author[0], author_email=author[1]).version
    return versions["classifier"]


def first_model(decision: Decision) -> None:
    decision.promoted, decision.reason = True, f"no classifier in {decision.stage!r} yet: the first model is promoted"


def judge(decision: Decision, recorded_top1: float | None, reevaluate: Callable[[], float]) -> None:
    """Sets the champion's test top-1 and the verdict: the champion's ``recorded_top1`` when it was
    evaluated on the candidate's data version and split, else ``reevaluate()`` on the candidate's."""
    if recorded_top1 is not None:
        decision.champion_top1, where = float(recorded_top1), "its recorded evaluation on the same data version"
    else:
        decision.champion_top1 = float(reevaluate())
        where = "evaluated again on the candidate's data version"
    margin = decision.candidate_top1 - decision.champion_top1
    decision.promoted = margin >= decision.min_delta
    decision.reason = (f"test top-1 {decision.candidate_top1:.4f} against the champion's {decision.champion_top1:.4f} "
                       f"({where}): {margin:+.4f}, {'at least' if decision.promoted else 'less than'} min_delta "
                       f"{decision.min_delta}")


def promote(repo: Path, revision: str, data: Path, stage: str, min_delta: float, crop_pct: float) -> Decision:
    from gto.api import assign

    repo = Path(repo)
    candidate, candidate_data = evaluated(repo, revision)
    commit = _git(repo, "rev-parse", f"{revision}^{{commit}}")
    author = (_git_config(repo, "user.name") or "mapet promote", _git_config(repo, "user.email") or "mapet@localhost")
    version = register(repo, commit, author)
    decision = Decision(False, "", stage, commit, version, float(candidate["top1"]), min_delta=min_delta)
    current = champion(repo, stage)
    if current is None:
        first_model(decision)
    else:
        decision.champion_version, decision.champion_revision = current
        if current[1] == commit:
            decision.champion_top1 = decision.candidate_top1
            decision.reason = f"the candidate is already the {stage!r} classifier"
        else:
            reference, reference_data = evaluated(repo, current[1])
            same = reference_data == candidate_data and reference.get("split") == candidate.get("split")
            judge(decision, reference["top1"] if same else None,
                  lambda: reevaluate(repo, current[1], data, candidate.get("split", "test"), crop_pct))
    if decision.promoted:
        for name in ARTIFACTS:
            assign(str(repo), name, stage, ref=commit, skip_registration=True, author=author[0],
                   author_email=author[1])
    return decision


def _git_config(repo: Path, key: str) -> str:
    return subprocess.run(["git", "config", key], cwd=repo, capture_output=True, text=True).stdout.strip()


def decision_markdown(decision: Decision) -> str:
    verdict = "**promoted**" if decision.promoted else "**not promoted** (registered only)"
    champion_line = (f"| champion | {decision.champion_version} at `{decision.champion_revision[:12]}`, test top-1 "
                     f"{decision.champion_top1:.4f} |" if decision.champion_version else "| champion | none |")
    return "\n".join([f"# Promotion to {decision.stage!r}: {verdict}", "", "| | |", "|---|---|",
                      f"| candidate | classifier {decision.candidate_version} at `{decision.candidate_revision[:12]}`, "
                      f"test top-1 {decision.candidate_top1:.4f} |", champion_line,
                      f"| min_delta | {decision.min_delta} |", f"| reason | {decision.reason} |", ""])


def write_decision(decision: Decision, out: Path) -> None:
    from mapet.files import write_json, write_text

    write_json(out / "decision.json", asdict(decision))
    write_text(out / "decision.md", decision_markdown(decision))
