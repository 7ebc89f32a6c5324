"""Pre-training as a Kubeflow Trainer v2 TrainJob, or in place with torchrun (the `local` backend).

The TrainJob runs the same `mapet pretrain` command on the `torch-distributed` runtime: torchrun
starts ``proc_per_node`` processes on each of ``num_nodes`` nodes, all of which mount the shared
RWX workspace volume where the data, the tokens and the outputs live. Its name is derived from
the pipeline run and task, so a retried step finds the job it started before and re-attaches to
it instead of starting a second one; a job that had failed is replaced, and `--resume` continues
from its last checkpoint on the workspace.

While it waits, the launcher follows each node's log with one streaming request per container
instance (a thread each), so every byte of a log is fetched once; see `TrainJobLauncher.follow_logs`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"       # JobSet labels every pod with its TrainJob's name
SPEC_HASH_ANNOTATION = "mapet.dev/spec-sha256"
TRAINER_CONTAINER = "node"                                 # the torch-distributed runtime's replicated job and container
WORKSPACE_VOLUME = "workspace"
RECONNECT_OVERLAP_SECONDS = 10                             # a reopened stream asks again for this much, deduplicated


class LaunchError(RuntimeError):
    """The TrainJob failed, timed out, or cannot be started; the message says which and why."""


@dataclass
class TrainJobRequest:
    """What the pipeline task asks for; ``command`` runs on every node under the runtime's torchrun."""

    name: str
    namespace: str
    image: str
    command: list[str]
    runtime: str = "torch-distributed"
    runtime_kind: str = "ClusterTrainingRuntime"            # or TrainingRuntime (namespaced, see k8s/)
    num_nodes: int = 1
    proc_per_node: int = 1
    gpus_per_node: int = 0
    resources: dict[str, str] = field(default_factory=dict)    # extra limits per node, e.g. {"memory": "200Gi"}
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    workspace_pvc: str = "mapet-workspace"
    workspace_path: str = "/workspace"
    env: dict[str, str] = field(default_factory=dict)


def trainjob_name(run: str, task: str, prefix: str = "mapet-pretrain") -> str:
    """A DNS-1035 name, the same for every attempt of one task of one run and short enough for
    the JobSet, Job and pod names derived from it."""
    digest = hashlib.sha256(f"{run}/{task}".encode()).hexdigest()[:10]
    return f"{re.sub(r'[^a-z0-9-]', '-', prefix.lower()).strip('-')[:28]}-{digest}"


def trainjob_manifest(request: TrainJobRequest) -> dict[str, Any]:
    limits = dict(request.resources)
    if request.gpus_per_node:
        limits["nvidia.com/gpu"] = str(request.gpus_per_node)
    trainer: dict[str, Any] = {"image": request.image, "command": list(request.command),
                               "numNodes": request.num_nodes, "numProcPerNode": request.proc_per_node,
                               "env": [{"name": k, "value": v} for k, v in sorted(request.env.items())]}
    if limits:
        trainer["resourcesPerNode"] = {"limits": limits}
    pod: dict[str, Any] = {
        "volumes": [{"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": request.workspace_pvc}}],
        "containers": [{"name": TRAINER_CONTAINER,
                        "volumeMounts": [{"name": WORKSPACE_VOLUME, "mountPath": request.workspace_path}]}],
    }
    if request.node_selector:
        pod["nodeSelector"] = dict(request.node_selector)
    if request.tolerations:
        pod["tolerations"] = [dict(t) for t in request.tolerations]
    spec = {
        "runtimeRef": {"apiGroup": GROUP, "kind": request.runtime_kind, "name": request.runtime},
        "trainer": trainer,
        "runtimePatches": [{"manager": "mapet.dev/launcher", "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": TRAINER_CONTAINER, "template": {"spec": {"template": {"spec": pod}}}}]}}}}],
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob",
            "metadata": {"name": request.name, "namespace": request.namespace,
                         "labels": {"app.kubernetes.io/name": "mapet", "app.kubernetes.io/component": "pretrain"},
                         "annotations": {SPEC_HASH_ANNOTATION: digest}},
            "spec": spec}


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The TrainJob's condition of type ``kind`` (Complete, Failed, Suspended) when it is True."""
    for entry in (job.get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind and entry.get("status") == "True":
            return entry
    return None


def _stamp_key(stamp: str) -> str:
    """A kubelet log timestamp (RFC 3339 in UTC, trailing zeros of the fraction trimmed) padded to
    nanoseconds, so that keys compare as strings in time order."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{whole}.{fraction:0<9}"


def _trainer_container(pod) -> tuple[int, bool]:
    """The trainer container's restart count (which instance of it runs) and whether it is running."""
    for status in pod.status.container_statuses or []:
        if status.name == TRAINER_CONTAINER:
            return status.restart_count or 0, bool(status.state and status.state.running)
    return 0, pod.status.phase == "Running"


@dataclass(eq=False)
class _InstanceLog:
    """How far the log of one instance of a pod's trainer container has been printed: the newest
    line's timestamp key and when (launcher clock) it arrived, and the thread streaming it."""

    pod: str
    restarts: int
    stop: threading.Event                                   # set when the launcher stops following the job
    thread: threading.Thread | None = None
    response: Any = None
    opened: bool = False                                    # a request for this instance has succeeded
    last_key: str = ""
    last_seen: float = 0.0
    skip_through: str = ""                                  # a reconnected stream drops lines up to this key
    error_reported: bool = False


class TrainJobLauncher:
    """Creates, follows and deletes TrainJobs through the Kubernetes API (``custom``: a
    CustomObjectsApi, ``core``: a CoreV1Api, or fakes of them in tests). ``drain_seconds`` bounds
    how long the end of a job waits for its pods' log streams to finish."""

    def __init__(self, custom, core, poll_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print,
                 drain_seconds: float = 30.0):
        self.custom, self.core = custom, core
        self.poll_seconds, self.clock, self.sleep, self._log = poll_seconds, clock, sleep, log
        self.drain_seconds = drain_seconds
        self._lock = threading.Lock()
        self._followed: dict[str, _InstanceLog] = {}
        self._stop = threading.Event()

    def log(self, message: str) -> None:
        """One message, whole: log streams print from their own threads."""
        with self._lock:
            self._log(message)

    def _get(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def submit(self, manifest: dict[str, Any]) -> str:
        """Creates the TrainJob, or re-attaches to the one a previous attempt created: "created",
        "attached" or "replaced" (a failed job of the same name is deleted and created anew)."""
        from kubernetes.client.exceptions import ApiException

        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        outcome = "created"
        existing = self._get(namespace, name)
        if existing is not None:
            wanted = manifest["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
            found = (existing.get("metadata", {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
            if found != wanted:
                raise LaunchError(f"TrainJob {namespace}/{name} exists with another spec (annotation "
                                  f"{SPEC_HASH_ANNOTATION} {found} != {wanted}); delete it or run under a new name")
            if not condition(existing, "Failed"):
                self.log(f"re-attaching to TrainJob {namespace}/{name} (started by an earlier attempt)")
                return "attached"
            self.log(f"TrainJob {namespace}/{name} had failed; replacing it (training resumes from its checkpoint)")
            self.delete(namespace, name, wait=True)
            outcome = "replaced"
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        except ApiException as error:
            raise LaunchError(f"cannot create TrainJob {namespace}/{name}: {error.status} {error.reason}: "
                              f"{error.body}") from error
        self.log(f"created TrainJob {namespace}/{name}")
        return outcome

    def wait(self, namespace: str, name: str, timeout_seconds: float) -> dict[str, Any]:
        """Follows the job's logs until it completes; raises LaunchError when it fails, is
        deleted, or runs past ``timeout_seconds`` (0: no limit). A job that ends, completed or
        failed, has its pods' logs printed to their end first (within ``drain_seconds``)."""
        started = self.clock()
        try:
            while True:
                job = self._get(namespace, name)
                self.follow_logs(namespace, name)
                if job is None:
                    raise LaunchError(f"TrainJob {namespace}/{name} disappeared while it was being followed")
                if condition(job, "Complete"):
                    self.stop_following(self.drain_seconds)
                    self.log(f"TrainJob {namespace}/{name} completed")
                    return job
                failed = condition(job, "Failed")
                if failed:
                    self.stop_following(self.drain_seconds)
                    raise LaunchError(f"TrainJob {namespace}/{name} failed: {failed.get('reason', '')}: "
                                      f"{failed.get('message', '')}")
                if timeout_seconds and self.clock() - started > timeout_seconds:
                    raise LaunchError(f"TrainJob {namespace}/{name} did not complete within {timeout_seconds:.0f} s")
                self.sleep(self.poll_seconds)
        finally:
            self.stop_following(0)

    def follow_logs(self, namespace: str, name: str) -> None:
        """Makes sure every started trainer pod of the job has its log followed; called at each poll.

        Each instance of a pod's trainer container gets one streaming request (``follow``) read by
        a thread of its own, which prints the lines prefixed with the pod's name as they arrive.
        A pod that appears later is picked up at the next poll. A container that restarted gets a
        new stream, whose thread first lets the previous instance's stream end (so a pod's lines
        stay in order) and reads with ``previous`` the instance before it if no stream followed
        that one (it ran between two polls). A stream that breaks while its container runs is
        reopened for its last seconds only (``since_seconds``), dropping by their timestamps the
        lines already printed."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_NAME_LABEL}={name}").items
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            if pod.status.phase not in ("Running", "Succeeded", "Failed"):
                continue
            restarts, running = _trainer_container(pod)
            followed = self._followed.get(pod.metadata.name)
            before, unseen = None, None
            if followed is None or restarts != followed.restarts:
                if restarts > (followed.restarts + 1 if followed else 0):
                    unseen = _InstanceLog(pod.metadata.name, restarts - 1, self._stop)
                before = followed.thread if followed else None
                followed = self._followed[pod.metadata.name] = _InstanceLog(pod.metadata.name, restarts, self._stop)
            elif followed.thread.is_alive() or (followed.opened and not running):
                continue                                                    # streaming, or read to its end
            followed.thread = threading.Thread(target=self._follow, args=(namespace, followed, unseen, before),
                                               name=f"log {pod.metadata.name}", daemon=True)
            followed.thread.start()

    def _follow(self, namespace: str, followed: _InstanceLog, unseen: _InstanceLog | None,
                before: threading.Thread | None) -> None:
        if before is not None:
            before.join(self.drain_seconds)
        if unseen is not None:
            self._read_log(namespace, unseen, previous=True)
        self._read_log(namespace, followed, follow=True)

    def _read_log(self, namespace: str, instance: _InstanceLog, **query) -> None:
        """Prints the lines of one log request as they arrive, until it ends or breaks."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        if instance.stop.is_set():
            return
        if instance.opened and instance.last_key:
            instance.skip_through = instance.last_key
            query["since_seconds"] = math.ceil(self.clock() - instance.last_seen) + RECONNECT_OVERLAP_SECONDS
        try:
            response = self.core.read_namespaced_pod_log(instance.pod, namespace, container=TRAINER_CONTAINER,
                                                         timestamps=True, _preload_content=False, **query)
        except ApiException as error:                                       # not started, or gone: tried next poll
            if not instance.error_reported:
                instance.error_reported = True
                self.log(f"[{instance.pod}] cannot read the log: {error.status} {error.reason}")
            return
        instance.opened, instance.response = True, response
        pending: list[bytes] = []
        try:
            for chunk in response.stream(amt=None, decode_content=False):
                head, newline, tail = chunk.rpartition(b"\n")
                if newline:
                    pending.append(head)
                    for line in b"".join(pending).split(b"\n"):
                        self._print_line(instance, line)
                    pending = []
                pending.append(tail)
            if rest := b"".join(pending):
                self._print_line(instance, rest)
        except (HTTPError, OSError):
            pass                                                            # broken: reopened at the next poll
        finally:
            response.release_conn()

    def _print_line(self, instance: _InstanceLog, line: bytes) -> None:
        stamp, _, text = line.decode("utf-8", errors="replace").partition(" ")
        key = _stamp_key(stamp)
        if instance.skip_through:
            if key <= instance.skip_through:
                return
            instance.skip_through = ""
        instance.last_key, instance.last_seen = key, self.clock()
        with self._lock:
            if not instance.stop.is_set():
                for part in text.splitlines() or [""]:
                    self._log(f"[{instance.pod}] {part}")

    def stop_following(self, drain_seconds: float) -> None:
        """Gives the log streams up to ``drain_seconds`` to reach their ends (those of containers
        that finished), then closes whatever still runs and prints nothing more from it."""
        deadline = time.monotonic() + drain_seconds
        for followed in self._followed.values():
            followed.thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._stop.set()
            self._stop = threading.Event()
        for followed in self._followed.values():
            if followed.thread.is_alive() and followed.response is not None:
                try:
                    followed.response.shutdown()                            # wakes the blocked read; close() does not
                except (ValueError, RuntimeError):
                    followed.response.close()
        self._followed.clear()

    def delete(self, namespace: str, name: str, wait: bool = False, timeout_seconds: float = 300) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                        propagation_policy="Foreground")
        except ApiException as error:
            if error.status != 404:
                raise
        started = self.clock()
        while wait and self._get(namespace, name) is not None:
            if self.clock() - started > timeout_seconds:
                raise LaunchError(f"TrainJob {namespace}/{name} was not deleted within {timeout_seconds:.0f} s")
            self.sleep(self.poll_seconds)
        self.log(f"deleted TrainJob {namespace}/{name}")

    def run(self, request: TrainJobRequest, timeout_seconds: float) -> None:
        """Submit (or re-attach), follow to the end, and delete the job whatever the outcome."""
        self.submit(trainjob_manifest(request))
        try:
            self.wait(request.namespace, request.name, timeout_seconds)
        finally:
            self.delete(request.namespace, request.name)


def kubernetes_launcher(**options) -> TrainJobLauncher:
    """A launcher on the cluster this process runs in (in-cluster config), or the current kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return TrainJobLauncher(client.CustomObjectsApi(), client.CoreV1Api(), **options)


def torchrun_command(mapet_args: list[str]) -> list[str]:
    """The TrainJob's command: the runtime's torchrun takes its node count, rank and rendezvous
    from the PET_* variables that the torch-distributed runtime sets on every node."""
    return ["torchrun", "-m", "mapet", *mapet_args]


def run_local(mapet_args: list[str], proc_per_node: int) -> None:
    """The `local` backend: the same `mapet` command under torchrun on this machine."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={proc_per_node}",
            "-m", "mapet", *mapet_args]
    result = subprocess.run(argv)
    if result.returncode:
        raise LaunchError(f"local pre-training exited with status {result.returncode}: {' '.join(argv)}")


def launch_pretraining(*, backend: str, data_dir: str, tokens_dir: str, params_file: str, workspace: str,
                       job_name: str, proc_per_node: int, timeout_seconds: float = 0,
                       request: dict[str, Any] | None = None, launcher=None):
    """Stages the run's tokens and parameters next to the job's output folder on the workspace,
    runs `mapet pretrain --resume` with ``backend`` and returns that folder: "local" (torchrun
    here), "trainjob" (a Kubeflow Trainer TrainJob) or "docker" (the same TrainJob on the Docker
    engine of DOCKER_HOST, one container per node: `components.pretrain.docker_backend`, the
    workspace claim standing for a Docker volume or host folder of that name). ``request`` holds
    the TrainJobRequest fields besides name, command and proc_per_node; ``launcher`` replaces the
    backend's default TrainJobLauncher or DockerTrainJobRunner."""
    if backend not in ("local", "trainjob", "docker"):
        raise LaunchError(f"unknown pre-training backend {backend!r} (choose local, trainjob or docker)")
    job_dir = Path(workspace) / "jobs" / job_name
    staged_tokens = job_dir / "tokens"
    if not (staged_tokens / "tokens.json").is_file():                   # a retry finds them staged
        shutil.rmtree(staged_tokens, ignore_errors=True)
        shutil.copytree(tokens_dir, job_dir / "tokens.partial", dirs_exist_ok=True)
        (job_dir / "tokens.partial").rename(staged_tokens)
    shutil.copy(params_file, job_dir / "params.yaml")
    out = job_dir / "out"
    mapet_args = ["pretrain", "--params", str(job_dir / "params.yaml"), "--data", str(data_dir),
                  "--tokens", str(staged_tokens), "--out", str(out), "--resume"]
    if backend == "local":
        run_local(mapet_args, proc_per_node)
    else:
        job = TrainJobRequest(name=job_name, command=torchrun_command(mapet_args), proc_per_node=proc_per_node,
                              **(request or {}))
        if backend == "docker":
            from components.pretrain.docker_backend import DockerTrainJobRunner

            (launcher or DockerTrainJobRunner()).run(trainjob_manifest(job), timeout_seconds)
        else:
            (launcher or kubernetes_launcher()).run(job, timeout_seconds)
    if not (out / "backbone.safetensors").is_file():
        raise LaunchError(f"pre-training finished without writing {out / 'backbone.safetensors'}")
    return out
