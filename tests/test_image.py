"""The project image's Dockerfile, read statically (tests/test_containers.py runs the built image):
the build's pip settings confined to the packages stage, the locked packages before the code, a
non-root user that matches the TrainingRuntime's securityContext, and the image name the pipeline
is compiled with."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "components" / "Dockerfile").read_text()


def stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) of each build stage, in order."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    found: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, arguments = line.strip().partition(" ")
        if name == "FROM":
            found.append([])
        if found:
            found[-1].append((name, arguments))
    return found


def instructions(name: str, stage: int = -1) -> list[str]:
    return [arguments for instruction, arguments in stages()[stage] if instruction == name]


def test_only_the_packages_stage_sees_the_build_pip_settings():
    system, packages, final = stages()
    assert packages[0] == ("FROM", "system AS packages") and final[0] == ("FROM", "system")
    assert "build/pip/ /etc/mapet-build/" in instructions("COPY", 1)
    assert not any("build/pip" in arguments or "mapet-build" in arguments for _, arguments in final)
    assert "--from=packages /opt/venv /opt/venv" in instructions("COPY", 2)


def test_installs_the_lock_then_the_code_the_components_import():
    assert any("pip install -q --no-cache-dir -r /opt/mapet/requirements.lock" in run for run in instructions("RUN", 1))
    copied = [line.split()[-1] for line in instructions("COPY")]
    assert copied[0] == "/opt/venv" and {"/opt/mapet/src", "/opt/mapet/components", "/opt/mapet/pipelines"} <= set(copied)
    environment = " ".join(instructions("ENV", 0))
    assert "PYTHONPATH=/opt/mapet" in environment and "HF_HUB_OFFLINE=1" in environment


def test_runs_as_the_non_root_user_the_runtime_expects():
    user = instructions("USER")[-1]
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
