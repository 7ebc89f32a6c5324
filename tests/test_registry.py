"""`mapet promote`: the promotion gate over committed runs and GTO's registry, on a real git and
DVC repository (the tiny pinned one) whose commits stand for evaluated runs."""

import json

import pytest
import timm
import yaml

from mapet.cli import main
from mapet.models import save_classifier
from tests.tiny_repo import GIT_IDENTITY, make_pinned_repo, sh


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for name, value in GIT_IDENTITY.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "repo").mkdir()
    return make_pinned_repo(tmp_path / "repo")


def commit_run(repo, top1: float, classifier: bool = False, data_md5: str | None = None) -> str:
    """A commit that stands for an evaluated run: its metrics, and optionally its classifier in DVC."""
    (repo / "outputs" / "evaluate").mkdir(parents=True, exist_ok=True)
    (repo / "outputs" / "evaluate" / "metrics.json").write_text(json.dumps({"split": "test", "top1": top1}))
    if classifier:
        kwargs = {"img_size": 28, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
        model = timm.create_model("vit_tiny_patch16_224", **kwargs)
        (repo / "outputs" / "finetune").mkdir(parents=True, exist_ok=True)
        save_classifier(model, "vit_tiny_patch16_224", kwargs, [str(i) for i in range(10)],
                        repo / "outputs" / "finetune" / "model.safetensors")
        sh("dvc", "add", "--quiet", "outputs/finetune/model.safetensors", cwd=repo)
    if data_md5:
        pinned = yaml.safe_load((repo / "data.dvc").read_text())
        pinned["outs"][0]["md5"] = data_md5
        (repo / "data.dvc").write_text(yaml.safe_dump(pinned))
    sh("git", "add", "-A", "-f", "outputs/evaluate", "data.dvc", *(["outputs/finetune"] if classifier else []), cwd=repo)
    sh("git", "commit", "--quiet", "-m", f"run with top-1 {top1}", cwd=repo)
    return sh("git", "rev-parse", "HEAD", cwd=repo)


def promote(repo, capsys) -> dict:
    out = repo / "outputs" / "promotion"
    assert main(["promote", "--repo", str(repo), "--params", str(repo / "params.yaml"), "--data", str(repo / "data"),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    return json.loads((out / "decision.json").read_text())


def test_the_first_run_is_promoted_a_small_gain_is_not_a_large_one_is(repo, capsys):
    first = commit_run(repo, 0.700)
    decision = promote(repo, capsys)
    assert decision["promoted"] and "first model" in decision["reason"] and decision["candidate_version"] == "v0.0.1"
    assert {"classifier@v0.0.1", "backbone@v0.0.1"} <= set(sh("git", "tag", cwd=repo).split())

    commit_run(repo, 0.703)                                            # +0.003 < min_delta 0.005
    decision = promote(repo, capsys)
    assert not decision["promoted"] and decision["candidate_version"] == "v0.0.2"      # registered all the same
    assert decision["champion_top1"] == 0.7 and "less than min_delta 0.005" in decision["reason"]
    assert "**not promoted** (registered only)" in (repo / "outputs" / "promotion" / "decision.md").read_text()
    prod_tags = [tag for tag in sh("git", "tag", cwd=repo).split() if tag.startswith("classifier#prod")]
    assert prod_tags == ["classifier#prod#1"] and sh("git", "rev-list", "-n", "1", "classifier#prod#1", cwd=repo) == first

    third = commit_run(repo, 0.720)
    decision = promote(repo, capsys)
    assert decision["promoted"] and decision["champion_version"] == "v0.0.1" and decision["candidate_version"] == "v0.0.3"
    assert "+0.0200" in decision["reason"]
    assert sh("git", "rev-list", "-n", "1", "classifier#prod#2", cwd=repo) == third

    again = promote(repo, capsys)                                      # the same run twice: nothing new
    assert not again["promoted"] and "already" in again["reason"] and again["candidate_version"] == "v0.0.3"


def test_a_champion_of_other_data_is_evaluated_again_on_the_candidates(repo, capsys):
    commit_run(repo, 0.99, classifier=True)                           # a random classifier claiming 99 %
    assert promote(repo, capsys)["promoted"]
    commit_run(repo, 0.5, data_md5="0" * 32 + ".dir")                 # new data version, an honest 50 %
    decision = promote(repo, capsys)
    assert "evaluated again on the candidate's data version" in decision["reason"]
    assert decision["champion_top1"] < 0.5 and decision["promoted"]   # the champion's real top-1 on this data


def test_an_uncommitted_run_is_refused_with_what_to_do(repo, capsys):
    assert main(["promote", "--repo", str(repo), "--params", str(repo / "params.yaml"), "--data", str(repo / "data"),
                 "--out", str(repo / "outputs" / "promotion")]) == 2
    assert "outputs/evaluate/metrics.json is not committed at HEAD: run `dvc repro`, then commit" in \
        capsys.readouterr().err


def test_mapet_registry_list_reads_gtos_registry(repo, capsys):
    first = commit_run(repo, 0.700)
    promote(repo, capsys)
    second = commit_run(repo, 0.703)
    promote(repo, capsys)
    assert main(["registry", "list", "--repo", str(repo), "--params", str(repo / "params.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"GTO's registry in {repo} (git tags)" and lines[1].split()[:3] == ["version", "stage", "test"]
    assert lines[2].split()[:4] == ["v0.0.2", "none", "0.7030", yaml.safe_load((repo / "data.dvc").read_text())[
        "outs"][0]["md5"][:8]] and second[:12] in lines[2]
    assert lines[3].split()[:3] == ["v0.0.1", "prod", "0.7000"] and first[:12] in lines[3]
