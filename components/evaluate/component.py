from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(data: Input[Dataset], params: Input[Artifact], model: Input[Model], metrics: Output[Metrics],
             confusion: Output[ClassificationMetrics]):
    """`mapet evaluate`: top-1, top-5 and per-class accuracy, and the confusion matrix."""
    import csv
    import json
    import tempfile
    from pathlib import Path

    from components.runtime import log_json_metrics, mapet

    out = Path(tempfile.mkdtemp())
    mapet("evaluate", "--params", params.path, "--data", data.metadata["path"], "--model", model.path, "--out", out)
    log_json_metrics(metrics, out / "metrics.json")
    classes = json.loads((Path(data.metadata["path"]) / "dataset.json").read_text())["classes"]
    index = {name: i for i, name in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    with open(out / "predictions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            matrix[index[row["actual"]]][index[row["predicted"]]] += 1
    confusion.log_confusion_matrix(classes, matrix)
