"""The project image on a real Docker engine (`make test-image`: builds the image, then runs these):
what the image holds, every pipeline step inside it under kfp.local's DockerRunner with the data
pulled from an S3 server (moto) on a private network, and multi-node pre-training as one
container per node, with a node killed and a node cut off the network.

Every container and network a test starts is removed when it ends, passed or failed."""

import json
import os
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from test_pretrain import history, tokens, weights, write_params  # noqa: F401 (fixture)

from components import IMAGE
from components.pretrain.docker_backend import DockerTrainJobRunner
from components.pretrain.launcher import LaunchError, TrainJobRequest, torchrun_command, trainjob_manifest
from pipelines.mapet_pipeline import mapet_pipeline
from tests.pipeline_checks import check_skipped_run, check_trained_run
from tests.tiny_repo import make_pinned_repo, sh

pytestmark = pytest.mark.container

IMAGE_USER = 1000
S3_HOST, S3_PORT, BUCKET = "s3", 5000, "mapet"
COLLECTIVE_TIMEOUT_S = 30                                   # pretrain.collective_timeout_s of the multi-node runs


@pytest.fixture(scope="module")
def engine():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        pytest.fail(f"no Docker engine answers ({error}): `make test-image` starts one")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"no image {IMAGE}: build it with `make image`")
    yield client
    client.close()


@pytest.fixture(scope="module")
def network(engine):
    """A private network (no route out): the containers find each other by name."""
    import docker

    created = engine.networks.create(f"mapet-test-{uuid.uuid4().hex[:8]}", driver="bridge", internal=True)
    yield created
    deadline = time.monotonic() + 60
    while True:
        for container in engine.containers.list(all=True, filters={"network": created.name}):
            try:
                container.remove(force=True)
            except docker.errors.APIError:                  # a step's container removing itself
                pass
        try:
            created.remove()
            return
        except docker.errors.APIError:                      # still has endpoints
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def hand_to_image_user(*paths: Path) -> None:
    """The steps run as uid 1000: the folders they write are theirs, as fsGroup makes them on a cluster."""
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", f"{IMAGE_USER}:{IMAGE_USER}", str(path)], check=True)


def run_in_image(engine, command: list[str], network=None, aliases: list[str] | None = None, mounts=(),
                 environment=None, detach: bool = False, timeout: float = 600):
    """A container of the image: (exit status, output), or the running container when ``detach``."""
    options = {"environment": environment or {}, "mounts": list(mounts), "detach": True}
    if network is not None:
        options.update(network=network.name,
                       networking_config={network.name: engine.api.create_endpoint_config(aliases=aliases or [])})
    else:
        options["network_mode"] = "none"
    container = engine.containers.run(IMAGE, command, **options)
    if detach:
        return container
    try:
        status = container.wait(timeout=timeout)["StatusCode"]
        return status, container.logs().decode()
    finally:
        container.remove(force=True)


def bind(path: Path, target: str | None = None, read_only: bool = False):
    from docker.types import Mount

    return Mount(target=target or str(path), source=str(path), type="bind", read_only=read_only)


def test_the_image_holds_the_stack_and_runs_as_the_runtime_user_offline(engine):
    script = textwrap.dedent("""
        import importlib, json, os, shutil, subprocess, sys
        import deepspeed, dvc, faiss, great_expectations, kfp, open_clip, timm, torch, torchvision, mapet
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        print(json.dumps({"uid": os.getuid(), "python": sys.version.split()[0], "torch": torch.__version__,
                          "cuda": torch.version.cuda, "git": shutil.which("git"), "hub_offline": os.environ["HF_HUB_OFFLINE"],
                          "op": os.path.isfile(os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], builder.NAME,
                                                            builder.NAME + ".so")),
                          "build_settings": os.path.exists("/etc/mapet-build"),
                          "mapet": subprocess.run(["mapet", "--help"], capture_output=True).returncode}))
    """)
    status, output = run_in_image(engine, ["python", "-c", script])
    assert status == 0, output
    facts = json.loads(output.strip().splitlines()[-1])
    assert facts["uid"] == IMAGE_USER and facts["python"].startswith("3.11.") and facts["torch"] == torch.__version__
    assert facts["cuda"] and facts["git"] and facts["hub_offline"] == "1" and facts["mapet"] == 0
    assert facts["op"], "DeepSpeed's CPU comm op is not built into the image"
    assert not facts["build_settings"], "the build's pip settings (and CA bundle) reached the final image"


@pytest.fixture(scope="module")
def s3(engine, network):
    """moto's S3 server on the private network as `s3:5000`, refusing unsigned and wrongly signed
    requests; returns the credentials of a user allowed to use it (its first 3 requests make it)."""
    run_in_image(engine, ["python", "-m", "moto.server", "-H", "0.0.0.0", "-p", str(S3_PORT)], network=network,
                 aliases=[S3_HOST], environment={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}, detach=True)
    script = textwrap.dedent(f"""
        import json, time, boto3
        endpoint = "http://{S3_HOST}:{S3_PORT}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        for attempt in range(100):
            try:
                iam.create_user(UserName="dvc")
                break
            except Exception:
                time.sleep(0.2)
        key = iam.create_access_key(UserName="dvc")["AccessKey"]
        iam.put_user_policy(UserName="dvc", PolicyName="s3", PolicyDocument=json.dumps(
            {{"Version": "2012-10-17", "Statement": [{{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}}]}}))
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket="{BUCKET}")
        print(json.dumps({{"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}}))
    """)
    status, output = run_in_image(engine, ["python", "-c", script], network=network)
    assert status == 0, output
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def s3_repo(engine, network, s3, tmp_path_factory):
    """The tiny pinned repository with its data pushed to the S3 remote it names (from a container
    of the image, with the credentials in the environment)."""
    repo = make_pinned_repo(tmp_path_factory.mktemp("s3-repo"))
    sh("dvc", "remote", "add", "--default", "storage", f"s3://{BUCKET}/data", cwd=repo)
    sh("dvc", "remote", "modify", "storage", "endpointurl", f"http://{S3_HOST}:{S3_PORT}", cwd=repo)
    sh("git", "commit", "--quiet", "-am", "the S3 remote", cwd=repo)
    hand_to_image_user(repo)
    status, output = run_in_image(engine, ["sh", "-c", f"cd {repo} && dvc push --quiet"], network=network,
                                  mounts=[bind(repo)], environment=s3)
    assert status == 0, output
    return repo


def docker_runner(network, mounts, environment):
    from kfp import local

    return local.DockerRunner(network=network.name, mounts=mounts, environment=environment)


def test_every_pipeline_step_runs_in_the_image_then_the_unchanged_run_skips(engine, network, s3, s3_repo, tmp_path):
    from kfp import local

    root, workspace = tmp_path / "pipeline-root", tmp_path / "workspace"
    hand_to_image_user(root, workspace)
    runner = docker_runner(network, [bind(workspace, "/workspace"), bind(s3_repo, read_only=True)], s3)
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    arguments = {"repo_url": str(s3_repo), "git_rev": "main", "backend": "local",
                 "param_overrides": ["pretrain.objective=mim"]}              # workspace: /workspace, the PVC's mount
    mapet_pipeline(**arguments)
    [run] = list(root.iterdir())
    check_trained_run(run, workspace, s3_repo, steps_workspace=Path("/workspace"))

    mapet_pipeline(**arguments)
    [skipped] = [path for path in root.iterdir() if path != run]
    check_skipped_run(skipped, workspace)
    files = [path for path in [*root.rglob("*"), *workspace.rglob("*")] if path.is_file()]
    assert not any(s3["AWS_SECRET_ACCESS_KEY"].encode() in path.read_bytes() for path in files)


def materialize_alone(network, s3_repo, tmp_path, environment, workspace_owner: int = IMAGE_USER) -> None:
    """The data step by itself, in the image, on a fresh workspace owned by ``workspace_owner``."""
    from kfp import local

    from components.data.component import materialize_data

    root, workspace = tmp_path / "pipeline-root", tmp_path / "workspace"
    hand_to_image_user(root, workspace)
    os.chown(workspace, workspace_owner, workspace_owner)
    local.init(runner=docker_runner(network, [bind(workspace, "/workspace"), bind(s3_repo, read_only=True)],
                                    environment), pipeline_root=str(root), raise_on_error=True)
    materialize_data(repo_url=str(s3_repo), git_rev="main", workspace="/workspace", dvc_remote="", param_overrides=[],
                     git_secret="mapet-git", dvc_secret="team-s3")


@pytest.mark.parametrize("credentials", ["none", "wrong secret", "unknown key"])
def test_the_data_step_without_valid_credentials_names_the_secret_and_the_remote(network, s3, s3_repo, tmp_path,
                                                                                  capfd, credentials):
    environment = {"none": {}, "wrong secret": {**s3, "AWS_SECRET_ACCESS_KEY": "not-" + s3["AWS_SECRET_ACCESS_KEY"]},
                   "unknown key": {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN00000", "AWS_SECRET_ACCESS_KEY": "s3cr3t-unknown"}
                   }[credentials]
    with pytest.raises(RuntimeError):
        materialize_alone(network, s3_repo, tmp_path, environment)
    output = capfd.readouterr().out
    assert f"the DVC remote 'storage' (s3://{BUCKET}/data) refused the data pull" in output
    assert "the Kubernetes Secret 'team-s3'" in output and "Traceback" not in output.split("refused the data pull")[1]
    assert ("without credentials" in output) == (credentials == "none")
    for secret in (environment.get("AWS_SECRET_ACCESS_KEY"), s3["AWS_SECRET_ACCESS_KEY"]):
        if secret:
            assert secret not in output
            assert not any(secret.encode() in path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())


def test_a_workspace_the_step_user_cannot_write_is_one_message_with_the_fix(network, s3, s3_repo, tmp_path, capfd):
    with pytest.raises(RuntimeError):
        materialize_alone(network, s3_repo, tmp_path, s3, workspace_owner=0)
    output = capfd.readouterr().out
    assert "the workspace /workspace (the volume of the pipeline parameter workspace_pvc) is not writable by this " \
           "step's user, uid 1000" in output
    assert "it belongs to uid 0" in output and "fsGroup: 1000" in output
    assert "Traceback" not in output.split("is not writable")[1].split("\n\n")[0]


# Multi-node: the launcher's own TrainJob manifest on the engine, one container per node.

@pytest.fixture(scope="module")
def shared(tokens, tmp_path_factory):                       # noqa: F811 (the fixture imported above)
    """The folder every node mounts at the same path: the RWX workspace of a cluster."""
    folder = tmp_path_factory.getbasetemp()
    hand_to_image_user(folder)
    return folder


def trainjob(shared: Path, params: Path, nodes: int, resume: bool = False) -> dict:
    command = torchrun_command(["pretrain", "--params", str(params), *(["--resume"] if resume else [])])
    name = f"mapet-test-{uuid.uuid4().hex[:8]}"
    return trainjob_manifest(TrainJobRequest(name=name, namespace="default", image=IMAGE, command=command,
                                             num_nodes=nodes, workspace_path=str(shared)))


def node_params(tokens, folder: Path, workers: int) -> Path:  # noqa: F811
    data, token_dir = tokens
    folder.mkdir(parents=True, exist_ok=True)
    params = write_params(folder, data, token_dir, workers=workers, epochs=6, checkpoint_every=3,
                          collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    hand_to_image_user(folder)
    return params


@pytest.fixture(scope="module")
def runner(engine, shared):
    return DockerTrainJobRunner(engine, volumes={"mapet-workspace": str(shared)}, poll_seconds=0.5)


@pytest.fixture(scope="module")
def two_nodes(tokens, shared, runner):                      # noqa: F811
    """An uninterrupted run: 2 node containers x 1 rank x 1 reader, global batch 16, 6 epochs."""
    folder = shared / "two-nodes"
    runner.run(trainjob(shared, node_params(tokens, folder, workers=1), nodes=2))
    return folder


def wait_for_checkpoint(folder: Path, job, runner, step: str = "step00000006") -> None:
    latest = folder / "out" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text() >= step):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        assert all(code is None for code in runner.exit_codes(job)), runner.exit_codes(job)
        time.sleep(0.2)


def test_two_node_containers_match_one_process_with_the_same_global_batch(tokens, shared, runner, two_nodes):  # noqa: F811
    one = shared / "one-node"
    runner.run(trainjob(shared, node_params(tokens, one, workers=2), nodes=1))
    assert len(history(one)) == len(history(two_nodes)) == 24
    for a, b in zip(history(one), history(two_nodes)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["lr"] == b["lr"]
    for name, tensor in weights(two_nodes).items():
        torch.testing.assert_close(weights(one)[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_killed_node_stops_the_other_and_both_resumed_end_as_if_uninterrupted(tokens, shared, runner,  # noqa: F811
                                                                                two_nodes):
    folder = shared / "killed"
    params = node_params(tokens, folder, workers=1)
    manifest = trainjob(shared, params, nodes=2)
    job = runner.start(manifest)
    try:
        wait_for_checkpoint(folder, job, runner)
        job.nodes[1].kill()                                  # docker kill: the node's torchrun and its rank
        killed_at = time.monotonic()
        while (survivor_status := runner.exit_codes(job)[0]) is None:
            assert time.monotonic() - killed_at < COLLECTIVE_TIMEOUT_S + 30, "the surviving node did not stop"
            time.sleep(0.2)
        waited = time.monotonic() - killed_at
    finally:
        runner.delete(job)
    assert survivor_status != 0, "the surviving node finished as if nothing had happened"
    assert waited < COLLECTIVE_TIMEOUT_S, f"the surviving node took {waited:.0f} s to stop"
    assert not (folder / "out" / "model.safetensors").exists()

    runner.run(trainjob(shared, params, nodes=2, resume=True))   # what a retry of the TrainJob does
    assert history(folder) == history(two_nodes)
    for name, tensor in weights(two_nodes).items():
        torch.testing.assert_close(weights(folder)[name], tensor, rtol=0, atol=1e-6)


def test_a_node_cut_off_the_network_fails_the_job_within_the_collective_timeout(tokens, shared, runner):  # noqa: F811
    folder = shared / "cut-off"
    manifest = trainjob(shared, node_params(tokens, folder, workers=1), nodes=2)
    job = runner.start(manifest)
    try:
        wait_for_checkpoint(folder, job, runner, step="step00000003")
        job.network.disconnect(job.nodes[1], force=True)
        cut_at = time.monotonic()
        with pytest.raises(LaunchError, match=rf"TrainJob {manifest['metadata']['name']} failed: node [01] "
                                              rf"\({manifest['metadata']['name']}-node-0-[01]\) exited with status"):
            runner.wait(job, timeout_seconds=COLLECTIVE_TIMEOUT_S * 4)
        waited = time.monotonic() - cut_at
    finally:
        runner.delete(job)
    assert waited < COLLECTIVE_TIMEOUT_S + 30, f"the job took {waited:.0f} s to fail"
