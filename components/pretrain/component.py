from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretrain(data: Input[Dataset], tokens: Input[Dataset], params: Input[Artifact], backbone: Output[Model],
             model: Output[Model], metrics: Output[Metrics], curves: Output[HTML], backend: str, workspace: str, run_id: str,
             task_name: str, namespace: str = "", image: str = "", runtime: str = "torch-distributed",
             runtime_kind: str = "ClusterTrainingRuntime", num_nodes: int = 1, proc_per_node: int = 1,
             gpus_per_node: int = 0, node_selector: dict = {}, tolerations: list = [],
             workspace_pvc: str = "mapet-workspace", timeout_minutes: int = 0):
    """`mapet pretrain` as a Kubeflow Trainer TrainJob (backend "trainjob": numNodes x numProcPerNode
    processes on the torch-distributed runtime, the workspace volume mounted) or in place under
    torchrun (backend "local"). Re-attaches to its TrainJob when the step is retried. Outputs the
    timm backbone, the whole pre-training model (token head included, for `mapet pictures`) and
    its loss, lr and k-NN monitor curves."""
    import shutil
    import tempfile
    from pathlib import Path

    from components import IMAGE
    from components.pretrain.launcher import launch_pretraining, trainjob_name
    from components.runtime import log_json_metrics
    from mapet.engine.curves import write_curves

    if not namespace and Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").is_file():
        namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
    out = launch_pretraining(
        backend=backend, data_dir=data.metadata["path"], tokens_dir=tokens.path, params_file=params.path,
        workspace=workspace, job_name=trainjob_name(run_id, task_name), proc_per_node=proc_per_node,
        timeout_seconds=timeout_minutes * 60,
        request={"namespace": namespace or "default", "image": image or IMAGE, "runtime": runtime, "runtime_kind": runtime_kind,
                 "num_nodes": num_nodes, "gpus_per_node": gpus_per_node, "node_selector": dict(node_selector),
                 "tolerations": list(tolerations), "workspace_pvc": workspace_pvc, "workspace_path": workspace})
    shutil.copy(out / "backbone.safetensors", backbone.path)
    shutil.copy(out / "model.safetensors", model.path)
    document = log_json_metrics(metrics, out / "metrics.json")
    page = write_curves(out / "history.json", Path(tempfile.mkdtemp()), f"pre-training ({document['objective']})")
    shutil.copy(page, curves.path)
    for artifact in (backbone, model):
        artifact.metadata.update({"objective": document["objective"], "steps": document["steps"], "backend": backend})
