"""The pipeline's first step: the repository at a git revision, its DVC-pinned data pulled onto
the shared workspace, and its params.yaml with the run's overrides.

Data is stored by content, under ``<workspace>/data/<md5 of data.dvc's output>``, so runs of the
same data version (every scheduled run until data.dvc changes) pull it once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import yaml

from components.runtime import StepError, mapet

COMPLETE = ".complete"


def _run(argv: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise StepError(f"`{' '.join(argv)}` failed with status {result.returncode}:\n{result.stderr.strip()}")
    return result.stdout.strip()


def pinned_md5(checkout: Path) -> str:
    dvc_file = checkout / "data.dvc"
    if not dvc_file.is_file():
        raise StepError(f"{dvc_file.name} not found at this revision: the repository pins no data")
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise StepError(f"{dvc_file.name}: expected one output with an md5, found {outs!r}")
    return outs[0]["md5"].removesuffix(".dir")


def materialize(repo_url: str, git_rev: str, workspace: str | Path, dvc_remote: str, overrides: list[str],
                params_out: str | Path) -> dict[str, Any]:
    """Returns the data's description: its path on the workspace, the commit and the md5."""
    workspace = Path(workspace)
    checkout = workspace / "tmp" / f"checkout-{uuid.uuid4().hex[:12]}"
    checkout.parent.mkdir(parents=True, exist_ok=True)
    try:
        _run(["git", "clone", "--quiet", "--no-checkout", repo_url, str(checkout)])
        _run(["git", "checkout", "--quiet", git_rev], cwd=checkout)
        commit = _run(["git", "rev-parse", "HEAD"], cwd=checkout)
        md5 = pinned_md5(checkout)
        target = workspace / "data" / md5
        if (target / COMPLETE).is_file():
            print(f"data {md5} is already on the workspace: {target}")
        else:
            if dvc_remote:
                _run(["dvc", "remote", "add", "--local", "--force", "--default", "pipeline", dvc_remote], cwd=checkout)
            print(f"pulling data {md5} of {repo_url}@{commit[:12]}", flush=True)
            _run(["dvc", "pull", "--quiet", "data.dvc"], cwd=checkout)
            (checkout / "data" / COMPLETE).write_text(commit + "\n")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(checkout / "data", target)
            except OSError:
                if not (target / COMPLETE).is_file():                 # not a concurrent run's finished copy
                    raise
        mapet("params", "--params", checkout / "params.yaml", *[f"--set={o}" for o in overrides], "--out", params_out)
        return {"path": str(target), "git_commit": commit, "data_md5": md5, "repo_url": repo_url}
    finally:
        shutil.rmtree(checkout, ignore_errors=True)
