"""The model registries, and the one promotion gate over them.

- :mod:`mapet.registry.gate`: the rules (:class:`Decision`, the judge, the first model), the
  :class:`Registry` protocol, the :func:`gate` every caller uses, and the decision's report.
- :mod:`mapet.registry.gto`: GTO over DVC's artifacts, in git tags (`dvc repro` runs; ``mapet promote``).
- :mod:`mapet.registry.kubeflow`: Kubeflow Model Registry (the pipeline, with ``registry_url``).
- :mod:`mapet.registry.workspace`: JSON records on the shared workspace (the pipeline without it).
- :mod:`mapet.registry.fingerprint`: a run's fingerprint, and scheduled retraining's skip decision.
"""

from __future__ import annotations

from pathlib import Path

from mapet.registry.gate import Registry


def open_registry(url: str, workspace: Path, model: str) -> Registry:
    """The pipeline's registry: Kubeflow Model Registry at ``url``, else the workspace folder's."""
    if url:
        from mapet.registry.kubeflow import KubeflowRegistry

        return KubeflowRegistry(url, model)
    from mapet.registry.workspace import WorkspaceRegistry

    return WorkspaceRegistry(Path(workspace) / "registry", model)
