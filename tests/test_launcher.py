"""The pre-training launcher against a fake Kubernetes API: the TrainJob it submits, following a
job and its pods' logs to its end, failure, timeout, and retries that re-attach instead of
starting a second job."""

import copy
import json
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

from components.pretrain.launcher import (JOBSET_NAME_LABEL, LaunchError, TrainJobLauncher, TrainJobRequest,
                                          _stamp_key, launch_pretraining, torchrun_command, trainjob_manifest,
                                          trainjob_name)

GPU_REQUEST = TrainJobRequest(
    name="mapet-pretrain-0123456789", namespace="ml", image="registry.example/mapet:1",
    command=torchrun_command(["pretrain", "--params", "/workspace/p.yaml", "--resume"]), num_nodes=2,
    proc_per_node=8, gpus_per_node=8, resources={"memory": "400Gi"},
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    workspace_pvc="mapet-workspace", workspace_path="/workspace", env={"NCCL_DEBUG": "WARN"})


class FakeContainer:
    """One instance of a pod's trainer container and its log as the kubelet keeps it: lines
    stamped (RFC 3339, the fraction's trailing zeros trimmed) with the fake clock."""

    def __init__(self):
        self.data, self.starts, self.ended = bytearray(), [], False    # starts: (time, offset) per line


class FakeLogStream:
    """A streaming log response (the part of urllib3's HTTPResponse the launcher uses): serves
    7 bytes at most per chunk, waits for more while following, counts every byte it serves."""

    def __init__(self, cluster, pod, container, offset, follow):
        self.cluster, self.pod, self.container, self.offset, self.follow = cluster, pod, container, offset, follow
        self.broken = False

    def ready(self):
        return self.broken or len(self.container.data) > self.offset or self.container.ended or not self.follow

    def stream(self, amt=None, decode_content=None):
        cluster, container = self.cluster, self.container
        deadline = time.monotonic() + 10
        while True:
            with cluster.changed:
                while not self.ready():
                    assert time.monotonic() < deadline, f"stream of {self.pod} starved"
                    cluster.waiting.add(self)
                    cluster.changed.wait(0.1)
                    cluster.waiting.discard(self)
                if self.broken:
                    raise ProtocolError("Connection broken")
                chunk = bytes(container.data[self.offset:self.offset + 7])
                if not chunk:
                    return
                self.offset += len(chunk)
                cluster.served[self.pod] += len(chunk)
            yield chunk

    def shutdown(self):
        with self.cluster.changed:
            self.broken = True
            self.cluster.changed.notify_all()

    def release_conn(self):
        pass

    close = release_conn


class FakeCluster:
    """CustomObjectsApi + CoreV1Api over dicts. ``controller(cluster)`` plays the Trainer
    controller and the pods: the launcher's ``sleep`` calls it once per poll, after the launcher's
    log threads have caught up (each waits for more, or has ended), so that each poll sees the
    cluster as a real one would between polls."""

    def __init__(self, controller=None):
        self.jobs, self.calls, self.now = {}, [], 0.0
        self.pods, self.requests, self.served, self.lines_written = {}, [], Counter(), 0
        self.changed, self.waiting, self.threads_before = threading.Condition(), set(), set(threading.enumerate())
        self.controller = controller or (lambda cluster: None)

    def write(self, pod, text):
        """Appends a line to the log of the pod's running container, starting the pod if needed."""
        with self.changed:
            state = self.pods.setdefault(pod, SimpleNamespace(phase="Running", containers=[FakeContainer()]))
            container = state.containers[-1]
            self.lines_written += 1
            nanos = round(self.now * 1e9) + 1000 * self.lines_written
            seconds, fraction = divmod(nanos, 10**9)
            stamp = (datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)).strftime("%FT%T")
            stamp += f".{fraction:09d}".rstrip("0").rstrip(".") + "Z"
            container.starts.append((self.now, len(container.data)))
            container.data += f"{stamp} {text}\n".encode()
            self.changed.notify_all()

    def restart(self, pod):
        with self.changed:
            self.pods[pod].containers[-1].ended = True
            self.pods[pod].containers.append(FakeContainer())
            self.changed.notify_all()

    def break_streams(self, pod):
        with self.changed:
            for name, _, stream in self.requests:
                stream.broken |= name == pod
            self.changed.notify_all()

    def log_size(self, pod):
        return sum(len(container.data) for container in self.pods[pod].containers)

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
        with self.changed:
            pods = [SimpleNamespace(metadata=SimpleNamespace(name=pod), status=SimpleNamespace(
                        phase=state.phase, container_statuses=[SimpleNamespace(
                            name="node", restart_count=len(state.containers) - 1,
                            state=SimpleNamespace(running=SimpleNamespace() if state.phase == "Running" else None))]))
                    for pod, state in self.pods.items() if pod.startswith(job) and job in self.jobs]
        return SimpleNamespace(items=pods)

    def read_namespaced_pod_log(self, name, namespace, container, timestamps=False, _preload_content=True,
                                follow=False, previous=False, since_seconds=None):
        assert container == "node" and timestamps and not _preload_content
        with self.changed:
            if name not in self.pods:
                raise ApiException(status=404, reason="Not Found")
            if previous and len(self.pods[name].containers) < 2:
                raise ApiException(status=400, reason="Bad Request")
            log = self.pods[name].containers[-2 if previous else -1]
            since = self.now - since_seconds if since_seconds else float("-inf")
            offset = next((start for at, start in log.starts if at >= since), len(log.data))
            stream = FakeLogStream(self, name, log, offset, follow)
            self.requests.append((name, "previous" if previous else f"since {since_seconds}" if since_seconds
                                  else "follow", stream))
            return stream

    def set_condition(self, name, kind, reason="", message=""):
        """Sets the job's condition; a job that ended has its pods ended with it."""
        self.jobs[name].setdefault("status", {})["conditions"] = [
            {"type": kind, "status": "True", "reason": reason, "message": message}]
        if kind in ("Complete", "Failed"):
            with self.changed:
                for pod, state in self.pods.items():
                    if pod.startswith(name):
                        state.phase, state.containers[-1].ended = "Succeeded" if kind == "Complete" else "Failed", True
                self.changed.notify_all()

    def settle(self):
        """Waits until every thread the launcher started waits for more log or has ended."""
        deadline = time.monotonic() + 5
        while True:
            with self.changed:
                idle = [stream for stream in self.waiting if not stream.ready()]
                if len(idle) == len(set(threading.enumerate()) - self.threads_before):
                    return
            assert time.monotonic() < deadline, "the launcher's log threads did not catch up"
            time.sleep(0.001)

    def sleep(self, seconds):
        self.settle()
        self.now += seconds
        self.controller(self)


def launcher_on(cluster, printed):
    return TrainJobLauncher(cluster, cluster, poll_seconds=5, clock=lambda: cluster.now, sleep=cluster.sleep,
                            log=printed.append, drain_seconds=5)


def lines_of(printed, pod):
    return [line[len(pod) + 3:] for line in printed if line.startswith(f"[{pod}] ")]


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
        step = round(cluster.now / 5)
        cluster.write(f"{name}-node-0-0-abc", f"step {step}")
        if step == 3:
            cluster.set_condition(name, "Complete")

    cluster, printed = FakeCluster(controller), []
    launcher_on(cluster, printed).run(GPU_REQUEST, timeout_seconds=3600)
    assert [line for line in printed if line.startswith("[")] == [
        f"[{name}-node-0-0-abc] step 1", f"[{name}-node-0-0-abc] step 2", f"[{name}-node-0-0-abc] step 3"]
    assert cluster.calls == [("create", name), ("delete", name)] and not cluster.jobs


def test_each_pod_log_is_streamed_once_as_it_grows_and_a_late_pod_is_followed_too():
    name = GPU_REQUEST.name
    pods = [f"{name}-node-0-0-abc", f"{name}-node-0-1-xyz"]
    written, caught_up = {pod: [] for pod in pods}, []

    def controller(cluster):
        caught_up.append(all(cluster.served[pod] == cluster.log_size(pod) and lines_of(printed, pod) == written[pod]
                             for pod in cluster.pods))
        poll = round(cluster.now / 5)
        for rank, pod in enumerate(pods):
            if rank == 0 or poll >= 20:                                       # node 1's pod starts at poll 20
                for line in range(poll % 3 + 1):
                    written[pod].append(f"rank {rank} poll {poll} line {line}: loss ≈ {poll / 7:.4f}")
                    cluster.write(pod, written[pod][-1])
        if poll == 60:
            cluster.set_condition(name, "Complete")

    cluster, printed = FakeCluster(controller), []
    launcher_on(cluster, printed).run(GPU_REQUEST, timeout_seconds=3600)
    for pod in pods:
        assert lines_of(printed, pod) == written[pod]                        # each line once, in order
        assert cluster.served[pod] == cluster.log_size(pod)                  # each byte served once
    assert all(caught_up)                                                    # at every poll, not at the end
    assert [(pod, kind) for pod, kind, _ in cluster.requests] == [(pods[0], "follow"), (pods[1], "follow")]
    last_log_line = max(index for index, line in enumerate(printed) if line.startswith("["))
    assert printed.index(f"TrainJob ml/{name} completed") > last_log_line                    # drained first


def test_a_restarted_container_is_followed_anew_and_an_instance_between_two_polls_is_read_as_previous():
    name = GPU_REQUEST.name
    pod, written = f"{name}-node-0-0-abc", []

    def controller(cluster):
        poll = round(cluster.now / 5)
        for attempt in range(2 if poll == 10 else 1):
            if poll in (5, 10):
                cluster.restart(pod)
            written.append(f"poll {poll} attempt {attempt}")
            cluster.write(pod, written[-1])
        if poll == 15:
            cluster.set_condition(name, "Complete")

    cluster, printed = FakeCluster(controller), []
    launcher_on(cluster, printed).run(GPU_REQUEST, timeout_seconds=3600)
    assert lines_of(printed, pod) == written
    assert cluster.served[pod] == cluster.log_size(pod)
    assert [kind for _, kind, _ in cluster.requests] == ["follow", "follow", "previous", "follow"]


def test_a_broken_stream_is_reopened_for_its_last_seconds_without_repeating_lines():
    name = GPU_REQUEST.name
    pod, written = f"{name}-node-0-0-abc", []

    def controller(cluster):
        poll = round(cluster.now / 5)
        if poll == 30:
            cluster.break_streams(pod)
        written.append(f"step {poll}")
        cluster.write(pod, written[-1])
        if poll == 40:
            cluster.set_condition(name, "Complete")

    cluster, printed = FakeCluster(controller), []
    launcher_on(cluster, printed).run(GPU_REQUEST, timeout_seconds=3600)
    assert lines_of(printed, pod) == written
    kinds = [kind for _, kind, _ in cluster.requests]
    assert kinds[0] == "follow" and kinds[1].startswith("since ") and len(kinds) == 2
    overlap = cluster.served[pod] - cluster.log_size(pod)
    assert 0 < overlap < cluster.log_size(pod) / 5                           # a few lines again, not the whole log


def test_log_timestamps_order_by_time_although_the_kubelet_trims_their_fractions():
    stamps = ["2025-01-01T00:00:05Z", "2025-01-01T00:00:05.00001Z", "2025-01-01T00:00:05.000012Z",
              "2025-01-01T00:00:05.1Z", "2025-01-01T00:00:06Z"]
    assert sorted(stamps, key=_stamp_key) == stamps != sorted(stamps)


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
