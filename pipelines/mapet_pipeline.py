"""The MaPeT pipeline for Kubeflow Pipelines: the `dvc repro` stages as kfp v2 components, after a
first step that materialises the DVC-pinned data of a git revision on the shared workspace.

    python -m pipelines.mapet_pipeline      # compiles to pipelines/mapet_pipeline.yaml (commit it)
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input

from components.data.component import materialize_data
from components.data.materialize import DVC_SECRET_KEYS as DVC_VARIABLES
from components.data.materialize import GIT_SECRET_KEYS
from components.evaluate.component import evaluate
from components.finetune.component import finetune
from components.pictures.component import pictures
from components.pretrain.component import pretrain
from components.probe.component import probe
from components.registry.component import check_registry, promotion_gate
from components.summary.component import summarize
from components.tokenize.component import tokenize
from components.tokenizer.component import build_tokenizer
from components.validate.component import validate

COMPILED = Path(__file__).with_name("mapet_pipeline.yaml")
WORKSPACE_MOUNT = "/workspace"
# Keys of the DVC remote's Secret (k8s/templates/dvc-remote-secret.yaml), exposed as the
# environment variables DVC's S3 remote reads.
DVC_SECRET_KEYS = {key: key for key in DVC_VARIABLES}


@dsl.pipeline(name="train-and-promote", description="k-CLIP tokenizer -> tokenize -> pre-train (TrainJob) -> probe, "
                                                     "pictures, fine-tune -> evaluate -> promotion gate -> summary.")
def train_and_promote(data: Input[Dataset], params: Input[Artifact], workspace: str, workspace_pvc: str, backend: str,
                      namespace: str, runtime: str, runtime_kind: str, num_nodes: int, proc_per_node: int,
                      gpus_per_node: int, step_gpus: int, node_selector: dict, tolerations: list,
                      pretrain_timeout_minutes: int, registry_url: str, registry_model: str):
    """What a changed fingerprint trains. A pipeline of its own because kfp (2.17) gives a dsl.If
    group only the channels of its tasks' inputs, not those of their settings (step_gpus)."""
    codebook_step = build_tokenizer(data=data, params=params).set_display_name("k-CLIP tokenizer")
    tokens_step = tokenize(data=data, params=params, codebook=codebook_step.outputs["codebook"]) \
        .set_display_name("tokenize")
    pretrain_step = pretrain(
        data=data, tokens=tokens_step.outputs["tokens"], params=params, backend=backend, workspace=workspace,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER, namespace=namespace,
        runtime=runtime, runtime_kind=runtime_kind, num_nodes=num_nodes, proc_per_node=proc_per_node,
        gpus_per_node=gpus_per_node, node_selector=node_selector, tolerations=tolerations,
        workspace_pvc=workspace_pvc, timeout_minutes=pretrain_timeout_minutes,
    ).set_display_name("pre-train (TrainJob)").set_retry(2, backoff_duration="60s")
    probe_step = probe(data=data, params=params, backbone=pretrain_step.outputs["backbone"]) \
        .set_display_name("probe (k-NN, linear)")
    pictures_step = pictures(data=data, params=params, tokens=tokens_step.outputs["tokens"],
                             model=pretrain_step.outputs["model"]).set_display_name("pictures")
    finetune_step = finetune(data=data, params=params, backbone=pretrain_step.outputs["backbone"]) \
        .set_display_name("fine-tune")
    evaluate_step = evaluate(data=data, params=params, model=finetune_step.outputs["model"]) \
        .set_display_name("evaluate")
    gate_step = promotion_gate(
        data=data, params=params, evaluate_metrics=evaluate_step.outputs["metrics"],
        classifier=finetune_step.outputs["model"], backbone=pretrain_step.outputs["backbone"],
        registry_url=registry_url, registry_model=registry_model, workspace=workspace,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_display_name("promotion gate").set_caching_options(False)
    summarize(data=data, params=params, pretrain_metrics=pretrain_step.outputs["metrics"],
              probe_metrics=probe_step.outputs["metrics"], scratch_metrics=probe_step.outputs["scratch_metrics"],
              finetune_metrics=finetune_step.outputs["metrics"], evaluate_metrics=evaluate_step.outputs["metrics"],
              decision=gate_step.outputs["decision"]).set_display_name("run summary")
    for step in (codebook_step, tokens_step, pretrain_step, probe_step, pictures_step, finetune_step, evaluate_step,
                 gate_step):
        kubernetes.mount_pvc(step, pvc_name=workspace_pvc, mount_path=WORKSPACE_MOUNT)
    for step in (codebook_step, tokens_step, probe_step, finetune_step):
        step.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(step_gpus)
        kubernetes.add_node_selector_json(step, node_selector)
        kubernetes.add_toleration_json(step, tolerations)


@dsl.pipeline(name="mapet", description="MaPeT: validate -> (unless a model of the same data, parameters and code is "
                                        "registered) k-CLIP tokenizer -> tokenize -> pre-train (TrainJob) -> probe, "
                                        "pictures, fine-tune -> evaluate -> promotion gate, on the DVC-pinned data of "
                                        "a git revision.")
def mapet_pipeline(
    repo_url: str,
    git_rev: str = "main",
    param_overrides: list = [],
    dvc_remote: str = "",
    dvc_secret: str = "mapet-dvc-remote",
    git_secret: str = "mapet-git",
    workspace: str = WORKSPACE_MOUNT,
    workspace_pvc: str = "mapet-workspace",
    backend: str = "trainjob",
    namespace: str = "",
    runtime: str = "torch-distributed",
    runtime_kind: str = "ClusterTrainingRuntime",
    num_nodes: int = 1,
    proc_per_node: int = 1,
    gpus_per_node: int = 1,
    step_gpus: int = 0,
    node_selector: dict = {},
    tolerations: list = [],
    pretrain_timeout_minutes: int = 0,
    registry_url: str = "",
    registry_model: str = "mapet",
    force: bool = False,
):
    """repo_url/git_rev: the repository and revision whose data.dvc and params.yaml to run;
    param_overrides: ["pretrain.objective=mim", "preset=paper", ...]; dvc_remote: overrides the
    repository's DVC remote (credentials from the Secret dvc_secret); git_secret: the Secret
    whose HTTPS token or SSH key clones a private repository; workspace_pvc: the RWX
    volume mounted at /workspace in every step and TrainJob node; backend: trainjob or local;
    num_nodes/proc_per_node/gpus_per_node/node_selector/tolerations: the TrainJob's shape;
    step_gpus: GPUs of the tokenizer, tokenize and fine-tuning steps (0 on CPU clusters);
    registry_url: Kubeflow Model Registry (http://HOST:PORT), empty for the registry on the
    workspace; registry_model: the registered model's name; force: train even when a model of the
    same fingerprint (data version, effective parameters, code) is registered."""
    data_step = materialize_data(repo_url=repo_url, git_rev=git_rev, workspace=workspace, dvc_remote=dvc_remote,
                                 param_overrides=param_overrides, git_secret=git_secret,
                                 dvc_secret=dvc_secret)
    data_step.set_display_name("materialise data")
    data_step.set_caching_options(False)                     # a branch name resolves to a new commit over time
    kubernetes.use_secret_as_env(data_step, secret_name=dvc_secret, secret_key_to_env=DVC_SECRET_KEYS, optional=True)
    kubernetes.use_secret_as_env(data_step, secret_name=git_secret, secret_key_to_env=GIT_SECRET_KEYS, optional=True)
    data, params = data_step.outputs["data"], data_step.outputs["params"]

    checked = validate(data=data, params=params).set_display_name("validate")
    lookup = check_registry(fingerprint=data_step.outputs["Output"], registry_url=registry_url,
                            registry_model=registry_model, workspace=workspace, force=force) \
        .set_display_name("registered already?").set_caching_options(False)
    for step in (data_step, checked, lookup):
        kubernetes.mount_pvc(step, pvc_name=workspace_pvc, mount_path=WORKSPACE_MOUNT)
    with dsl.If(lookup.outputs["Output"] == "train", name="data, parameters or code changed"):
        train_and_promote(
            data=data, params=params, workspace=workspace, workspace_pvc=workspace_pvc, backend=backend,
            namespace=namespace, runtime=runtime, runtime_kind=runtime_kind, num_nodes=num_nodes,
            proc_per_node=proc_per_node, gpus_per_node=gpus_per_node, step_gpus=step_gpus, node_selector=node_selector,
            tolerations=tolerations, pretrain_timeout_minutes=pretrain_timeout_minutes, registry_url=registry_url,
            registry_model=registry_model).after(checked).set_display_name("train and promote")


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(mapet_pipeline, str(path))
    return path


if __name__ == "__main__":
    print(f"wrote {compile_pipeline()}")
