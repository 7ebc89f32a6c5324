"""The run summary the Kubeflow UI shows last: what the run trained on, what it changed, and what
came out of each step, as Markdown."""

from __future__ import annotations

from typing import Any

# The numbers worth a line, per step, in this order; a step's other numbers stay in its Metrics.
SHOWN = {"pre-training": ("loss", "token_accuracy", "knn_top1", "steps", "images_per_s"),
         "probe, pre-trained backbone": ("knn_top1", "linear_top1", "pixels_knn_top1", "pixels_linear_top1"),
         "probe, random initialisation": ("knn_top1", "linear_top1"),
         "fine-tuning": ("loss", "steps"),
         "evaluation": ("top1", "top5", "images")}


def run_summary(data: dict[str, Any], overrides: list[str], steps: dict[str, dict[str, float]], decision: str) -> str:
    """``data``: the data step's description (repo_url, git_commit, data_md5, fingerprint, path);
    ``overrides``: the run's parameter overrides (what differs from the repository's params.yaml);
    ``steps``: step name (a key of :data:`SHOWN`) -> its logged metrics; ``decision``: the
    promotion gate's Markdown, shown under the numbers."""
    changed = ", ".join(f"`{override}`" for override in overrides) or "none: the repository's params.yaml as it is"
    lines = ["# MaPeT run summary", "", "| | |", "|---|---|",
             f"| repository | {data.get('repo_url', '?')} |",
             f"| commit | `{data.get('git_commit', '?')}` |",
             f"| data version (data.dvc md5) | `{data.get('data_md5', '?')}` |",
             f"| fingerprint (data, parameters, code) | `{str(data.get('fingerprint', '?'))[:16]}` |",
             f"| parameters changed for this run | {changed} |", "",
             "| step | metric | value |", "|---|---|---|"]
    for step, keys in SHOWN.items():
        for key in keys:
            if key in steps.get(step, {}):
                value = steps[step][key]
                shown = f"{value:.0f}" if key in ("steps", "images", "images_per_s") else f"{value:.4f}"
                lines.append(f"| {step} | {key} | {shown} |")
    return "\n".join(lines) + "\n\n" + decision.replace("# ", "## ", 1)
