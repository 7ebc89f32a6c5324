from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def materialize_data(repo_url: str, git_rev: str, workspace: str, dvc_remote: str, param_overrides: list,
                     git_secret: str, data: Output[Dataset], params: Output[Artifact],
                     dvc_secret: str = "mapet-dvc-remote") -> str:
    """Checks out `git_rev` of `repo_url` (a private one with the credentials of the Kubernetes
    Secret `git_secret`, from the environment), pulls its DVC-pinned data onto the workspace
    (remote credentials likewise from the DVC remote's Secret `dvc_secret`) and writes its params.yaml with
    `param_overrides` (["pretrain.objective=mim", ...], as `dvc exp run -S`). Returns the run's
    fingerprint: what determines the model (data version, effective parameters, code)."""
    import shutil
    from pathlib import Path

    from components.data.materialize import materialize

    described = materialize(repo_url, git_rev, workspace, dvc_remote, list(param_overrides), params.path, git_secret,
                            dvc_secret)
    shutil.copy(Path(described["path"]) / "dataset.json", data.path)
    data.metadata.update(described)
    params.metadata.update({"git_commit": described["git_commit"], "overrides": list(param_overrides)})
    return described["fingerprint"]
