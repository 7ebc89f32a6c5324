"""The pre-training launcher against a fake Kubernetes API: the TrainJob it submits, following a
job to its end, failure, timeout, and retries that re-attach instead of starting a second job."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from kubernetes.client.exceptions import ApiException

from components.pretrain.launcher import (JOBSET_NAME_LABEL, LaunchError, TrainJobLauncher, TrainJobRequest,
                                          launch_pretraining, torchrun_command, trainjob_manifest, trainjob_name)

GPU_REQUEST = TrainJobRequest(
    name="mapet-pretrain-0123456789", namespace="ml", image="registry.example/mapet:1",
    command=torchrun_command(["pretrain", "--params", "/workspace/p.yaml", "--resume"]), num_nodes=2,
    proc_per_node=8, gpus_per_node=8, resources={"memory": "400Gi"},
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    workspace_pvc="mapet-workspace", workspace_path="/workspace", env={"NCCL_DEBUG": "WARN"})


class FakeCluster:
    """CustomObjectsApi + CoreV1Api over dicts. ``controller(cluster)`` plays the Trainer
    controller: the test's ``sleep`` calls it once per poll."""

    def __init__(self, controller=None):
        self.jobs, self.logs, self.calls, self.now = {}, {}, [], 0.0
        self.controller = controller or (lambda cluster: None)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", body["metadata"]["name"]))
        if body["metadata"]["name"] in self.jobs:
            raise ApiException(status=409, reason="Conflict")
        self.jobs[body["metadata"]["name"]] = copy.deepcopy(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.jobs[name])

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        self.calls.append(("delete", name))
        if self.jobs.pop(name, None) is None:
            raise ApiException(status=404, reason="Not Found")

    def list_namespaced_pod(self, namespace, label_selector):
        key, _, job = label_selector.partition("=")
        assert key == JOBSET_NAME_LABEL
        pods = [SimpleNamespace(metadata=SimpleNamespace(name=pod), status=SimpleNamespace(phase="Running"))
                for pod in self.logs if pod.startswith(job) and job in self.jobs]
        return SimpleNamespace(items=pods)

    def read_namespaced_pod_log(self, name, namespace, container):
        assert container == "node"
        return "\n".join(self.logs[name])

    def set_condition(self, name, kind, reason="", message=""):
        self.jobs[name].setdefault("status", {})["conditions"] = [
            {"type": kind, "status": "True", "reason": reason, "message": message}]

    def sleep(self, seconds):
        self.now += seconds
        self.controller(self)


def launcher_on(cluster, printed):
    return TrainJobLauncher(cluster, cluster, poll_seconds=5, clock=lambda: cluster.now, sleep=cluster.sleep,
                            log=printed.append)


def test_trainjob_spec_is_a_valid_trainer_v2_job_with_the_requested_shape():
    manifest = trainjob_manifest(GPU_REQUEST)
    assert TrainerV1alpha1TrainJob.from_dict(manifest).to_dict() == manifest     # nothing unknown, nothing dropped
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    assert spec["trainer"]["numNodes"] == 2 and spec["trainer"]["numProcPerNode"] == 8
    assert spec["trainer"]["resourcesPerNode"] == {"limits": {"memory": "400Gi", "nvidia.com/gpu": "8"}}
    assert spec["trainer"]["command"] == ["torchrun", "-m", "mapet", "pretrain", "--params", "/workspace/p.yaml",
                                          "--resume"]
    [patch] = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = patch["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == GPU_REQUEST.node_selector and pod["tolerations"] == GPU_REQUEST.tolerations
    assert pod["volumes"] == [{"name": "workspace", "persistentVolumeClaim": {"claimName": "mapet-workspace"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "workspace", "mountPath": "/workspace"}]
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "patch"}, "template": {"spec": pod}}
    kubernetes_validate.validate(template, "1.32", strict=True)


def test_cpu_request_asks_for_no_gpus_and_the_spec_hash_follows_the_spec():
    cpu = TrainJobRequest(name="n", namespace="ml", image="i", command=["torchrun"])
    manifest = trainjob_manifest(cpu)
    assert "resourcesPerNode" not in manifest["spec"]["trainer"]
    other = trainjob_manifest(TrainJobRequest(name="n", namespace="ml", image="i", command=["torchrun"], num_nodes=3))
    hash_of = lambda m: m["metadata"]["annotations"]["mapet.dev/spec-sha256"]  # noqa: E731
    assert hash_of(manifest) == hash_of(trainjob_manifest(cpu)) != hash_of(other)


def test_job_name_is_deterministic_per_run_and_task_and_a_dns_label():
    name = trainjob_name("3f0c8e4e-run", "pretrain")
    assert name == trainjob_name("3f0c8e4e-run", "pretrain") != trainjob_name("other-run", "pretrain")
    assert name != trainjob_name("3f0c8e4e-run", "pretrain-2")
    assert len(name) <= 40 and name.replace("-", "").isalnum() and name[0].isalpha() and name.islower()


def test_follows_logs_without_repeating_lines_until_complete_then_deletes():
    name = GPU_REQUEST.name

    def controller(cluster):
        lines = cluster.logs.setdefault(f"{name}-node-0-0-abc", [])
        lines.append(f"step {len(lines) + 1}")
        if len(lines) == 3:
            cluster.set_condition(name, "Complete")

    cluster, printed = FakeCluster(controller), []
    launcher_on(cluster, printed).run(GPU_REQUEST, timeout_seconds=3600)
    assert [line for line in printed if line.startswith("[")] == [
        f"[{name}-node-0-0-abc] step 1", f"[{name}-node-0-0-abc] step 2", f"[{name}-node-0-0-abc] step 3"]
    assert cluster.calls == [("create", name), ("delete", name)] and not cluster.jobs


def test_failed_job_raises_with_its_reason_and_is_deleted():
    name = GPU_REQUEST.name
    cluster, printed = FakeCluster(lambda c: c.set_condition(name, "Failed", "BackoffLimitExceeded", "node-1 OOM")), []
    with pytest.raises(LaunchError, match="failed: BackoffLimitExceeded: node-1 OOM"):
        launcher_on(cluster, printed).run(GPU_REQUEST, timeout_seconds=3600)
    assert ("delete", name) in cluster.calls and not cluster.jobs


def test_timeout_raises_and_deletes_the_job():
    cluster, printed = FakeCluster(), []
    with pytest.raises(LaunchError, match="did not complete within 60 s"):
        launcher_on(cluster, printed).run(GPU_REQUEST, timeout_seconds=60)
    assert cluster.now <= 65 and not cluster.jobs


def test_retry_reattaches_to_a_running_job_instead_of_creating_another():
    cluster, printed = FakeCluster(), []
    cluster.jobs[GPU_REQUEST.name] = trainjob_manifest(GPU_REQUEST)               # the first attempt's job
    assert launcher_on(cluster, printed).submit(trainjob_manifest(GPU_REQUEST)) == "attached"
    assert not [call for call in cluster.calls if call[0] == "create"]
    assert any("re-attaching" in line for line in printed)


def test_retry_replaces_a_failed_job_and_refuses_a_foreign_one():
    cluster, printed = FakeCluster(), []
    cluster.jobs[GPU_REQUEST.name] = trainjob_manifest(GPU_REQUEST)
    cluster.set_condition(GPU_REQUEST.name, "Failed", "PodFailed", "preempted")
    assert launcher_on(cluster, printed).submit(trainjob_manifest(GPU_REQUEST)) == "replaced"
    assert cluster.calls == [("delete", GPU_REQUEST.name), ("create", GPU_REQUEST.name)]
    assert "status" not in cluster.jobs[GPU_REQUEST.name]

    foreign = trainjob_manifest(TrainJobRequest(name=GPU_REQUEST.name, namespace="ml", image="other", command=["x"]))
    cluster.jobs[GPU_REQUEST.name] = foreign
    with pytest.raises(LaunchError, match="exists with another spec"):
        launcher_on(cluster, printed).submit(trainjob_manifest(GPU_REQUEST))


def test_trainjob_backend_stages_inputs_on_the_workspace_and_runs_the_job(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "tokens.json").write_text("{}")
    params = tmp_path / "params.yaml"
    params.write_text("pretrain: {}\n")
    workspace = tmp_path / "workspace"
    submitted = []

    def controller(cluster):                                       # the job's nodes write the outputs
        job = cluster.jobs["job-1"]
        submitted.append(job)
        command = job["spec"]["trainer"]["command"]
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "backbone.safetensors").write_bytes(b"weights")
        cluster.set_condition("job-1", "Complete")

    cluster, printed = FakeCluster(controller), []
    out = launch_pretraining(backend="trainjob", data_dir="/workspace/data/abc", tokens_dir=str(tokens),
                             params_file=str(params), workspace=str(workspace), job_name="job-1", proc_per_node=4,
                             request={"namespace": "ml", "image": "img", "num_nodes": 2},
                             launcher=launcher_on(cluster, printed))
    job_dir = workspace / "jobs" / "job-1"
    assert out == job_dir / "out" and (out / "backbone.safetensors").read_bytes() == b"weights"
    assert json.loads((job_dir / "tokens" / "tokens.json").read_text()) == {}
    assert (job_dir / "params.yaml").read_text() == params.read_text()
    trainer = submitted[0]["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "-m", "mapet", "pretrain", "--params", str(job_dir / "params.yaml"),
                                  "--data", "/workspace/data/abc", "--tokens", str(job_dir / "tokens"),
                                  "--out", str(job_dir / "out"), "--resume"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)


def test_missing_backbone_and_unknown_backend_are_errors(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "tokens.json").write_text("{}")
    (tmp_path / "params.yaml").write_text("{}")
    common = dict(data_dir="d", tokens_dir=str(tokens), params_file=str(tmp_path / "params.yaml"),
                  workspace=str(tmp_path / "ws"), job_name="job-2", proc_per_node=1)
    with pytest.raises(LaunchError, match="unknown pre-training backend 'slurm'"):
        launch_pretraining(backend="slurm", **common)
    cluster = FakeCluster(lambda c: c.set_condition("job-2", "Complete"))
    with pytest.raises(LaunchError, match="without writing .*backbone.safetensors"):
        launch_pretraining(backend="trainjob", request={"namespace": "ml", "image": "i"},
                           launcher=launcher_on(cluster, []), **common)
