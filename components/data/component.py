from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def materialize_data(repo_url: str, git_rev: str, workspace: str, dvc_remote: str, param_overrides: list,
                     data: Output[Dataset], params: Output[Artifact]):
    """Checks out `git_rev` of `repo_url`, pulls its DVC-pinned data onto the workspace (remote
    credentials come from the environment, i.e. the DVC remote's Kubernetes Secret) and writes
    its params.yaml with `param_overrides` (["pretrain.objective=mim", ...], as `dvc exp run -S`)."""
    import shutil
    from pathlib import Path

    from components.data.materialize import materialize

    described = materialize(repo_url, git_rev, workspace, dvc_remote, list(param_overrides), params.path)
    shutil.copy(Path(described["path"]) / "dataset.json", data.path)
    data.metadata.update(described)
    params.metadata.update({"git_commit": described["git_commit"], "overrides": list(param_overrides)})
