"""The promotion rules, and the one gate that applies them to any registry.

Every evaluated candidate is registered; the gate gives it the stage (``prod``) only when its
test top-1 beats the champion's (the latest version in that stage) by ``min_delta``. The first
candidate always wins. A champion evaluated on other data, or on another split, is evaluated
again on the candidate's before the two are compared. ``mapet promote`` calls :func:`gate` over
GTO's registry (:mod:`mapet.registry.gto`), the pipeline's promotion step over Kubeflow Model
Registry or the workspace folder (:mod:`mapet.registry.kubeflow`, :mod:`mapet.registry.workspace`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

# Every value is a string, a number or a boolean: what Model Registry's custom properties hold.
Properties = dict[str, "str | float | bool"]
NO_STAGE = "none"


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


class Registry(Protocol):
    where: str

    def versions(self) -> list[Properties]:
        """Every version as its properties (``version``, ``stage``, ``top1``, ``split``, ``data_md5``,
        ``git_commit`` and ``classifier_path`` at least), oldest first."""

    def register(self, version: str, properties: Properties, uri: str) -> str:
        """Registers the model at ``uri`` as ``version`` (the gate's proposal, :func:`next_version`);
        returns the name the version got (a registry that names its own returns that)."""

    def set_stage(self, version: str, stage: str) -> None:
        """Gives the version ``stage`` (:data:`NO_STAGE` takes the stage away)."""


def oldest_first(records: list[Properties]) -> list[Properties]:
    return sorted(records, key=lambda record: int(str(record["version"])[1:]))


def next_version(records: list[Properties]) -> str:
    """``v<N+1>`` after N versions."""
    return f"v{len(records) + 1}"


def holding(records: list[Properties], stage: str) -> Properties | None:
    """The latest of ``records`` (oldest first) in ``stage``: the champion."""
    return next((record for record in reversed(records) if record.get("stage") == stage), None)


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


def gate(registry: Registry, candidate: Properties, uri: str, stage: str, min_delta: float,
         reevaluate: Callable[[str], float]) -> Decision:
    """Registers the candidate (``candidate``: its properties, with at least top1, split, data_md5
    and git_commit), then gives it ``stage`` when it beats the champion by ``min_delta``;
    ``reevaluate(classifier_path)`` gives the champion's test top-1 on the candidate's data when
    the champion was evaluated on other data."""
    records = registry.versions()
    current = holding(records, stage)
    version = registry.register(next_version(records), {**candidate, "stage": NO_STAGE}, uri)
    decision = Decision(False, "", stage, str(candidate.get("git_commit", "")), version, float(candidate["top1"]),
                        min_delta=min_delta)
    if current is None:
        first_model(decision)
    else:
        decision.champion_version, decision.champion_revision = str(current["version"]), str(current.get("git_commit"))
        if decision.champion_version == version:
            decision.champion_top1 = decision.candidate_top1
            decision.reason = f"the candidate is already the {stage!r} classifier"
            return decision
        same = current.get("data_md5") == candidate["data_md5"] and current.get("split") == candidate["split"]
        judge(decision, current["top1"] if same else None, lambda: reevaluate(str(current["classifier_path"])))
    if decision.promoted:
        if current is not None:
            registry.set_stage(str(current["version"]), NO_STAGE)
        registry.set_stage(version, stage)
    return decision


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
