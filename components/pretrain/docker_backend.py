"""The `docker` backend: the TrainJob that :func:`components.pretrain.launcher.trainjob_manifest`
writes, run on a Docker engine the way Kubeflow Trainer's `torch-distributed` runtime runs it on
a cluster, so that multi-node pre-training across hosts can be run and tested without Kubernetes.

One container per node, all on one private network, each named like the runtime's pod
(``<job>-node-0-<rank>``) and reachable by the pod's DNS name (``<job>-node-0-<rank>.<job>``);
each runs the trainer's image and command with the trainer's environment plus the ``PET_*``
variables that the runtime sets (node count, processes per node, node rank, the master's DNS name
and port), and mounts the workspace volume where the pod would. As under JobSet's default
failure policy, the first node that fails fails the job and the other nodes are stopped.

Kubeflow's own SDK has a container backend (package `kubeflow`, ``ContainerBackend``), but it
runs ``CustomTrainer`` functions only (their source shipped into the container, packages
pip-installed at start), not a TrainJob's image and command: it cannot run this spec.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from components.pretrain.launcher import LaunchError

MASTER_PORT = 29400                                         # the torch-distributed runtime's PET_MASTER_PORT
JOB_LABEL = "mapet.dev/trainjob"


def node_name(job: str, rank: int) -> str:
    return f"{job}-node-0-{rank}"


def node_address(job: str, rank: int) -> str:
    """The DNS name JobSet gives the pod of node ``rank`` (hostname, then the job's subdomain)."""
    return f"{node_name(job, rank)}.{job}"


@dataclass
class RunningJob:
    name: str
    network: Any
    nodes: list[Any]                                        # docker containers, in node-rank order
    owns_network: bool
    logs: list[threading.Thread] = field(default_factory=list)


class DockerTrainJobRunner:
    """Runs TrainJob manifests on the engine of ``client`` (``docker.from_env()`` by default).
    ``volumes`` maps a PersistentVolumeClaim's name to what stands in for it: a host folder (an
    absolute path, bind-mounted) or a Docker volume's name; an unmapped claim is a Docker volume of
    its own name. ``network`` names an existing network to put the nodes on (the caller's to
    remove); by default each job gets an internal network of its own, removed with it."""

    def __init__(self, client=None, volumes: dict[str, str] | None = None, network: str | None = None,
                 poll_seconds: float = 1.0, log: Callable[[str], None] = print):
        if client is None:
            import docker

            client = docker.from_env()
        self.client, self.volumes, self.network = client, dict(volumes or {}), network
        self.poll_seconds, self._log = poll_seconds, log
        self._lock = threading.Lock()

    def log(self, message: str) -> None:
        with self._lock:
            self._log(message)

    def _mounts(self, spec: dict[str, Any]) -> list[Any]:
        from docker.types import Mount

        pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
            "spec"]["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        mounts = []
        for mount in pod["containers"][0].get("volumeMounts", []):
            claim = claims[mount["name"]]
            source = self.volumes.get(claim, claim)
            mounts.append(Mount(target=mount["mountPath"], source=source,
                                type="bind" if os.path.isabs(source) else "volume"))
        return mounts

    def start(self, manifest: dict[str, Any]) -> RunningJob:
        """Creates the network (unless given) and one started container per node."""
        from docker.errors import APIError, NotFound

        name, spec = manifest["metadata"]["name"], manifest["spec"]
        trainer = spec["trainer"]
        nodes = int(trainer.get("numNodes", 1))
        for left in self.client.containers.list(all=True, filters={"label": f"{JOB_LABEL}={name}"}):
            left.remove(force=True)                               # of a job of this name that was not cleaned up
        if self.network:
            network, owns = self.client.networks.get(self.network), False
        else:
            try:
                self.client.networks.get(name).remove()
            except NotFound:
                pass
            network, owns = self.client.networks.create(name, driver="bridge", internal=True,
                                                        labels={JOB_LABEL: name}), True
        job = RunningJob(name, network, [], owns)
        environment = {entry["name"]: entry["value"] for entry in trainer.get("env", [])}
        environment.update(PET_NNODES=str(nodes), PET_NPROC_PER_NODE=str(trainer.get("numProcPerNode", 1)),
                           PET_MASTER_ADDR=node_address(name, 0), PET_MASTER_PORT=str(MASTER_PORT))
        try:
            mounts = self._mounts(spec)
            for rank in range(nodes):
                container_name = node_name(name, rank)
                endpoint = self.client.api.create_endpoint_config(aliases=[node_address(name, rank)])
                container = self.client.containers.create(
                    trainer["image"], list(trainer["command"]), name=container_name, hostname=container_name,
                    environment={**environment, "PET_NODE_RANK": str(rank)}, mounts=mounts, network=network.name,
                    networking_config={network.name: endpoint}, labels={JOB_LABEL: name}, detach=True)
                job.nodes.append(container)
            for container in job.nodes:
                container.start()
                thread = threading.Thread(target=self._follow, args=(container,), daemon=True,
                                          name=f"log {container.name}")
                thread.start()
                job.logs.append(thread)
        except APIError as error:
            self.delete(job)
            raise LaunchError(f"cannot start TrainJob {name} on the Docker engine: {error.explanation or error}") \
                from error
        self.log(f"started TrainJob {name}: {nodes} node container(s) on network {network.name}, "
                 f"master {node_address(name, 0)}:{MASTER_PORT}")
        return job

    def _follow(self, container) -> None:
        from docker.errors import APIError
        from requests.exceptions import RequestException

        pending = b""
        try:
            for chunk in container.logs(stream=True, follow=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.log(f"[{container.name}] {line.decode('utf-8', errors='replace')}")
        except (APIError, RequestException):                # the container was removed while streaming
            pass
        if pending:
            self.log(f"[{container.name}] {pending.decode('utf-8', errors='replace')}")

    def exit_codes(self, job: RunningJob) -> list[int | None]:
        """Every node's exit code, None while it runs."""
        codes = []
        for container in job.nodes:
            container.reload()
            state = container.attrs["State"]
            codes.append(state["ExitCode"] if state["Status"] in ("exited", "dead") else None)
        return codes

    def wait(self, job: RunningJob, timeout_seconds: float = 0) -> None:
        """Returns when every node has exited 0; raises LaunchError naming the first node that
        failed (the others are stopped), or when ``timeout_seconds`` (0: none) pass."""
        started = time.monotonic()
        while True:
            codes = self.exit_codes(job)
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                rank, code = failed[0]
                self.stop(job)
                raise LaunchError(f"TrainJob {job.name} failed: node {rank} ({node_name(job.name, rank)}) exited "
                                  f"with status {code}" + (" (killed)" if code == 137 else "") +
                                  "; the other nodes were stopped. Its log is above; retrying resumes from the last "
                                  "complete checkpoint")
            if all(code == 0 for code in codes):
                for thread in job.logs:
                    thread.join(10)
                self.log(f"TrainJob {job.name} completed")
                return
            if timeout_seconds and time.monotonic() - started > timeout_seconds:
                self.stop(job)
                raise LaunchError(f"TrainJob {job.name} did not complete within {timeout_seconds:.0f} s")
            time.sleep(self.poll_seconds)

    def stop(self, job: RunningJob) -> None:
        from docker.errors import APIError

        for container in job.nodes:
            try:
                container.kill()
            except APIError:                                # exited already
                pass

    def delete(self, job: RunningJob) -> None:
        """Removes the nodes' containers and the job's own network."""
        from docker.errors import APIError

        for container in job.nodes:
            try:
                container.remove(force=True)
            except APIError:                                # gone already
                pass
        if job.owns_network:
            try:
                job.network.remove()
            except APIError:
                pass
        self.log(f"deleted TrainJob {job.name}")

    def run(self, manifest: dict[str, Any], timeout_seconds: float = 0) -> None:
        """Start, follow to the end, and delete the job whatever the outcome."""
        job = self.start(manifest)
        try:
            self.wait(job, timeout_seconds)
        finally:
            self.delete(job)
