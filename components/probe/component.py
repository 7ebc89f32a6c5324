from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def probe(data: Input[Dataset], params: Input[Artifact], backbone: Input[Model], metrics: Output[Metrics],
          scratch_metrics: Output[Metrics]):
    """`mapet probe` of the pre-trained backbone and of a random initialisation of the same ViT (the
    baseline): k-NN and linear-probe top-1 of their frozen features."""
    import tempfile
    from pathlib import Path

    from components.runtime import log_json_metrics, mapet

    out = Path(tempfile.mkdtemp())
    common = ("--params", params.path, "--data", data.metadata["path"])
    mapet("probe", *common, "--backbone", backbone.path, "--out", out / "backbone")
    mapet("probe", *common, "--scratch", "--out", out / "scratch")
    log_json_metrics(metrics, out / "backbone" / "metrics.json")
    log_json_metrics(scratch_metrics, out / "scratch" / "metrics.json")
