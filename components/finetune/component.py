from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune(data: Input[Dataset], params: Input[Artifact], backbone: Input[Model], model: Output[Model],
             metrics: Output[Metrics], curves: Output[HTML]):
    """`mapet finetune`: the classifier from the pre-trained backbone (or from scratch when the
    parameters say finetune.init: scratch, the baseline), with its loss and lr curves."""
    import shutil
    import tempfile
    from pathlib import Path

    from components.runtime import log_json_metrics, mapet
    from mapet.engine.curves import write_curves

    out = Path(tempfile.mkdtemp())
    mapet("finetune", "--params", params.path, "--data", data.metadata["path"], "--backbone", backbone.path,
          "--out", out)
    shutil.copy(out / "model.safetensors", model.path)
    document = log_json_metrics(metrics, out / "metrics.json")
    shutil.copy(write_curves(out / "history.json", out / "curves", "fine-tuning"), curves.path)
    model.metadata.update({"initialised_from": "scratch" if document["initialised_from"] == "scratch" else "backbone",
                           "steps": document["steps"]})
