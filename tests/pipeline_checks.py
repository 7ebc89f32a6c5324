"""What a whole-pipeline run under kfp.local must have produced, whichever runner ran its steps
(test_pipeline: subprocesses; test_containers: the image, under DockerRunner)."""

import json
from pathlib import Path

import pytest
import yaml

from tests.tiny_repo import sh


def check_trained_run(run: Path, workspace: Path, pinned_repo: Path, steps_workspace: Path | None = None) -> None:
    """Every step of the first run succeeded and left its artifacts, metrics and registry record;
    ``workspace`` is the workspace folder here, ``steps_workspace`` where the steps saw it."""
    steps_workspace = steps_workspace or workspace
    md5 = yaml.safe_load((pinned_repo / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")
    data = workspace / "data" / md5
    assert (data / ".complete").read_text().strip() == sh("git", "-c", "safe.directory=*", "rev-parse", "HEAD",
                                                          cwd=pinned_repo)   # the repository may be the steps user's
    assert sorted(p.name for p in (data / "shards").iterdir())[:2] == ["test-00000.tar", "test-00001.tar"]
    [job] = list((workspace / "jobs").iterdir())
    assert yaml.safe_load((job / "params.yaml").read_text())["pretrain"]["objective"] == "mim"   # the override
    pretrain_metrics = json.loads((job / "out" / "metrics.json").read_text())
    assert pretrain_metrics["objective"] == "mim" and pretrain_metrics["steps"] == 4

    outputs = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    for expected in ("validate/report", "build-tokenizer/codebook", "tokenize/report", "tokenize/tokens/tokens.npy",
                     "pretrain/backbone", "pretrain/model", "pretrain/curves", "pictures/report", "finetune/model",
                     "finetune/curves", "summarize/summary"):
        assert expected in outputs, sorted(outputs)
    evaluated = json.loads((run / "evaluate" / "executor_output.json").read_text())["artifacts"]
    metrics = evaluated["metrics"]["artifacts"][0]["metadata"]
    assert metrics["images"] == 20 and 0 <= metrics["top1"] <= metrics["top5"] <= 1
    matrix = evaluated["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert len(matrix["annotationSpecs"]) == 10 and sum(map(sum, (r["row"] for r in matrix["rows"]))) == 20
    correct = sum(row["row"][i] for i, row in enumerate(matrix["rows"]))
    assert correct / 20 == pytest.approx(metrics["top1"])
    probed = json.loads((run / "probe" / "executor_output.json").read_text())["artifacts"]
    for name in ("metrics", "scratch_metrics"):
        probe_metrics = probed[name]["artifacts"][0]["metadata"]
        assert probe_metrics["test_images"] == 20 and 0 <= probe_metrics["knn_top1"] <= 1, name
        assert 0 < probe_metrics["pixels_linear_top1"] <= 1, name
    described = json.loads((run / "materialize-data" / "executor_output.json").read_text())["artifacts"]
    assert described["data"]["artifacts"][0]["metadata"]["data_md5"] == md5
    assert "data:image/png;base64," in (run / "pretrain" / "curves").read_text()
    summary = (run / "summarize" / "summary").read_text()
    pixels = probed["metrics"]["artifacts"][0]["metadata"]["pixels_linear_top1"]
    assert f"| probe, pre-trained backbone | pixels_linear_top1 | {pixels:.4f} |" in summary
    assert md5 in summary and "`pretrain.objective=mim`" in summary and f"| evaluation | top1 | {metrics['top1']:.4f} |" \
        in summary

    fingerprint = described["data"]["artifacts"][0]["metadata"]["fingerprint"]
    assert "# Training" in (run / "check-registry" / "report").read_text()
    gate = json.loads((run / "promotion-gate" / "executor_output.json").read_text())["artifacts"]["metrics"]
    assert gate["artifacts"][0]["metadata"] == {"promoted": 1.0, "candidate_top1": metrics["top1"], "min_delta": 0.005}
    assert "## Promotion to 'prod': **promoted**" in summary and "the first model is promoted" in summary
    [record] = [json.loads(path.read_text()) for path in (workspace / "registry" / "mapet").glob("*.json")]
    assert (record["version"], record["stage"], record["fingerprint"], record["top1"]) == (
        "v1", "prod", fingerprint, metrics["top1"])
    assert record["uri"] == str(run / "finetune" / "model") and (workspace / Path(record["classifier_path"]).relative_to(steps_workspace)).is_file()



def check_skipped_run(skipped: Path, workspace: Path) -> None:
    """The second run of the same commit, data and parameters stopped at the registry lookup."""
    assert sorted(path.name for path in skipped.iterdir()) == ["check-registry", "materialize-data", "validate"]
    report = (skipped / "check-registry" / "report").read_text()
    assert report.startswith("# Skipped: nothing changed") and "| registered as | v1 (stage: prod" in report
    assert len(list((workspace / "registry" / "mapet").glob("*.json"))) == 1


# The pipeline's HTML artifacts, as the Kubeflow UI shows them, and the images each must show.
HTML_ARTIFACTS = {"validate/report": 0, "pretrain/curves": 1, "pictures/report": 2, "finetune/curves": 1}


def check_html_artifacts(run: Path, folder: Path) -> None:
    """Every HTML artifact renders in headless Chromium inside the Kubeflow UI's sandboxed frame
    with nothing failing to load, no script error or blocked feature, and every image decoded;
    the screenshots are left in ``folder``."""
    from tests.browser import Browser, kubeflow_frame

    folder.mkdir(parents=True, exist_ok=True)
    browser = Browser(folder)
    try:
        for artifact, images in HTML_ARTIFACTS.items():
            name = artifact.replace("/", "-")
            rendered = browser.render(kubeflow_frame((run / artifact).read_text(), folder, name), frame_document=True)
            (folder / f"{name}.png").write_bytes(rendered.screenshot)
            assert rendered.problems == [], (artifact, rendered.problems)
            assert len(rendered.images) == images, (artifact, rendered.images)
            assert all(image["complete"] and image["width"] > 100 for image in rendered.images), (artifact, rendered.images)
            assert len(rendered.screenshot) > 10_000, artifact
    finally:
        browser.close()
