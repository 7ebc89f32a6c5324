"""The project image's Dockerfile, read statically (no Docker engine runs here): a CUDA base
pinned by digest, the locked packages, the code the components import, a non-root user that
matches the TrainingRuntime's securityContext, and the image name the pipeline is compiled with."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "components" / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.split(None, 1)[:1] == [name]]


def test_base_is_cuda_pinned_by_digest():
    [base] = instructions("FROM")
    assert re.fullmatch(r"nvidia/cuda:[\w.-]+-runtime-ubuntu[\d.]+@sha256:[0-9a-f]{64}", base), base


def test_installs_the_lock_and_the_code_the_components_import():
    run = " ".join(instructions("RUN"))
    assert "pip install --no-cache-dir -r /opt/mapet/requirements.lock" in run
    copied = {line.split()[-1] for line in instructions("COPY")}
    assert {"/opt/mapet/src", "/opt/mapet/components", "/opt/mapet/pipelines"} <= copied
    assert "PYTHONPATH=/opt/mapet" in " ".join(instructions("ENV"))


def test_runs_as_the_non_root_user_the_runtime_expects():
    [user] = instructions("USER")
    uid = int(user.split(":")[0])
    assert uid != 0
    runtime = yaml.safe_load((ROOT / "k8s" / "base" / "trainingruntime.yaml").read_text())
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"] is True


def test_image_name_is_the_one_components_and_manifests_use():
    from components import IMAGE

    makefile_image = re.search(r"^IMAGE \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    runtime = (ROOT / "k8s" / "base" / "trainingruntime.yaml").read_text()
    assert makefile_image == IMAGE and f"image: {IMAGE}" in runtime
