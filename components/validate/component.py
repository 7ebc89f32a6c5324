from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(data: Input[Dataset], params: Input[Artifact], report: Output[HTML], results: Output[Metrics]):
    """`mapet validate`: the Great Expectations rules; the step fails when the data does, and its
    log lists the failed rules and offending images."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from components.runtime import mapet

    out = Path(tempfile.mkdtemp())
    mapet("validate", "--params", params.path, "--data", data.metadata["path"], "--report", out)
    shutil.copy(out / "validation.html", report.path)
    document = json.loads((out / "validation.json").read_text())
    results.log_metric("rules", len(document["rules"]))
    results.log_metric("rules_failed", document["rules_failed"])
