"""Scheduled retraining's decisions: the fingerprint, the skip, and the promotion gate over both
registries (the workspace's JSON files, and Kubeflow Model Registry through its real client
against a stand-in of its REST server)."""

import json

import pytest
import yaml

from mapet.errors import MapetError
from mapet.params import load_params
from mapet.registry.fingerprint import code_revision, fingerprint, skip_decision
from mapet.registry.gate import gate, holding, next_version
from mapet.registry.kubeflow import KubeflowRegistry
from mapet.registry.workspace import WorkspaceRegistry
from tests.fake_model_registry import FakeModelRegistry
from tests.tiny_repo import TINY_PARAMS


def params_file(tmp_path, document) -> dict:
    path = tmp_path / f"params-{len(list(tmp_path.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_params(path)


def test_the_fingerprint_follows_data_training_parameters_and_code_not_how_the_pipeline_runs(tmp_path):
    base = params_file(tmp_path, TINY_PARAMS)
    reference = fingerprint("a" * 32, base, "c0de")
    assert fingerprint("b" * 32, base, "c0de") != reference
    assert fingerprint("a" * 32, base, "c0df") != reference
    changed = params_file(tmp_path, {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "lr": 2e-3}})
    assert fingerprint("a" * 32, changed, "c0de") != reference
    scheduled = params_file(tmp_path, {**TINY_PARAMS, "pipeline": {"promotion": {"stage": "prod", "min_delta": 0.5},
                                                                   "schedule": {"cron": "0 0 4 * * *"}}})
    assert fingerprint("a" * 32, scheduled, "c0de") == reference
    # a preset is what it sets: choosing it fingerprints as writing its values out
    chosen = params_file(tmp_path, {**TINY_PARAMS, "preset": "paper"})
    written = params_file(tmp_path, {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "epochs": 300},
                                     "presets": {}})
    assert fingerprint("a" * 32, chosen, "c0de") != reference
    assert fingerprint("a" * 32, {**chosen, "preset": None}, "c0de") == fingerprint("a" * 32, written, "c0de")


def test_the_code_revision_changes_with_a_training_library(monkeypatch):
    from importlib import metadata

    before = code_revision()
    assert len(before) == 16 and int(before, 16) >= 0
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "9.9.9" if name == "timm" else real(name))
    assert code_revision() != before


@pytest.fixture(params=["workspace", "kubeflow"])
def registry(request, tmp_path):
    if request.param == "workspace":
        yield WorkspaceRegistry(tmp_path / "registry", "mapet")
        return
    server = FakeModelRegistry()
    with pytest.warns(UserWarning, match="token"):          # a plain-http registry inside the cluster: no token
        yield KubeflowRegistry(server.url, "mapet")
    server.close()


def candidate(name: str, top1: float, data_md5: str = "d" * 32) -> dict:
    return {"fingerprint": name * 64, "git_commit": name * 40, "data_md5": data_md5, "split": "test", "top1": top1,
            "classifier_path": f"/workspace/models/{name}/classifier.safetensors"}


def test_the_gate_promotes_the_first_model_and_then_only_a_clear_winner(registry):
    never = lambda path: pytest.fail("the champion was evaluated on the same data: no re-evaluation")  # noqa: E731
    first = gate(registry, candidate("a", 0.700), "s3://models/a", "prod", 0.005, never)
    assert first.promoted and first.candidate_version == "v1" and "first model" in first.reason

    small = gate(registry, candidate("b", 0.703), "s3://models/b", "prod", 0.005, never)
    assert not small.promoted and small.champion_version == "v1" and small.champion_top1 == 0.7
    assert "+0.0030, less than min_delta 0.005" in small.reason

    large = gate(registry, candidate("c", 0.720), "s3://models/c", "prod", 0.005, never)
    assert large.promoted and large.candidate_version == "v3" and large.champion_revision == "a" * 40

    versions = registry.versions()
    assert [(v["version"], v["stage"], v["uri"]) for v in versions] == [
        ("v1", "none", "s3://models/a"), ("v2", "none", "s3://models/b"), ("v3", "prod", "s3://models/c")]
    assert holding(versions, "prod")["fingerprint"] == "c" * 64
    assert versions[1]["top1"] == 0.703 and versions[1]["data_md5"] == "d" * 32       # refused, still registered


def test_a_champion_of_other_data_is_evaluated_again_on_the_candidates(registry):
    gate(registry, candidate("a", 0.99, data_md5="0" * 32), "s3://models/a", "prod", 0.005, lambda path: 0.0)
    asked = []
    decision = gate(registry, candidate("b", 0.60), "s3://models/b", "prod", 0.005,
                    lambda path: asked.append(path) or 0.55)
    assert asked == ["/workspace/models/a/classifier.safetensors"]
    assert decision.champion_top1 == 0.55 and decision.promoted and "evaluated again" in decision.reason


def test_a_registered_fingerprint_is_skipped_unless_forced(registry):
    skip, reason = skip_decision(registry, "a" * 64, force=False)
    assert not skip and reason.startswith("# Training\n")
    gate(registry, candidate("a", 0.70), "s3://models/a", "prod", 0.005, lambda path: 0.0)
    skip, reason = skip_decision(registry, "a" * 64, force=False)
    assert skip and reason.startswith("# Skipped: nothing changed") and "| registered as | v1 (stage: prod" in reason
    assert "`force=True`" in reason and f"`{'a' * 40}`" in reason
    skip, reason = skip_decision(registry, "a" * 64, force=True)
    assert not skip and reason.startswith("# Training (forced)")
    assert not skip_decision(registry, "b" * 64, force=False)[0]


def test_kubeflow_versions_carry_the_metadata_as_custom_properties():
    server = FakeModelRegistry()
    try:
        with pytest.warns(UserWarning, match="token"):
            registry = KubeflowRegistry(server.url, "mapet")
        gate(registry, {**candidate("a", 0.7), "params": json.dumps({"pretrain": {"lr": 0.001}})}, "s3://models/a",
             "prod", 0.005, lambda path: 0.0)
        [model] = server.models.values()
        [version] = server.versions.values()
        [artifact] = server.artifacts.values()
        assert model["name"] == "mapet" and version["name"] == "v1" and version["registeredModelId"] == model["id"]
        properties = version["customProperties"]
        assert properties["stage"] == {"string_value": "prod", "metadataType": "MetadataStringValue"}
        assert properties["top1"] == {"double_value": 0.7, "metadataType": "MetadataDoubleValue"}
        assert json.loads(properties["params"]["string_value"]) == {"pretrain": {"lr": 0.001}}
        assert (artifact["uri"], artifact["modelFormatName"], artifact["artifactType"]) == (
            "s3://models/a", "safetensors", "model-artifact")
    finally:
        server.close()


def test_an_unreachable_kubeflow_registry_is_named():
    with pytest.raises(MapetError, match=r"cannot reach Kubeflow Model Registry at http://127.0.0.1:9 .*registry_url"):
        with pytest.warns(UserWarning):
            KubeflowRegistry("http://127.0.0.1:9", "mapet")


def test_a_damaged_workspace_record_is_named(tmp_path):
    registry = WorkspaceRegistry(tmp_path, "mapet")
    (tmp_path / "mapet").mkdir()
    (tmp_path / "mapet" / "v1.json").write_text("{not json")
    with pytest.raises(MapetError, match=r"v1.json: unreadable registry record"):
        skip_decision(registry, "a" * 64, force=False)


def test_a_workspace_version_is_never_overwritten(tmp_path):
    registry = WorkspaceRegistry(tmp_path, "mapet")
    before = next_version(registry.versions())                    # a run lists the versions, then another registers
    registry.register(next_version(registry.versions()), candidate("a", 0.7), "s3://models/a")
    with pytest.raises(MapetError, match=r"v1.json exists already: another run registered v1 at the same time"):
        registry.register(before, candidate("b", 0.8), "s3://models/b")
    assert json.loads((tmp_path / "mapet" / "v1.json").read_text())["fingerprint"] == "a" * 64
    assert sorted(path.name for path in (tmp_path / "mapet").iterdir()) == ["v1.json"]


def test_mapet_registry_list_shows_the_versions_newest_first(tmp_path, capsys):
    from mapet.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    assert main(["registry", "list", "--params", str(params)]) == 2
    assert "no registry to read: pass --url" in capsys.readouterr().err
    registry = WorkspaceRegistry(tmp_path / "registry", "mapet")
    assert main(["registry", "list", "--params", str(params), "--workspace", str(tmp_path)]) == 0
    assert capsys.readouterr().out.endswith("no versions yet\n")

    gate(registry, candidate("a", 0.7), "s3://models/a", "prod", 0.005, lambda path: 0.0)
    gate(registry, {**candidate("b", 0.71), "pipeline_run": "run-2"}, "s3://models/b", "prod", 0.005,
         lambda path: 0.0)
    assert main(["registry", "list", "--params", str(params), "--workspace", str(tmp_path)]) == 0
    header, newest, oldest = capsys.readouterr().out.splitlines()[1:]
    assert header.split() == ["version", "stage", "test", "top-1", "data", "commit", "fingerprint", "pipeline", "run"]
    assert newest.split() == ["v2", "prod", "0.7100", "dddddddd", "b" * 12, "b" * 16, "run-2"]
    assert oldest.split() == ["v1", "none", "0.7000", "dddddddd", "a" * 12, "a" * 16]


def test_mapet_registry_list_reads_kubeflow_model_registry(tmp_path, capsys):
    from mapet.cli import main

    server = FakeModelRegistry()
    try:
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({**TINY_PARAMS, "pipeline": {"arguments": {"registry_url": server.url,
                                                                                    "registry_model": "vit"}}}))
        with pytest.warns(UserWarning, match="token"):
            gate(KubeflowRegistry(server.url, "vit"), candidate("a", 0.7), "s3://models/a", "prod", 0.005,
                 lambda path: 0.0)
            assert main(["registry", "list", "--params", str(params)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"Kubeflow Model Registry {server.url}, model 'vit'" and out[2].split()[:3] == [
            "v1", "prod", "0.7000"]
    finally:
        server.close()
