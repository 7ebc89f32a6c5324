"""The Kubernetes manifests, offline: every overlay renders with `kubectl kustomize`, built-in kinds
pass kubernetes-validate in strict mode, Trainer objects round-trip through the kubeflow-trainer-api
models and their pod templates validate as PodTemplates."""

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainingRuntime, TrainerV1alpha1TrainJob

K8S = Path(__file__).resolve().parents[1] / "k8s"
KUBERNETES_VERSION = "1.32"
TRAINER_MODELS = {"TrainingRuntime": TrainerV1alpha1TrainingRuntime, "TrainJob": TrainerV1alpha1TrainJob}
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())


def render(overlay: str) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_templates(trainer_object: dict) -> list[dict]:
    spec = trainer_object["spec"]
    jobs = spec.get("template", {}).get("spec", {}).get("replicatedJobs", [])
    return [job["template"]["spec"]["template"] for job in jobs]


def validate(document: dict) -> None:
    if document["kind"] in TRAINER_MODELS:
        model = TRAINER_MODELS[document["kind"]]
        assert model.from_dict(document).to_dict() == document, f"{document['kind']}: unknown or misspelt fields"
        for template in pod_templates(document):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, KUBERNETES_VERSION, strict=True)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def by_kind(documents: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in documents}


def test_there_is_a_cpu_smoke_and_a_gpu_overlay():
    assert OVERLAYS == ["cpu-smoke", "gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay):
    documents = render(overlay)
    assert {d["kind"] for d in documents} == {"Namespace", "PersistentVolumeClaim", "ServiceAccount", "Role",
                                              "RoleBinding", "TrainingRuntime"}
    for document in documents:
        validate(document)
        assert document["metadata"].get("namespace", "mapet") == "mapet" or document["kind"] == "Namespace"
    assert by_kind(documents)["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_role_is_least_privilege(overlay):
    kinds = by_kind(render(overlay))
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in kinds["Role"]["rules"]}
    assert rules == {(("trainer.kubeflow.org",), ("trainjobs",)): {"create", "get", "list", "watch", "delete"},
                     (("",), ("pods", "pods/log")): {"get", "list", "watch"}}
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert {s["name"] for s in binding["subjects"]} == {"mapet-pipeline", "default-editor"}


def test_gpu_overlay_asks_for_gpus_and_tolerates_their_taint_and_cpu_smoke_does_not():
    def node_pod(overlay):
        [template] = pod_templates(by_kind(render(overlay))["TrainingRuntime"])
        return template["spec"]

    gpu, cpu = node_pod("gpu"), node_pod("cpu-smoke")
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert gpu["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nvidia.com/gpu" not in str(cpu) and cpu["containers"][0]["resources"]["limits"]["cpu"] == "2"
    for spec in (gpu, cpu):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert {"name": "workspace", "mountPath": "/workspace"} in spec["containers"][0]["volumeMounts"]


def test_example_trainjob_validates_and_names_the_runtime_in_base():
    [job] = yaml.safe_load_all((K8S / "examples" / "trainjob.yaml").read_text())
    validate(job)
    runtime = by_kind(render("gpu"))["TrainingRuntime"]
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    assert job["spec"]["trainer"]["command"][:4] == ["torchrun", "-m", "mapet", "pretrain"]


def test_secret_template_validates_and_commits_no_secret():
    [secret] = yaml.safe_load_all((K8S / "templates" / "dvc-remote-secret.yaml").read_text())
    validate(secret)
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert not any(secret["stringData"].values()) and "data" not in secret
    from pipelines.mapet_pipeline import DVC_SECRET_KEYS

    assert set(DVC_SECRET_KEYS) == set(secret["stringData"])


def test_strict_validation_catches_a_misspelt_field():
    runtime = by_kind(render("cpu-smoke"))["TrainingRuntime"]
    pod = pod_templates(runtime)[0]["spec"]
    pod["containers"][0]["volumeMount"] = pod["containers"][0].pop("volumeMounts")
    with pytest.raises(AssertionError, match="TrainingRuntime: unknown or misspelt fields"):
        validate(runtime)
    namespace = by_kind(render("cpu-smoke"))["Namespace"]
    namespace["metadata"]["lables"] = {"a": "b"}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(namespace)


def test_git_secret_template_validates_and_commits_no_secret():
    [secret] = yaml.safe_load_all((K8S / "templates" / "git-secret.yaml").read_text())
    validate(secret)
    assert not any(secret["stringData"].values()) and "data" not in secret
    from components.data.materialize import GIT_SECRET_KEYS

    assert set(secret["stringData"]) <= set(GIT_SECRET_KEYS)
