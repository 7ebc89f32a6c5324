"""The Kubeflow pipeline: the committed YAML is what the code compiles to, and the whole pipeline
runs under kfp.local (SubprocessRunner, real components, real DVC pull) on a tiny pinned repo."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipelines.mapet_pipeline import COMPILED, compile_pipeline
from tests.pipeline_checks import check_html_artifacts, check_skipped_run, check_trained_run
from tests.tiny_repo import ROOT, make_pinned_repo, sh


@pytest.fixture(scope="module")
def pinned_repo(tmp_path_factory):
    return make_pinned_repo(tmp_path_factory.mktemp("repo"))


def test_committed_pipeline_yaml_is_current(tmp_path, monkeypatch):
    monkeypatch.delenv("MAPET_IMAGE", raising=False)
    fresh = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert COMPILED.read_text() == fresh, "pipelines/mapet_pipeline.yaml is stale: run `make pipeline` and commit it"


def test_compiled_pipeline_chains_the_steps_and_mounts_the_workspace():
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"materialize-data", "validate", "check-registry", "condition-1"}
    assert root["check-registry"]["inputs"]["parameters"]["fingerprint"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "materialize-data"}
    assert root["condition-1"]["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--check-registry-Output'] == 'train'"
    assert set(spec["components"]["comp-condition-1"]["dag"]["tasks"]) == {"train-and-promote"}
    trained = spec["components"]["comp-train-and-promote"]                      # what a registered fingerprint skips
    tasks = trained["dag"]["tasks"]
    assert set(tasks) == {"build-tokenizer", "tokenize", "pretrain", "probe", "pictures", "finetune", "evaluate",
                          "promotion-gate", "summarize"}
    assert {"evaluate", "finetune", "pretrain"} <= set(tasks["promotion-gate"]["dependentTasks"])
    assert "promotion-gate" in tasks["summarize"]["dependentTasks"]
    for uncached in ("check-registry", "materialize-data"):
        assert root[uncached]["cachingOptions"] == {}, uncached
    assert tasks["promotion-gate"]["cachingOptions"] == {}
    for gpu_step in ("build-tokenizer", "tokenize", "probe", "finetune"):   # the setting's channel reaches the step
        assert tasks[gpu_step]["inputs"]["parameters"]["pipelinechannel--step_gpus"] == {
            "componentInputParameter": "step_gpus"}, gpu_step
    assert "step_gpus" in trained["inputDefinitions"]["parameters"]
    assert spec["components"]["comp-pictures"]["outputDefinitions"]["artifacts"]["report"]["artifactType"][
        "schemaTitle"] == "system.HTML"
    assert tasks["pretrain"]["retryPolicy"]["maxRetryCount"] == 2
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["pvcMount"][0]["mountPath"] == "/workspace" for e in executors.values()) and len(executors) == 11
    assert [secret["secretNameParameter"] for secret in executors["exec-materialize-data"]["secretAsEnv"]] == [
        {"componentInputParameter": "dvc_secret"}, {"componentInputParameter": "git_secret"}]
    assert all(secret["optional"] for secret in executors["exec-materialize-data"]["secretAsEnv"])
    for component in ("comp-pretrain", "comp-finetune"):
        assert spec["components"][component]["outputDefinitions"]["artifacts"]["curves"]["artifactType"][
            "schemaTitle"] == "system.HTML"
    for name, executor in spec["deploymentSpec"]["executors"].items():
        assert executor["container"]["image"] == "ghcr.io/mapet-project/mapet:0.1.0", name
        assert "pip install" not in json.dumps(executor["container"]["command"]), name


@pytest.mark.slow
def test_whole_pipeline_runs_under_kfp_local_then_skips_the_unchanged_run(pinned_repo, tmp_path, monkeypatch):
    from kfp import local

    from pipelines.mapet_pipeline import mapet_pipeline

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "pipeline-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    workspace = tmp_path / "workspace"
    arguments = {"repo_url": str(pinned_repo), "git_rev": "main", "dvc_remote": str(pinned_repo / ".dvc" / "cache"),
                 "workspace": str(workspace), "backend": "local", "param_overrides": ["pretrain.objective=mim"]}
    mapet_pipeline(**arguments)

    [run] = list(root.iterdir())
    check_trained_run(run, workspace, pinned_repo)
    check_html_artifacts(run, tmp_path / "pages")

    mapet_pipeline(**arguments)                              # same commit, data and parameters: nothing to train
    [skipped] = [path for path in root.iterdir() if path != run]
    check_skipped_run(skipped, workspace)


class FakeKfpClient:
    """The kfp.Client calls the commands make, over lists (no Kubeflow can run here)."""

    def __init__(self):
        self.pipelines, self.versions, self.runs, self.recurring, self.experiments = {}, [], [], [], {}

    def get_pipeline_id(self, name):
        return self.pipelines.get(name)

    def upload_pipeline(self, path, pipeline_name):
        assert Path(path) == COMPILED
        self.pipelines[pipeline_name] = f"p-{len(self.pipelines)}"
        return SimpleNamespace(pipeline_id=self.pipelines[pipeline_name])

    def list_pipeline_versions(self, pipeline_id, page_size):
        return SimpleNamespace(pipeline_versions=[v for v in self.versions if v.pipeline_id == pipeline_id] or None)

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id):
        version = SimpleNamespace(display_name=pipeline_version_name, pipeline_id=pipeline_id,
                                  pipeline_version_id=f"v-{len(self.versions)}")
        self.versions.append(version)
        return version

    def create_experiment(self, name):
        return SimpleNamespace(experiment_id=self.experiments.setdefault(name, f"e-{len(self.experiments)}"))

    def run_pipeline(self, **run):
        self.runs.append(run)
        return SimpleNamespace(run_id=f"r-{len(self.runs)}")

    def list_recurring_runs(self, experiment_id, page_size):
        return SimpleNamespace(recurring_runs=[r for r in self.recurring if r.experiment_id == experiment_id])

    def delete_recurring_run(self, recurring_run_id):
        self.recurring = [r for r in self.recurring if r.recurring_run_id != recurring_run_id]

    def create_recurring_run(self, **run):
        created = SimpleNamespace(display_name=run["job_name"], recurring_run_id=f"rr-{len(self.runs)}-{run['params']}",
                                  **run)
        self.recurring.append(created)
        return created


def test_version_name_names_the_commit_and_the_data_and_refuses_a_dirty_checkout(pinned_repo, tmp_path):
    from mapet.errors import MapetError
    from pipelines.cli import version_name

    md5 = yaml.safe_load((pinned_repo / "data.dvc").read_text())["outs"][0]["md5"]
    commit = sh("git", "rev-parse", "HEAD", cwd=pinned_repo)
    assert version_name(pinned_repo) == f"{commit[:12]}-data-{md5[:8]}"
    params = pinned_repo / "params.yaml"
    original = params.read_text()
    params.write_text(original + "\n# edited\n")
    try:
        with pytest.raises(MapetError, match="uncommitted changes"):
            version_name(pinned_repo)
    finally:
        params.write_text(original)


def test_upload_is_idempotent_and_schedule_replaces_the_recurring_run():
    from pipelines.cli import schedule, start_run, upload

    client = FakeKfpClient()
    settings = {"name": "mapet", "experiment": "mapet",
                "schedule": {"name": "mapet-retrain", "cron": "0 0 3 * * 1", "max_concurrency": 1}}
    first = upload(client, "mapet", "abc123-data-0f0f")
    assert upload(client, "mapet", "abc123-data-0f0f") == first and len(client.versions) == 1
    second = upload(client, "mapet", "def456-data-0f0f")
    assert second[0] == first[0] and second[1] != first[1] and len(client.versions) == 2

    start_run(client, settings, *second, "def456-data-0f0f", {"repo_url": "u", "git_rev": "def456"})
    [run] = client.runs
    assert (run["pipeline_id"], run["version_id"], run["job_name"]) == (*second, "mapet-def456-data-0f0f")
    assert run["params"] == {"repo_url": "u", "git_rev": "def456"}

    schedule(client, settings, *first, {"repo_url": "u", "git_rev": "main"})
    schedule(client, settings, *second, {"repo_url": "u", "git_rev": "main", "num_nodes": 2})
    [recurring] = client.recurring
    assert recurring.version_id == second[1] and recurring.cron_expression == "0 0 3 * * 1"
    assert recurring.params["num_nodes"] == 2 and recurring.no_catchup and recurring.max_concurrency == 1


def test_commands_refuse_a_stale_compiled_pipeline(monkeypatch, capsys):
    from pipelines import cli

    monkeypatch.setattr(cli, "compile_pipeline", lambda path: Path(path).write_text("stale") and Path(path))
    assert cli.main(["upload", "--host", "http://kfp.invalid"]) == 2
    assert "is stale" in capsys.readouterr().err


def test_run_arguments_take_params_defaults_then_typed_overrides():
    from mapet.errors import MapetError
    from pipelines.cli import run_arguments

    settings = {"repo_url": "https://git.example/mapet.git", "arguments": {"backend": "trainjob", "num_nodes": 1}}
    arguments = run_arguments(settings, ["num_nodes=2", 'param_overrides=["preset=paper"]', "backend=local"], "abc")
    assert arguments == {"repo_url": "https://git.example/mapet.git", "git_rev": "abc", "backend": "local",
                         "num_nodes": 2, "param_overrides": ["preset=paper"]}
    with pytest.raises(MapetError, match="expected NAME=VALUE"):
        run_arguments(settings, ["num_nodes"], "abc")
