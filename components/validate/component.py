from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(data: Input[Dataset], params: Input[Artifact], report: Output[HTML], results: Output[Metrics]):
    """`mapet validate`: the Great Expectations rules; the step fails when the data does."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from components.runtime import StepError, mapet

    out = Path(tempfile.mkdtemp())
    try:
        mapet("validate", "--params", params.path, "--data", data.metadata["path"], "--report", out)
    finally:
        if (out / "validation.html").is_file():
            shutil.copy(out / "validation.html", report.path)
    document = json.loads((out / "validation.json").read_text())
    results.log_metric("rules", len(document["rules"]))
    results.log_metric("rules_failed", document["rules_failed"])
    if not document["success"]:
        raise StepError("the data fails validation")
