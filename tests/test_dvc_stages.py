"""dvc.yaml on a tiny pinned repository, with real DVC: `dvc repro` runs every stage and leaves
a clean `dvc status` with metrics and plots declared, and an experiment that changes the
objective reruns pre-training and what follows it, nothing before, and carries its metrics."""

import json
import os
import re

import pytest
import yaml

from tests.browser import Browser
from tests.tiny_repo import ROOT, make_pinned_repo, sh

pytestmark = pytest.mark.slow
STAGES = ["validate", "tokenizer", "tokenize", "pretrain", "probe", "probe-scratch", "pictures", "finetune",
          "evaluate"]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    repo = make_pinned_repo(tmp_path_factory.mktemp("dvc-repo"), with_stages=True)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    output = sh("dvc", "repro", cwd=repo)
    return repo, output


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def test_repro_runs_every_stage_in_order_and_leaves_status_clean(reproduced):
    repo, output = reproduced
    assert sorted(ran(output)) == sorted(STAGES)
    for earlier, later in zip(["validate", "tokenizer", "tokenize", "pretrain", "pretrain", "pretrain", "finetune"],
                              ["tokenizer", "tokenize", "pretrain", "probe", "pictures", "finetune", "evaluate"]):
        assert ran(output).index(earlier) < ran(output).index(later)
    assert sh("dvc", "status", "--json", cwd=repo) == "{}"
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo))
    files = next(iter(metrics.values()))["data"]
    evaluate = files["outputs/evaluate/metrics.json"]["data"]
    assert evaluate["images"] == 20 and 0 <= evaluate["top1"] <= evaluate["top5"] <= 1
    assert files["outputs/pretrain/metrics.json"]["data"]["objective"] == "mapet"
    assert files["reports/validation/validation.json"]["data"]["success"] is True
    for probe in ("outputs/probe/metrics.json", "outputs/probe_scratch/metrics.json"):
        assert 0 <= files[probe]["data"]["knn_top1"] <= 1 and 0 <= files[probe]["data"]["linear_top1"] <= 1
    assert files["outputs/probe_scratch/metrics.json"]["data"]["backbone"] == "scratch"
    knn = [r["knn_top1"] for r in json.loads((repo / "outputs/pretrain/history.json").read_text())]
    assert knn[0] is None and all(0 <= value <= 1 for value in knn[1::2])     # probed every half epoch
    plots = sh("dvc", "plots", "show", "--json", "--split", cwd=repo)
    for plot in ("outputs/pretrain/history.json", "outputs/finetune/history.json", "outputs/evaluate/predictions.csv",
                 "k-NN monitor (pre-training)", "outputs/probe/probe.png", "outputs/pictures/predictions.png",
                 "outputs/pictures/codebook.png"):
        assert plot in plots
    assert '"errors"' not in plots


def test_the_plots_page_renders_offline_with_every_plot(reproduced, tmp_path):
    repo, _ = reproduced
    assert "html_template = plots.html" in (ROOT / ".dvc" / "config").read_text()     # the repository's page
    sh("dvc", "plots", "show", "--html-template", str(ROOT / ".dvc" / "plots.html"), "-o", str(tmp_path / "plots"),
       cwd=repo)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in page and "vegaEmbed" in page
    browser = Browser(tmp_path)
    try:
        rendered = browser.render((tmp_path / "plots" / "index.html").as_uri(), frame_document=False)
    finally:
        browser.close()
    (tmp_path / "plots.png").write_bytes(rendered.screenshot)
    assert rendered.problems == []
    # the PNG plots: cluster sizes, both probes, predictions, codebook, confusion matrix
    assert len(rendered.images) == 6 and all(image["complete"] and image["width"] > 100 for image in rendered.images)
    assert rendered.charts == 4          # pre-training and fine-tuning losses, the k-NN monitor, the confusion matrix


def test_objective_experiment_reruns_pretraining_and_what_follows_only(reproduced):
    repo, _ = reproduced
    output = sh("dvc", "exp", "run", "-n", "mim", "-S", "pretrain.objective=mim", cwd=repo)
    assert sorted(ran(output)) == ["evaluate", "finetune", "pictures", "pretrain", "probe"]
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo))
    experiments = [e for entry in shown for e in entry.get("experiments") or []]
    [mim] = [e for e in experiments if e.get("name") == "mim"]
    data = mim["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["pretrain"]["objective"] == "mim"
    metrics = data["metrics"]                       # committed with the experiment, so comparable
    assert metrics["outputs/pretrain/metrics.json"]["data"]["objective"] == "mim"
    assert 0 <= metrics["outputs/evaluate/metrics.json"]["data"]["top1"] <= 1


def test_preset_choice_is_a_dependency_of_every_stage(reproduced):
    repo, _ = reproduced
    assert sh("dvc", "status", "--json", cwd=repo) == "{}"
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load(params), "preset": "paper"}))
    try:
        changed = json.loads(sh("dvc", "status", "--json", cwd=repo))
        assert sorted(changed) == sorted(STAGES)
    finally:
        (repo / "params.yaml").write_text(params)
